"""S1 collect, live: an OpenAI-compatible proxy that records every chat call it forwards.

`POST /v1/chat/completions` goes to the upstream LLM and its answer comes back unchanged:
a JSON body byte for byte, an SSE stream (`"stream": true`) chunk by chunk as it arrives.
The upstream is the base URL an OpenAI SDK would be given (`https://api.openai.com/v1`):
`/v1/X` here is `UPSTREAM/X` there. `GET /v1/models`, `POST /v1/completions` and
`POST /v1/embeddings` are passed through the same way and not recorded; any other path is
a 404 and never reaches the upstream.

Each chat call is written to the store as a `CallRecord` (source `proxy:<upstream>`, id
the upstream's response id, else a uuid). Optional request headers, read here and not
forwarded:
- `x-slmify-session`: the agent's session or episode id, stored as `session_id`;
- `x-slmify-agent`: the agent's name, stored as `agent`.
Every request first passes slmify.httpguard (Host, exact route, client key, JSON body),
which also decides the upstream key: the client's own `Authorization` / `api-key`, or,
when clients authenticate with slmify keys, SLMIFY_UPSTREAM_API_KEY. Keys are never
stored: a record is built from the request body, those two headers and the answer.

Upstream errors reach the client as sent (status and body) and are recorded as failed
calls; an upstream that cannot be reached or stays silent past the timeout becomes a 502
or 504 with an OpenAI-style error body (an `error` event if the stream had started).

The response path parses nothing: it copies bytes and keeps them in an `Exchange`. Each
exchange is appended to the workspace's recording journal before the answer leaves (so a
killed proxy loses no answered call: the next start stores them), then a writer thread
turns exchanges into records and inserts them in batches, and is drained on shutdown.
`Upstream.forward`, `exchange_to_record` and `CallWriter` are the pieces a
router (`slmify serve`) reuses to forward and record calls the same way; a stream is
recorded as the message it adds up to (slmify.sse).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from slmify.callparse import parse_request, parse_response
from slmify.httpguard import (
    AUTH_HEADERS,
    PASSTHROUGH_POSTS,
    Guard,
    configure,
    credentials,
    upstream_path,
)
from slmify.journal import Journal, orphans
from slmify.schema import CallRecord, ChatResponse, Usage
from slmify.sse import assemble_stream, parse_sse
from slmify.store import Store, redact_url

log = logging.getLogger(__name__)

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
MAX_BATCH = 256


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


# -- recording --------------------------------------------------------------------------


def exchange_to_record(ex: Exchange, record_id: str | None = None) -> CallRecord:
    """The `CallRecord` of one exchange; ValueError if the body is not a chat request.

    Its id is the upstream's response id, else `record_id` (the writer's journal key, so a
    replayed call gets the id it would have had), else a new uuid."""
    try:
        request = parse_request(json.loads(ex.request_body))
    except ValueError as e:
        raise ValueError(f"the request body is not a chat completions request: {e}") from e
    response, usage, error = _answer(ex)
    return CallRecord(
        id=(response.response_id if response and response.response_id else None)
        or record_id
        or str(uuid.uuid4()),
        source=ex.source,
        timestamp=ex.started,
        session_id=ex.session_id,
        agent=ex.agent,
        request=request,
        response=response,
        usage=usage,
        latency_ms=ex.latency_ms,
        status="error" if error else "ok",
        error=error,
        metadata=ex.metadata,
    )


def _answer(ex: Exchange) -> tuple[ChatResponse | None, Usage, str | None]:
    if ex.error:
        return None, Usage(), ex.error
    if ex.status >= 400:
        return None, Usage(), f"HTTP {ex.status}: {_error_text(ex.body)}"
    try:
        completion = assemble_stream(parse_sse(ex.body)) if ex.stream else json.loads(ex.body)
        if isinstance(completion, dict) and completion.get("error"):
            return None, Usage(), f"upstream error: {_error_text(completion)}"
        return parse_response(completion)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # a malformed chunk, say
        return None, Usage(), f"unreadable upstream answer: {e}"


def _error_text(body: bytes | dict[str, Any]) -> str:
    """The `error.message` of an OpenAI error body, else the body's start."""
    try:
        obj = json.loads(body) if isinstance(body, bytes) else body
        err = obj["error"]
        return str(err.get("message") or err) if isinstance(err, dict) else str(err)
    except (ValueError, TypeError, KeyError):
        return body.decode("utf-8", "replace")[:500] if isinstance(body, bytes) else str(body)


