"""S1 collect, live: an OpenAI-compatible proxy that records every chat call it forwards.

`POST /v1/chat/completions` goes to the upstream LLM and its answer comes back unchanged
(slmify.forwarding), and the call is written to the store as a `CallRecord`
(slmify.recording: journal first, then a writer thread). `GET /v1/models`,
`POST /v1/completions` and `POST /v1/embeddings` are passed through the same way and not
recorded; any other path is a 404 and never reaches the upstream. Every request first
passes slmify.httpguard (Host, exact route, client key, JSON body), which also decides the
upstream key: the client's own `Authorization` / `api-key`, or, when clients authenticate
with slmify keys, SLMIFY_UPSTREAM_API_KEY. Keys are never stored.

Reads the workspace's recording journal at start (calls a killed proxy answered but did
not store); writes the store, the journal and `rejects.jsonl`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from slmify.forwarding import MAX_REQUEST_BYTES, Upstream, serve_app
from slmify.httpguard import PASSTHROUGH_POSTS, Guard, configure
from slmify.recording import CallWriter
from slmify.store import Store, redact_url


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
        listen = asyncio.run(serve_app(make_app(upstream, writer, guard), host, port, listening))
    finally:
        writer.close()
    return {
        "listen": listen,
        "upstream": redact_url(upstream_url),
        "store": store.location,
        **writer.counts,
        "rejected": dict(guard.rejected),
    }
