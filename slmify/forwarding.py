"""HTTP plumbing shared by `slmify proxy` and `slmify serve`: forwarding a call to the
upstream LLM and relaying its answer back unchanged.

The upstream is the base URL an OpenAI SDK would be given (`https://api.openai.com/v1`):
`/v1/X` here is `UPSTREAM/X` there. A JSON answer comes back byte for byte, an SSE stream
(`"stream": true`) chunk by chunk as it arrives. The upstream gets the key slmify.httpguard
chose, never the client's key headers; the `x-slmify-*` headers are read here, not
forwarded. Upstream errors reach the client as sent (status and body); an upstream that
cannot be reached or stays silent past the timeout becomes a 502 or 504 with an
OpenAI-style error body (an `error` event if the stream had started).

The response path parses nothing: it copies bytes and keeps them in an `Exchange`, which
slmify.recording turns into a `CallRecord`. `serve_app` runs an aiohttp app until SIGINT or
SIGTERM. Reads and writes no file.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from slmify.httpguard import AUTH_HEADERS, credentials, upstream_path
from slmify.store import redact_url

SESSION_HEADER = "x-slmify-session"
AGENT_HEADER = "x-slmify-agent"
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
     "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
# aiohttp's client advertises only the encodings it can decode; forwarding the agent's own
# Accept-Encoding (br without brotli installed, say) could bring back undecodable bytes.
# The key headers go too: the ones the guard chose (httpguard.credentials) replace them.
REQUEST_DROP = HOP_BY_HOP | {"accept-encoding"} | AUTH_HEADERS
# The client decodes the body, so its encoding and length headers are no longer true.
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding"}
# Agents send long histories and base64 images; aiohttp's default cap is 1 MiB.
MAX_REQUEST_BYTES = 64 * 2**20
# Calls still being answered at shutdown get this long to finish (and be recorded).
SHUTDOWN_GRACE_S = 10.0


@dataclass
class Exchange:
    """One forwarded call as raw bytes: what the writer turns into a `CallRecord`."""

    source: str
    request_body: bytes
    started: datetime
    session_id: str | None = None
    agent: str | None = None
    status: int = 0  # the HTTP status the client got
    body: bytes = b""  # the upstream's answer: a JSON body or the whole SSE stream
    stream: bool = False
    latency_ms: float = 0.0
    error: str | None = None  # unreachable, timed out, or broke off mid-stream
    metadata: dict[str, Any] = field(default_factory=dict)  # stored as the record's metadata


# -- forwarding -------------------------------------------------------------------------


@dataclass
class Upstream:
    """The LLM that calls are forwarded to, over one pooled HTTP session."""

    url: str
    timeout_s: float
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        return f"proxy:{redact_url(self.url)}"

    async def open(self) -> None:
        # No total timeout: a long stream is fine as long as bytes keep coming. limit=0:
        # the proxy must not queue agents behind a connection cap of its own.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s
            ),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(
        self,
        request: web.Request,
        body: bytes,
        send_headers: dict[str, str] | None = None,
        answer_headers: dict[str, str] | None = None,
    ) -> tuple[web.StreamResponse, Exchange]:
        """Send `request` (its body already read) upstream and answer the client, adding
        `send_headers` to what goes upstream and `answer_headers` to the answer.

        The upstream gets the key the guard chose (`credentials`), never the client's key
        headers as sent, and the path of the route matched, never the client's raw path."""
        assert self.session is not None, "Upstream.open() first"
        ex = Exchange(
            source=self.source,
            request_body=body,
            started=datetime.now(timezone.utc),
            session_id=request.headers.get(SESSION_HEADER),
            agent=request.headers.get(AGENT_HEADER),
        )
        headers = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in REQUEST_DROP and not k.lower().startswith("x-slmify-")
        )
        headers.update(credentials(request))
        headers.update(send_headers or {})
        url = self.url.rstrip("/") + upstream_path(request)
        t0 = time.perf_counter()
        try:
            async with self.session.request(request.method, url, data=body, headers=headers) as up:
                ex.status = up.status
                out_headers = CIMultiDict(
                    (k, v) for k, v in up.headers.items() if k.lower() not in RESPONSE_DROP
                )
                if up.content_type == "text/event-stream":
                    out_headers.update(answer_headers or {})  # sent before the first event
                    resp = await _relay_stream(request, up, out_headers, ex, self.timeout_s)
                else:
                    ex.body = await up.read()
                    resp = web.Response(status=up.status, body=ex.body, headers=out_headers)
        except TimeoutError:
            message = f"upstream {redact_url(self.url)} sent nothing for {self.timeout_s:g} s"
            resp = _fail(ex, 504, message, "upstream_timeout")
        except aiohttp.ClientError as e:
            message = f"cannot reach upstream {redact_url(self.url)}: {e}"
            resp = _fail(ex, 502, message, "upstream_unreachable")
        if not resp.prepared:  # a JSON answer, relayed or an error made here
            resp.headers.update(answer_headers or {})
        ex.latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        if not resp.prepared and (request.transport is None or request.transport.is_closing()):
            # aiohttp does not cancel the handler when the agent hangs up: the answer
            # arrived, but nobody received it.
            ex.error = ex.error or "the client went away before the answer was sent"
        return resp, ex


async def _relay_stream(
    request: web.Request,
    up: aiohttp.ClientResponse,
    headers: CIMultiDict,
    ex: Exchange,
    timeout_s: float,
) -> web.StreamResponse:
    resp = web.StreamResponse(status=up.status, headers=headers)
    await resp.prepare(request)
    ex.stream = True
    chunks: list[bytes] = []
    try:
        async for chunk in _upstream_chunks(up, ex, timeout_s):
            chunks.append(chunk)
            await resp.write(chunk)
        if ex.error:
            # OpenAI's SDKs raise on an `error` event, so the agent learns the answer is cut.
            await resp.write(b"data: " + _error_body(ex.error, "upstream_error") + b"\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        ex.error = ex.error or "the client went away before the stream ended"
    ex.body = b"".join(chunks)
    return resp


async def _upstream_chunks(
    up: aiohttp.ClientResponse, ex: Exchange, timeout_s: float
) -> AsyncIterator[bytes]:
    """The upstream's bytes as they arrive; a failure reading them ends up in `ex.error`.

    Kept apart from the writes to the client, whose failures aiohttp raises as a
    ClientError too and which mean something else (the agent went away).
    """
    try:
        async for chunk in up.content.iter_any():
            yield chunk
    except TimeoutError:
        ex.error = f"upstream stream stalled: nothing for {timeout_s:g} s"
    except aiohttp.ClientError as e:
        ex.error = f"upstream stream broke off: {e}"


def _error_body(message: str, kind: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}
    ).encode()


def _fail(ex: Exchange, status: int, message: str, kind: str) -> web.Response:
    ex.status, ex.error, ex.body = status, message, _error_body(message, kind)
    return web.Response(status=status, body=ex.body, content_type="application/json")


async def serve_app(
    app: web.Application, host: str, port: int, listening: Callable[[str], None]
) -> str:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        listen = f"http://{host}:{runner.addresses[0][1]}/v1"
        listening(listen)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
    return listen