class CallWriter:
    """Records exchanges off the response path: a journal, one thread, batched inserts.

    `submit` appends the exchange to the workspace's journal (slmify.journal) before the
    answer leaves, then queues it; the thread turns what is queued into records and inserts
    them as one transaction, so a quiet proxy writes each call at once and a busy one few
    large transactions. At start it first stores what a killed writer left in the journal.
    A call that cannot be made a record (a body nested too deeply, say) is written to
    `rejects.jsonl` with its reason and takes no other call with it; a locked or
    unreachable store is retried with backoff, and what still fails stays in the journal
    for the next start. `close()` drains the queue.
    """

    def __init__(self, store: Store, journal_dir: Path | None = None):
        self.store = store
        self.counts = {"requests": 0, "recorded": 0, "failed": 0, "not_recorded": 0}
        self.replayed = 0  # calls a killed writer had left in the journal, stored now
        folder = journal_dir or _workspace_of(store)
        self.rejects_path = folder / "rejects.jsonl"
        self.journal = Journal(folder)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        for path, entries in orphans(folder):
            self._write([_Pending(*_from_entry(e), None, replay=True) for e in entries])
            self.replayed += len(entries)
            path.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._run, name="slmify-call-writer", daemon=True)
        self._thread.start()

    def submit(self, ex: Exchange) -> None:
        self.counts["requests"] += 1
        key = uuid.uuid4().hex
        try:
            seg = self.journal.append(_to_entry(ex, key))
        except (TypeError, ValueError, OSError) as e:
            # Unjournaled (metadata that is not JSON, a full disk): still recorded if the
            # process lives, like before the journal existed.
            log.warning("call not journaled: %s", type(e).__name__)
            seg = None
        self._queue.put(_Pending(ex, key, seg))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.journal.close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get())
            self._write([p for p in batch if p is not None])
            if None in batch:
                return

    def _write(self, pending: list[_Pending]) -> None:
        records: list[tuple[CallRecord, _Pending]] = []
        for p in pending:
            try:
                records.append((exchange_to_record(p.ex, p.key), p))
            except Exception as e:  # noqa: BLE001 - one odd call must not stop the writer
                self._reject(p, e)
            # Hand the GIL to the event loop between records: otherwise a waiting request
            # can sit out a whole switch interval (5 ms) behind the writer (bench: p99).
            time.sleep(0)
        try:
            self._insert(records)
        except Exception as e:  # noqa: BLE001 - a store outage must not stop the proxy
            self.counts["not_recorded"] += len(records)
            log.error(
                "%d call(s) not recorded, the store failed (%s); they stay in the journal for"
                " the next start",
                len(records),
                e,
            )

    def _insert(self, records: list[tuple[CallRecord, _Pending]]) -> None:
        """Insert as one transaction; if a record in it cannot be serialized, each alone."""
        if not records:
            return
        try:
            _retrying(lambda: self._add([r for r, _ in records], [p for _, p in records]))
        except Exception as e:
            if _store_failure(e) or len(records) == 1:
                if not _store_failure(e):
                    self._reject(records[0][1], e)
                    return
                raise
            for one in records:  # isolate the poisoned record(s)
                self._insert([one])
            return
        self.counts["recorded"] += len(records)
        self.counts["failed"] += sum(r.status == "error" for r, _ in records)
        for _, p in records:
            self._done(p)

    def _add(self, records: list[CallRecord], pending: list[_Pending]) -> None:
        _, dups = self.store.add_calls(records)
        if dups:
            again = _rekeyed(records, pending, dups, self.store)
            if again:
                self.store.add_calls(again)

    def _reject(self, p: _Pending, e: BaseException) -> None:
        from slmify.callparse import as_reject

        self.counts["not_recorded"] += 1
        reason = str(as_reject(e.__cause__ or e))
        log.warning("call not recorded: %s", reason)
        row = {"source": p.ex.source, "started": p.ex.started.isoformat(), "reason": reason}
        try:
            with self.rejects_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            log.error("cannot write %s: %s", self.rejects_path, err)
        self._done(p)

    def _done(self, p: _Pending) -> None:
        if p.seg is not None:
            self.journal.done(p.seg)


@dataclass
class _Pending:
    ex: Exchange
    key: str  # the record's id when the upstream gave none
    seg: int | None  # its journal segment (None: replayed, or not journaled)
    replay: bool = False


def _workspace_of(store: Any) -> Path:
    """The folder of a SQLite store, else the workspace (--workspace is not known here)."""
    if getattr(store, "dialect", None) == "sqlite":
        return Path(store.location).parent
    from slmify.workspace import Workspace

    return Workspace.resolve().root


