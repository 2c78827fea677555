"""S6 serve: the heterogeneous agent, an OpenAI-compatible router over the manifest.

Reads WORKSPACE/manifest.yaml (the router artifact and its confidence threshold, the
fallback LLM, the promoted tasks' specialists); writes every call it serves to the store,
as the recording proxy does, with the route taken in the record's `metadata.route` (a
`ServedRoute`), so the next cluster / train / eval sees the traffic.

Routes: `POST /v1/chat/completions` (plain or `"stream": true`), `GET /v1/models` (the
promoted task models and the fallback LLM), `GET /health`; `POST /v1/completions` and
`POST /v1/embeddings` are passed to the upstream LLM unchanged; any other path is a 404.

Concurrent calls are routed together, in one forward pass of the embedding model
(`slmify.router.RouteBatcher`). A chat call goes to the task the router picks,
answered by its specialist (see
slmify.specialists), or to the upstream LLM when: the manifest has no router, no task
matches, the router's confidence is below the manifest's threshold, the task is not
promoted, the request asks for what the specialist was not trained for, or the
specialist's answer is not valid (the client never sees such an answer). A request whose
`model` is a promoted task's id goes to that task without asking the router. The response
headers `x-slmify-route` (the task id, or `llm`) and `x-slmify-reason` say who answered and
why; the reason starts with a code: routed, pinned, no-router, no-match, low-confidence,
not-promoted, out-of-scope, invalid-output, specialist-error, router-error, shadow,
unreadable.

A specialist's answer is validated whole before anything is sent, so a streamed answer
arrives as SSE chunks only once generated: its time to first token is its full latency.

Shadow mode (`--shadow RATE`): that share of the requests routed to a task with a trained
specialist is answered by the LLM as usual, and the specialist answers too, in the
background; its answer and its agreement with the LLM's (slmify.metrics) are recorded with
the call. That includes the tasks the gate kept on the LLM: shadowing them is how a user
sees a specialist on live traffic before cutting it over.

Generation (`--backend URL`): in-process by default (slmify.runtime); with a backend, the
LoRA specialists' prompts go to an OpenAI-compatible completions server hosting their
adapters (slmify.backends: vLLM as exports/vllm-serve.sh starts it), each call in a thread
of its own so the server can batch them. Serve refuses to start when the server lacks a
promoted adapter; a call whose server is down or errs goes to the LLM (`specialist-error:
backend ...`). Heads answer in-process either way.

Every request first passes slmify.httpguard (Host, exact route, client key, JSON body).
Credentials for the upstream: with client keys configured (SLMIFY_API_KEY,
`--api-key-file`), an authenticated call goes upstream with SLMIFY_UPSTREAM_API_KEY;
without them, the client's own `Authorization` / `api-key` go through and the operator's
key is never added. Keys are never logged or stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from slmify.backends import BACKEND_THREADS, BackendError, CompletionsBackend
from slmify.callparse import parse_request
from slmify.decision import Decision, answer_decision, route_decision, task_decision
from slmify.errors import SlmifyError
from slmify.forwarding import (
    AGENT_HEADER,
    MAX_REQUEST_BYTES,
    SESSION_HEADER,
    Exchange,
    Upstream,
    serve_app,
)
from slmify.httpguard import PASSTHROUGH_POSTS, Guard, configure, credentials
from slmify.metrics import score_answer
from slmify.recording import CallWriter, exchange_to_record
from slmify.router import RouteBatcher
from slmify.runtime import TextEncoder
from slmify.schema import ChatRequest, Manifest, ServedRoute, SpecialistAttempt
from slmify.specialists import (
    Answer,
    OutOfScope,
    SpecialistPool,
    TaskRuntime,
    completion_body,
    offered_specs,
)
from slmify.sse import sse_events
from slmify.store import Store, redact_url

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-slmify-route"
REASON_HEADER = "x-slmify-reason"
LLM = "llm"


class ServeError(SlmifyError, RuntimeError):
    """A manifest whose router or specialists cannot be loaded; the message says which."""


class Router(Protocol):
    """What `slmify.router.load_router` returns."""

    def route_many(self, requests: list[ChatRequest]) -> list[tuple[str | None, float]]: ...

    def warm_up(self) -> None: ...


@dataclass
class Call:
    """One chat call as received; `payload` and `chat` stay None when it cannot be read."""

    http: web.Request
    body: bytes
    started: datetime
    t0: float
    payload: dict[str, Any] | None = None
    chat: ChatRequest | None = None


@dataclass
class Service:
    """Everything a request needs: the manifest, the router, the specialists, the LLM."""

    manifest: Manifest
    router: Router | None
    pool: SpecialistPool
    upstream: Upstream
    writer: CallWriter
    shadow_rate: float = 0.0
    backend: CompletionsBackend | None = None  # None: the LoRA specialists generate here
    # Scores shadow answers given in free text; MiniLM is loaded on the first such answer.
    encoder: TextEncoder = field(default_factory=TextEncoder)
    answered: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    background: set[asyncio.Task] = field(default_factory=set)
    promoted: frozenset[str] = field(init=False)
    batcher: RouteBatcher | None = field(init=False)
    # One thread for live generation (the pool's lock serializes it anyway), one for shadow
    # answers and one for routing (batched), so queued generations never hold up routing
    # and queued shadow answers never hold up a live one: it waits at most for the shadow
    # answer being generated. A single routing thread also keeps the router's caches
    # single-threaded; the embedding inside still uses torch's own threads.
    generator: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="slmify-specialist")
    )
    shadowing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="slmify-shadow")
    )
    routing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="slmify-router")
    )

    def __post_init__(self) -> None:
        # The pool also holds unpromoted specialists in shadow mode; only these answer.
        self.promoted = frozenset(
            t.id for t in self.manifest.tasks if t.status == "promoted" and t.id in self.pool.tasks
        )
        self.batcher = RouteBatcher(self.router, self.routing) if self.router else None

    # -- deciding ------------------------------------------------------------------------

    async def decide(self, request: ChatRequest) -> Decision:
        """The route of one request, before any specialist answers."""
        sampled = bool(self.shadow_rate) and random.random() < self.shadow_rate
        sampled_at = self.shadow_rate if sampled else None
        args = (self.pool.tasks, self.promoted, sampled_at)
        if request.model in self.promoted:
            routed = "pinned: the request's model is the task"
            return task_decision(request, request.model, None, routed, *args)
        if self.batcher is None or self.manifest.router is None:
            return Decision(None, "no-router: the manifest has none")
        picked, confidence = await self.batcher.route(request)
        threshold = self.manifest.router.confidence_threshold
        return route_decision(request, picked, confidence, threshold, *args)

    async def generate(self, task_id: str, request: ChatRequest, live: bool = True) -> Answer:
        executor = self.generator if live else self.shadowing
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.pool.answer, task_id, request)

    # -- answering -----------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        call = Call(request, await request.read(), datetime.now(timezone.utc), time.perf_counter())
        try:
            call.payload = json.loads(call.body)
            call.chat = parse_request(call.payload)
        except ValueError as e:  # the LLM answers it, with its own error if it is one
            return await self.ask_llm(call, Decision(None, f"unreadable: {e}"))
        try:
            decision = await self.decide(call.chat)
        except Exception as e:  # noqa: BLE001 - a router failure must not fail the call
            log.exception("routing failed")
            decision = Decision(None, f"router-error: {e}")
        attempt = None
        if decision.task_id is not None:
            try:
                answer = await self.generate(decision.task_id, call.chat)
            except OutOfScope as e:
                decision = replace(decision, task_id=None, reason=f"out-of-scope: {e}")
            except BackendError as e:  # the message says which server and what failed
                log.warning("specialist %s: %s", decision.task_id, e)
                decision = replace(decision, task_id=None, reason=f"specialist-error: {e}")
            except Exception as e:  # noqa: BLE001 - whatever breaks locally, the LLM answers
                log.exception("specialist %s failed", decision.task_id)
                decision = replace(decision, task_id=None, reason=f"specialist-error: {e}")
            else:
                settled = answer_decision(decision, answer, self.pool.tasks[answer.task_id])
                if settled.task_id is not None:
                    return await self.reply(call, settled, answer)
                attempt, decision = _attempt(answer), settled
        return await self.ask_llm(call, decision, attempt)

    async def reply(self, call: Call, decision: Decision, answer: Answer) -> web.StreamResponse:
        """Send the specialist's answer (JSON or SSE) and record the call."""
        completion = completion_body(answer)
        headers = self.route_headers(answer.task_id, decision.reason)
        if call.payload.get("stream") is True:
            usage = (call.payload.get("stream_options") or {}).get("include_usage") is True
            resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
            await resp.prepare(call.http)
            for event in sse_events(completion, usage):
                await resp.write(event)
            await resp.write_eof()
        else:
            resp = web.json_response(completion, headers=headers)
        route = ServedRoute(
            answered_by=answer.task_id,
            reason=decision.reason,
            task_id=decision.picked,
            confidence=decision.confidence,
            answer_confidence=answer.confidence,
        )
        ex = Exchange(
            source=f"specialist:{answer.task_id}",
            request_body=call.body,
            started=call.started,
            session_id=call.http.headers.get(SESSION_HEADER),
            agent=call.http.headers.get(AGENT_HEADER),
            status=200,
            body=json.dumps(completion).encode(),
            latency_ms=round((time.perf_counter() - call.t0) * 1000, 3),
            metadata={"route": route.model_dump(mode="json")},
        )
        self.writer.submit(ex)
        return resp

    async def ask_llm(
        self, call: Call, decision: Decision, attempt: SpecialistAttempt | None = None
    ) -> web.StreamResponse:
        """Forward the call to the upstream LLM and record it (after the shadow, if any)."""
        body = call.body
        if call.chat and call.chat.model in self.promoted and self.manifest.fallback.model:
            # A call pinned to a task model falls back to the LLM under the LLM's name.
            body = json.dumps({**call.payload, "model": self.manifest.fallback.model}).encode()
        headers = self.route_headers(LLM, decision.reason)
        resp, ex = await self.upstream.forward(call.http, body, credentials(call.http), headers)
        route = ServedRoute(
            answered_by=LLM,
            reason=decision.reason,
            task_id=decision.picked,
            confidence=decision.confidence,
            shadow=decision.shadow,
            specialist=attempt,
        )
        if decision.shadow:
            task = asyncio.create_task(self.shadow(ex, call.chat, route))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        else:
            ex.metadata = {"route": route.model_dump(mode="json")}
            self.writer.submit(ex)
        return resp

    async def shadow(self, ex: Exchange, chat: ChatRequest, route: ServedRoute) -> None:
        """The specialist's answer to a call the LLM answered, scored against the LLM's."""
        task_id = route.task_id
        try:
            answer = await self.generate(task_id, chat, live=False)
            attempt = _attempt(answer)
            llm = exchange_to_record(ex).response
            if llm is not None:
                loop = asyncio.get_running_loop()
                args = (llm.message, answer.message, offered_specs(chat), self.encoder)
                attempt.score = await loop.run_in_executor(None, score_answer, *args)
        except Exception as e:  # noqa: BLE001 - the shadow must never lose the call's record
            log.warning("shadow answer by %s failed: %s", task_id, e)
            attempt = SpecialistAttempt(
                task_id=task_id, text="", problem=f"failed: {e}", latency_ms=0.0, output_tokens=0
            )
        route.specialist = attempt
        ex.metadata = {"route": route.model_dump(mode="json")}
        self.writer.submit(ex)

    def route_headers(self, answered_by: str, reason: str) -> dict[str, str]:
        """The headers that say who answered and why; counts the route for the summary."""
        self.answered[answered_by] += 1
        self.reasons[reason.split(":", 1)[0]] += 1
        # Header values are latin-1 on the wire; a tool name may not be.
        safe = reason.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")
        return {ROUTE_HEADER: answered_by, REASON_HEADER: safe}

    # -- the other routes ----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        created = int(self.manifest.created_at.timestamp())
        ids = [*sorted(self.promoted), self.manifest.fallback.model or LLM]
        data = [{"id": i, "object": "model", "created": created, "owned_by": "slmify"} for i in ids]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "specialists": sorted(self.promoted),
                "shadowed": sorted(self.pool.tasks) if self.shadow_rate else [],
                "router": self.router is not None,
                "fallback": self.manifest.fallback.model,
                "upstream": redact_url(self.upstream.url),
                "backend": self.backend.urls if self.backend else "in-process",
                "answered": dict(self.answered),
            }
        )

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        resp, _ = await self.upstream.forward(request, await request.read())
        return resp

    async def drain(self) -> None:
        """Let background shadow answers finish, so their calls are recorded."""
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        for executor in (self.generator, self.shadowing, self.routing):
            executor.shutdown(wait=True)


