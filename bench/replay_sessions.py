"""The end-to-end figures of `slmify eval`, measured again through a running `slmify serve`.

Takes a workspace where `slmify eval` and `slmify manifest` ran (`make demo`, or the stages
by hand) and replays exactly the held-out test calls eval replayed: the call ids of
WORKSPACE/eval/endtoend/test.jsonl, their requests read from the workspace's store as eval
read them (curated), one at a time in eval's order, through the real `slmify serve` (its
own process on loopback, started from WORKSPACE/manifest.yaml, recording into a temporary
store). The upstream LLM is a small HTTP server on loopback (in this process) that answers
each call with the LLM's logged answer for that call, so the calls serve sends to the LLM
are answered too; it refuses a call whose messages serve changed on the way.

For each call it compares what serve did (`x-slmify-route`, `x-slmify-reason`, and the
route serve recorded in its store) and its answer's agreement with the LLM's logged answer
(slmify.metrics.score_answer, as eval scores it) with eval's row for the same call, where
only the manifest's promoted tasks answer. Prints eval's headline and serve's side by side
(over the same calls), their reason codes, how many calls differ in route or answer (up to
10 listed, both sides), and how many calls the server recorded; exits 1 when the served
share or the agreement differ.

    .venv/bin/python bench/replay_sessions.py WORKSPACE [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# The stand-in LLM finds the call it is asked by this header (serve forwards the client's
# headers except x-slmify-*); it then checks the messages are the call's.
CALL_HEADER = "x-replay-call"
SHOWN = 10


@dataclass
class Deployment:
    """What the replay needs from the workspace: eval's rows, the calls, the manifest's
    promoted tasks and each task's eval settings."""

    rows: list[Any]  # ReplayedCall, eval's, in eval's order
    calls: dict[str, Any]  # CallRecord by id, from the workspace's store
    promoted: set[str]
    cfgs: dict[str, Any]  # EvalConfig by task id
    headline_cfg: Any  # the EvalConfig eval's headline used (its first trained task's)


@dataclass
class Answered:
    """Serve's HTTP answer to one call, and how long it took."""

    headers: dict[str, str]
    body: dict[str, Any]
    ms: float


@dataclass
class Comparison:
    """Eval's figures and serve's over the same calls, and the calls where they differ."""

    eval: Any  # EndToEnd
    serve: Any  # EndToEnd
    promoted: set[str]
    differ: list[tuple[Any, Any]] = field(default_factory=list)  # (eval row, serve row)
    summary: dict[str, Any] = field(default_factory=dict)  # serve's --json summary
    pairs: list[tuple[Any, Any]] = field(default_factory=list)  # every call's rows

    @property
    def same(self) -> bool:
        e, s = self.eval, self.serve
        return (e.served_share, e.agreement) == (s.served_share, s.agreement)


def load_deployment(workspace: Path, limit: int | None = None) -> Deployment:
    """Eval's test rows (a deterministic `limit` of them, by eval's own sampling), their
    calls from the store, and what the manifest deploys."""
    from slmify.evaluate import sample_ids, trained_task
    from slmify.manifest import read_manifest
    from slmify.schema import ReplayedCall
    from slmify.workspace import Workspace

    test = workspace / "eval" / "endtoend" / "test.jsonl"
    manifest = workspace / "manifest.yaml"
    for path, stage in ((test, "slmify eval"), (manifest, "slmify manifest")):
        if not path.exists():
            raise SystemExit(f"{path} not found: run `{stage} -w {workspace}` first")
    rows = [ReplayedCall.model_validate_json(line) for line in test.open(encoding="utf-8")]
    keep = set(sample_ids([r.call_id for r in rows], limit))
    rows = [r for r in rows if r.call_id in keep]
    with Workspace.resolve(workspace).open_store() as st:
        calls = {r.call_id: st.get_call(r.call_id).record for r in rows}
    found = [trained_task(workspace, t) for t in Workspace.at(workspace).tasks()]
    trained = [t for t in found if not isinstance(t, str)]
    deployed = read_manifest(manifest)
    return Deployment(
        rows=rows,
        calls=calls,
        promoted={t.id for t in deployed.tasks if t.status == "promoted"},
        cfgs={t.task.id: t.cfg for t in trained},
        headline_cfg=trained[0].cfg,
    )


# -- the stand-in LLM and the server ------------------------------------------------------


def request_body(call: Any) -> dict[str, Any]:
    """The call's request as the agent sent it (`parse_request` reads it back equal). Not
    streamed: streaming changes how an answer is framed, never where the call goes."""
    r = call.request
    body = {k: v for k, v in r.params.items() if k not in ("stream", "stream_options")}
    body["messages"] = r.messages
    for key in ("model", "tools", "functions"):
        if getattr(r, key) is not None:
            body[key] = getattr(r, key)
    return body