def _to_entry(ex: Exchange, key: str) -> bytes:
    meta = {
        "key": key,
        "source": ex.source,
        "started": ex.started.isoformat(),
        "session_id": ex.session_id,
        "agent": ex.agent,
        "status": ex.status,
        "stream": ex.stream,
        "latency_ms": ex.latency_ms,
        "error": ex.error,
        "metadata": ex.metadata,
        "request_bytes": len(ex.request_body),
    }
    head = json.dumps(meta).encode()
    return len(head).to_bytes(4, "big") + head + ex.request_body + ex.body


def _from_entry(entry: bytes) -> tuple[Exchange, str]:
    size = int.from_bytes(entry[:4], "big")
    meta = json.loads(entry[4 : 4 + size])
    cut = 4 + size + meta.pop("request_bytes")
    key = meta.pop("key")
    started = datetime.fromisoformat(meta.pop("started"))
    body = entry[cut:]
    return Exchange(request_body=entry[4 + size : cut], body=body, started=started, **meta), key


def _store_failure(e: BaseException) -> bool:
    """An error of the store (locked, unreachable), not of the record being inserted."""
    import sqlite3

    return isinstance(e, sqlite3.Error) or type(e).__module__.startswith("psycopg")


def _retrying(fn: Callable[[], None], attempts: int = 6, first_wait_s: float = 0.5) -> None:
    """`fn()`, retried with backoff (about 30 s in all) while the store fails."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _store_failure(e) or attempt == attempts - 1:
                raise
            log.warning("store failed (%s), retrying", e)
            time.sleep(first_wait_s * 2**attempt)


def _rekeyed(
    records: list[CallRecord], pending: list[_Pending], dups: list[str], store: Any
) -> list[CallRecord]:
    """New ids for the records an id clash kept out of the store.

    Each proxied call is a distinct event, but some upstreams reuse response ids (Ollama
    draws them from 999 values); the upstream id stays in `response.response_id`. The new
    id is drawn from the call's journal key, so a replay finds it; a replayed call already
    stored under its id (same start time) is not stored again.
    """
    left = Counter(dups)
    out = []
    # add_calls keeps the first of an id, skips the rest
    for r, p in reversed(list(zip(records, pending, strict=True))):
        if left[r.id]:
            left[r.id] -= 1
            if p.replay:
                stored = store.get_call(r.id)
                if stored is not None and stored.record.timestamp == r.timestamp:
                    continue
            out.append(r.model_copy(update={"id": f"{r.id}-{p.key[:12]}"}))
    return out


# -- the server -------------------------------------------------------------------------


def make_app(upstream: Upstream, writer: CallWriter, guard: Guard | None = None) -> web.Application:
    """The proxy's routes: chat completions forwarded and recorded, a few others forwarded,
    all behind `guard` (by default: loopback names, keys from the environment)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp, ex = await upstream.forward(request, await request.read())
        writer.submit(ex)
        return resp

    async def passthrough(request: web.Request) -> web.StreamResponse:
        resp, _ = await upstream.forward(request, await request.read())
        return resp

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        await upstream.open()
        yield
        await upstream.close()

    guard = guard or configure()
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[guard.middleware])
    app.router.add_post("/v1/chat/completions", chat)
    for path in PASSTHROUGH_POSTS:
        app.router.add_post(path, passthrough)
    app.router.add_get("/v1/models", passthrough)
    app.cleanup_ctx.append(upstream_session)
    return app


def run_proxy(
    store: Store,
    upstream_url: str,
    host: str,
    port: int,
    timeout_s: float,
    announce: Callable[[str], None],
    guard: Guard,
) -> dict[str, Any]:
    """Serve until SIGINT/SIGTERM, then flush the writer; returns the summary counts."""
    upstream = Upstream(upstream_url, timeout_s)
    writer = CallWriter(store)

    def listening(listen: str) -> None:
        announce(
            f"slmify proxy listening on {listen}, forwarding to {redact_url(upstream_url)},"
            f" recording into {store.location} (Ctrl-C stops)"
        )
        announce(guard.describe())

    try:
        listen = asyncio.run(_serve(make_app(upstream, writer, guard), host, port, listening))
    finally:
        writer.close()
    return {
        "listen": listen,
        "upstream": redact_url(upstream_url),
        "store": store.location,
        **writer.counts,
        "rejected": dict(guard.rejected),
    }


async def _serve(
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