def _attempt(answer: Answer) -> SpecialistAttempt:
    return SpecialistAttempt(
        task_id=answer.task_id,
        text=answer.text,
        problem=answer.problem,
        latency_ms=answer.latency_ms,
        output_tokens=answer.output_tokens,
        confidence=answer.confidence,
    )


# -- the server ---------------------------------------------------------------------------


def make_app(service: Service, guard: Guard | None = None) -> web.Application:
    """The server's routes behind `guard` (by default: loopback names, keys from the
    environment)."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await service.upstream.open()
        yield
        await service.drain()
        await service.upstream.close()

    guard = guard or configure()
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[guard.middleware])
    app.router.add_post("/v1/chat/completions", service.chat)
    app.router.add_get("/v1/models", service.models)
    app.router.add_get("/health", service.health)
    for path in PASSTHROUGH_POSTS:
        app.router.add_post(path, service.passthrough)
    app.cleanup_ctx.append(lifecycle)
    return app


def load_service(
    manifest_path: Path,
    store: Store,
    upstream_url: str,
    timeout_s: float,
    shadow_rate: float,
    backend_urls: list[str] | None = None,
) -> Service:
    """Read the manifest, load its router and specialists; the writer starts recording.
    `backend_urls`: the completions servers hosting the LoRA adapters (`exports`: those
    exports/vllm-serve.sh starts); ServeError when one is down or lacks a promoted adapter."""

    from slmify.evaluate import EvalError
    from slmify.manifest import ManifestError, read_manifest
    from slmify.specialists import task_runtimes

    manifest = read_manifest(manifest_path)
    router = None
    backend = None
    try:
        if manifest.router is not None:
            from slmify.router import load_router

            artifact = Path(manifest.router.artifact)
            router = load_router(
                artifact if artifact.is_absolute() else manifest_path.parent / artifact
            )
            router.warm_up()
        runtimes = task_runtimes(manifest, unpromoted=shadow_rate > 0)
        agents = {
            a.identity: (a.id, a.actions)
            for a in manifest.agents
            if any(r.id == a.id for r in runtimes)
        }
        if agents and backend_urls:
            raise ServeError(
                f"{manifest_path}: an agent-level specialist answers calls here; serving it "
                "from completions servers (--backend) is not supported yet"
            )
        if backend_urls:
            backend, runtimes = connect_backend(manifest, runtimes, backend_urls, timeout_s)
        pool = SpecialistPool(runtimes, backend)
        if agents and router is not None:
            from slmify.agent import AgentRouter

            promoted = {t.id for t in manifest.tasks if t.status == "promoted"}
            router = AgentRouter(router, pool, agents, promoted.__contains__)
    except (ManifestError, EvalError, BackendError, OSError, ValueError) as e:
        raise ServeError(f"{manifest_path}: cannot load what it names: {e}") from e
    threads = (
        {}
        if backend is None
        else {
            "generator": ThreadPoolExecutor(BACKEND_THREADS, thread_name_prefix="slmify-backend"),
            "shadowing": ThreadPoolExecutor(BACKEND_THREADS, thread_name_prefix="slmify-shadow"),
        }
    )
    return Service(
        manifest=manifest,
        router=router,
        pool=pool,
        upstream=Upstream(upstream_url, timeout_s),
        writer=CallWriter(store),
        shadow_rate=shadow_rate,
        backend=backend,
        **threads,
    )


def connect_backend(
    manifest: Manifest, runtimes: list[TaskRuntime], urls: list[str], timeout_s: float
) -> tuple[CompletionsBackend, list[TaskRuntime]]:
    """The completions servers, checked to host every promoted LoRA adapter, and the tasks
    left to serve: an unpromoted one (shadow mode) whose adapter no server hosts is dropped
    (the exported vLLM command hosts the promoted adapters only)."""
    from slmify.manifest import vllm_commands

    if urls == ["exports"]:
        urls = [url for _, url in vllm_commands(manifest)]
    backend = CompletionsBackend([u.rstrip("/") for u in urls], timeout_s)
    promoted = {t.id for t in manifest.tasks if t.status == "promoted"}
    backend.connect([t.id for t in runtimes if t.kind == "lora" and t.id in promoted])
    hosted = [t for t in runtimes if t.kind != "lora" or t.id in backend.served_by]
    return backend, hosted


def run_server(
    store: Store,
    manifest_path: Path,
    upstream_url: str,
    host: str,
    port: int,
    timeout_s: float,
    shadow_rate: float,
    announce: Callable[[str], None],
    guard: Guard,
    backend_urls: list[str] | None = None,
) -> dict[str, Any]:
    """Load the manifest's router and specialists and serve until SIGINT/SIGTERM, then
    finish the shadow answers and flush the writer; returns the summary counts."""
    service = load_service(manifest_path, store, upstream_url, timeout_s, shadow_rate, backend_urls)

    def listening(listen: str) -> None:
        announce(
            f"slmify serve listening on {listen}: {len(service.promoted)} specialist(s), "
            f"fallback {redact_url(upstream_url)}, recording into {store.location} (Ctrl-C stops)"
        )
        announce(guard.describe())
        for line in service.backend.describe() if service.backend else []:
            announce(line)

    try:
        listen = asyncio.run(serve_app(make_app(service, guard), host, port, listening))
    finally:
        service.writer.close()
    return {
        "listen": listen,
        "upstream": redact_url(upstream_url),
        "backend": service.backend.urls if service.backend else "in-process",
        "specialists": sorted(service.promoted),
        "answered_by": dict(service.answered),
        "reasons": dict(service.reasons),
        **service.writer.counts,
        "rejected": dict(guard.rejected),
    }