def logged_completion(call: Any) -> dict[str, Any]:
    """The LLM's logged answer to `call` as the chat.completion it sent."""
    resp = call.response
    return {
        "id": resp.response_id or f"chatcmpl-{call.id}",
        "object": "chat.completion",
        "created": int(call.timestamp.timestamp()) if call.timestamp else 0,
        "model": resp.model,
        "choices": [{"index": 0, "message": resp.message, "finish_reason": resp.finish_reason}],
        "usage": call.usage.model_dump(exclude_none=True),
    }


def llm_app(calls: dict[str, Any]) -> web.Application:
    """The upstream LLM: each call of the replay gets its logged answer, anything else (or
    a call whose messages serve changed) a 404."""

    async def chat(request: web.Request) -> web.Response:
        call = calls.get(request.headers.get(CALL_HEADER, ""))
        body = await request.json()
        if call is None or body.get("messages") != call.request.messages:
            return web.json_response({"error": {"message": "not a call of the replay"}}, 404)
        return web.json_response(logged_completion(call))

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def start_serve(manifest: Path, upstream: str, store_ws: Path) -> tuple[subprocess.Popen, str]:
    """`slmify serve` on a free loopback port; its URL once it listens. Its stderr is read
    on a thread from then on, so a chatty server never blocks on a full pipe."""
    cmd = [str(Path(sys.executable).parent / "slmify"), "serve", "--manifest", str(manifest)]
    cmd += ["--upstream", f"{upstream}/v1", "--port", "0", "--json", "-w", str(store_ws)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in iter(proc.stderr.readline, ""):
        if line.startswith("slmify serve listening on "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split()[4].rstrip(":").removesuffix("/v1")
    raise SystemExit(f"slmify serve did not start (exit {proc.wait()})")


async def send_all(url: str, calls: list[Any]) -> list[Answered]:
    """Each call, one after the other as its agent sent them."""
    out = []
    async with aiohttp.ClientSession() as s:
        for call in calls:
            headers = {CALL_HEADER: call.id}
            if call.session_id:
                headers["x-slmify-session"] = call.session_id
            if call.agent:
                headers["x-slmify-agent"] = call.agent
            endpoint = f"{url}/v1/chat/completions"
            t0 = time.perf_counter()
            async with s.post(endpoint, json=request_body(call), headers=headers) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise SystemExit(f"{call.id}: serve answered {r.status}: {body}")
                out.append(Answered(dict(r.headers), body, (time.perf_counter() - t0) * 1000))
    return out


async def through_serve(
    manifest: Path, calls: list[Any], store_ws: Path
) -> tuple[list[Answered], dict[str, Any]]:
    """The calls' answers through `slmify serve`, and its --json summary once stopped."""
    runner = web.AppRunner(llm_app({c.id: c for c in calls}), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        server, url = await asyncio.to_thread(start_serve, manifest, upstream, store_ws)
        try:
            answers = await send_all(url, calls)
        finally:
            server.send_signal(signal.SIGINT)  # serve records every answered call, then exits
            await asyncio.to_thread(server.wait, 120)
        summary = json.loads(server.stdout.read().strip().splitlines()[-1])
    finally:
        await runner.cleanup()
    return answers, summary


# -- what serve did, as eval's rows -------------------------------------------------------


def served_routes(store_ws: Path, calls: list[Any]) -> list[Any]:
    """The route serve recorded for each call (`ServedRoute`), in the order sent: one call
    at a time, so the store holds them in that order."""
    from slmify.schema import ServedRoute
    from slmify.store import open_store

    with open_store(str(store_ws / "calls.db")) as st:
        records = [s.record for s in st.iter_calls()]
    if len(records) != len(calls):
        raise SystemExit(f"serve recorded {len(records)} calls of {len(calls)}")
    for rec, call in zip(records, calls, strict=True):
        if rec.request.messages != call.request.messages:
            raise SystemExit(f"serve recorded another request in the place of {call.id}")
    return [ServedRoute.model_validate(r.metadata["route"]) for r in records]


def serve_row(call: Any, ev: Any, answered: Answered, route: Any, cfgs: dict, encoder: Any) -> Any:
    """Serve's answer to `call` as a `ReplayedCall` (its `answer`: the message serve sent,
    when a specialist answered), scored as eval scores. `ev` is eval's row: a judge's
    verdict on text is taken from it when serve sent the same message."""
    from slmify.endtoend import agrees
    from slmify.metrics import score_answer
    from slmify.schema import ModelAnswer, ReplayedCall, message_text

    by = answered.headers["x-slmify-route"]
    # What deferral compared: the specialist's confidence (served, or the attempt serve
    # sent to the LLM) times the router's.
    own = route.answer_confidence if route.specialist is None else route.specialist.confidence
    router = route.confidence if route.confidence is not None else 1.0
    answer = agree = None
    if by != "llm":
        message = answered.body["choices"][0]["message"]
        score = score_answer(call.response.message, message, call.offered_tools(), encoder)
        same = ev.answer is not None and ev.answer.message == message
        judge = ev.answer.judge if same else None
        agree = agrees(score, judge, cfgs[by])
        answer = ModelAnswer(
            text=message_text(message.get("content")) or json.dumps(message.get("tool_calls")),
            message=message,
            score=score,
            latency_ms=answered.ms,
            output_tokens=answered.body["usage"]["completion_tokens"],
            judge=judge,
            confidence=route.answer_confidence,
        )
    return ReplayedCall(
        call_id=call.id,
        session_id=call.session_id,
        cluster_task=ev.cluster_task,
        picked=route.task_id,
        router_confidence=route.confidence,
        answered_by=by,
        reason=answered.headers["x-slmify-reason"],
        answer=answer,
        confidence=None if own is None else round(own * router, 6),
        agree=agree,
        llm_latency_ms=call.latency_ms,
    )


def differs(ev: Any, sv: Any, promoted: set[str]) -> bool:
    """Whether serve's row for a call departs from eval's: another route (only promoted
    tasks answer in a deployment), or another answer or verdict."""
    deployed = ev.answered_by if ev.answered_by in promoted else "llm"
    if deployed != sv.answered_by:
        return True
    return sv.answer is not None and (ev.answer.message, ev.agree) != (sv.answer.message, sv.agree)


def compare(d: Deployment, serve_rows: list[Any], summary: dict[str, Any]) -> Comparison:
    """Eval's headline and serve's over the same calls, and the calls that differ."""
    from slmify.endtoend import end_to_end

    pairs = list(zip(d.rows, serve_rows, strict=True))
    figures = [end_to_end(r, d.promoted, {}, d.headline_cfg, {}) for r in (d.rows, serve_rows)]
    differ = [(ev, sv) for ev, sv in pairs if differs(ev, sv, d.promoted)]
    return Comparison(figures[0], figures[1], d.promoted, differ, summary, pairs)


def replay(workspace: Path, limit: int | None = None) -> Comparison:
    """Eval's held-out test calls (or `limit` of them) through `slmify serve`, compared."""
    d = load_deployment(workspace, limit)
    calls = [d.calls[r.call_id] for r in d.rows]
    with tempfile.TemporaryDirectory(prefix="slmify-replay-") as tmp:
        store_ws = Path(tmp)
        served, summary = asyncio.run(through_serve(workspace / "manifest.yaml", calls, store_ws))
        routes = served_routes(store_ws, calls)
    from slmify.runtime import TextEncoder

    encoder = TextEncoder()
    rows = [
        serve_row(call, ev, answered, route, d.cfgs, encoder)
        for call, ev, answered, route in zip(calls, d.rows, served, routes, strict=True)
    ]
    return compare(d, rows, summary)


# -- the report ---------------------------------------------------------------------------


def side(row: Any, promoted: set[str]) -> str:
    """One side of a differing call: who answered, why, with what confidence and result."""
    by = row.answered_by if row.answered_by in promoted else "llm"
    # Eval lets every trained specialist answer; a deployment only the promoted ones.
    unpromoted = "not promoted: " if by != row.answered_by else ""
    conf = f", confidence {row.confidence:.4f}" if row.confidence is not None else ""
    said = f", agree {row.agree}" if by != "llm" else ""
    return f"{by} [{unpromoted}{row.reason}]{conf}{said}"


def report(c: Comparison, workspace: Path) -> None:
    e, s, promoted = c.eval, c.serve, c.promoted
    print(f"{e.calls} held-out test calls of {workspace} through slmify serve")
    print(f"  promoted (manifest): {', '.join(sorted(promoted)) or 'none'}")
    print(f"  eval : {e.headline()}")
    print(f"  serve: {s.headline()}")
    for name, f in (("eval", e), ("serve", s)):
        codes = ", ".join(f"{k} {v}" for k, v in sorted(f.reasons.items()))
        print(f"  {name:5s} reasons: {codes}")
    print(
        f"  serve recorded {c.summary.get('recorded')} of {c.summary.get('requests')} calls; "
        f"answered by {c.summary.get('answered_by')}"
    )
    print(f"calls whose route or answer differ: {len(c.differ)}")
    for ev, sv in c.differ[:SHOWN]:
        print(f"  {ev.call_id}\n    eval : {side(ev, promoted)}\n    serve: {side(sv, promoted)}")
    verdict = "agree" if c.same else "DIFFER"
    print(f"served share and agreement: eval and serve {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--limit", type=int, help="replay this many of eval's calls (default all)")
    args = parser.parse_args()
    start = time.perf_counter()
    c = replay(args.workspace, args.limit)
    report(c, args.workspace)
    print(f"({time.perf_counter() - start:.0f} s)")
    sys.exit(0 if c.same else 1)


if __name__ == "__main__":
    main()
