"""`slmify serve` answering held-out agent sessions end to end, on CPU, on loopback.

Takes a workspace where `slmify cluster`, `train`, `eval` and `manifest` ran (the FireAct
walk-through in the README), picks N sessions that training never saw (every call of the
session is in its task's test split, `specialists/<task>/splits.json`), and replays their
calls, in order, through the real `slmify serve` (its own process, the workspace's
manifest, router and adapters). The upstream LLM is a local stand-in that answers each call
with the answer the original LLM (GPT-4 for FireAct) gave in the logs: nothing leaves the
machine. A replay keeps the recorded trajectory: the next call carries the LLM's recorded
answer, not the specialist's.

Prints, per call: who answered (`x-slmify-route`) and why (`x-slmify-reason`), the
latency, and for a specialist's answer (or, with --shadow, its background answer) its
agreement with the logged LLM answer (slmify.metrics, as `slmify eval` scores it); then
the totals, and how many calls the server recorded in its own store, each with its route.

    .venv/bin/python bench/replay_sessions.py WORKSPACE [--sessions 2] [--shadow 1.0]
        [--calls ../shared/datasets/fireact/calls.jsonl.gz]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import multiprocessing
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bench_proxy import percentile, serve_chat
from bench_serve import start_server

ROOT = Path(__file__).resolve().parents[1]
FIREACT = ROOT.parent / "shared" / "datasets" / "fireact" / "calls.jsonl.gz"


def session_of(call: dict[str, Any]) -> str:
    return call["metadata"]["session_id"]


def key(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, sort_keys=True)


def run_replay(port_out: multiprocessing.Queue, calls: list[dict[str, Any]]) -> None:
    """The stand-in LLM: each known call gets its recorded answer, anything else a 404."""
    answers = {key(c["request"]["messages"]): c["response"] for c in calls}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        answer = answers.get(key(body["messages"]))
        if answer is None:
            return web.json_response({"error": {"message": "not in the logs"}}, status=404)
        return web.json_response(answer)

    serve_chat(chat, port_out)


def held_out_sessions(workspace: Path, calls: list[dict[str, Any]], n: int) -> list[list[dict]]:
    """The N longest sessions whose every call is in a test split, calls in log order."""
    test = set()
    for splits in (workspace / "specialists").glob("*/splits.json"):
        test |= set(json.loads(splits.read_text())["test"])
    sessions: dict[str, list[dict[str, Any]]] = {}
    for c in calls:
        sessions.setdefault(session_of(c), []).append(c)
    held = [s for s in sessions.values() if all(c["id"] in test for c in s)]
    held.sort(key=len, reverse=True)  # the longest: the most steps of the agent
    if len(held) < n:
        raise SystemExit(f"{workspace}: only {len(held)} sessions are wholly in test splits")
    return held[:n]


async def replay(url: str, session: list[dict[str, Any]]) -> list[tuple[dict, float, dict]]:
    """Send a session's calls one after the other, as its agent did: (call, ms, headers)."""
    out = []
    async with aiohttp.ClientSession() as s:
        for c in session:
            t0 = time.perf_counter()
            headers = {"x-slmify-session": session_of(c), "x-slmify-agent": "fireact"}
            endpoint = f"{url}/v1/chat/completions"
            async with s.post(endpoint, json=c["request"], headers=headers) as r:
                body = await r.json(content_type=None)
                assert r.status == 200, (r.status, body)
                out.append((c, (time.perf_counter() - t0) * 1000, dict(r.headers)))
    return out


def served_records(ws: Path) -> dict[str, Any]:
    """The record the server wrote for each call, by the call's request key."""
    from slmify.store import open_store

    with open_store(str(ws / "calls.db")) as st:
        return {key(s.record.request.messages): s.record for s in st.iter_calls()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--calls", type=Path, default=FIREACT)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--shadow", type=float, default=0.0)
    args = parser.parse_args()
    with gzip.open(args.calls, "rt", encoding="utf-8") as f:
        calls = [json.loads(line) for line in f]
    sessions = held_out_sessions(args.workspace, calls, args.sessions)
    ports: multiprocessing.Queue = multiprocessing.Queue()
    upstream = multiprocessing.Process(
        target=run_replay, args=(ports, [c for s in sessions for c in s]), daemon=True
    )
    upstream.start()
    direct = f"http://127.0.0.1:{ports.get(timeout=30)}"
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp)
        extra = ("--shadow", str(args.shadow)) if args.shadow else ()
        server, url = start_server(args.workspace / "manifest.yaml", direct, served, extra)
        try:
            results = [asyncio.run(replay(url, s)) for s in sessions]
        finally:
            server.send_signal(signal.SIGINT)
            out, _ = server.communicate(timeout=600)  # shadow answers finish first
            upstream.terminate()
        report(results, served_records(served), json.loads(out))


def specialist_said(call: dict[str, Any], by: str, record: Any, encoder: Any) -> tuple:
    """What a specialist answered (or would have, in shadow) and its agreement with the
    logged LLM answer; (None, None) when no specialist answered."""
    from slmify.collect import parse_request
    from slmify.metrics import score_answer
    from slmify.specialists import offered_specs

    attempt = record.metadata["route"].get("specialist")
    if by != "llm":  # the specialist's answer is the recorded response: score it here
        message = record.response.message
        reference = call["response"]["choices"][0]["message"]
        offered = offered_specs(parse_request(call["request"]))
        text = message.get("content") or json.dumps(message.get("tool_calls"))
        return text, score_answer(reference, message, offered, encoder).score
    if attempt:
        return attempt["text"], (attempt.get("score") or {}).get("score")
    return None, None


def report(results: list[list], records: dict[str, Any], summary: dict[str, Any]) -> None:
    from slmify.runtime import TextEncoder

    encoder = TextEncoder()
    answered: Counter[str] = Counter()
    latency: dict[str, list[float]] = {}
    scores = []
    for session in results:
        print(f"session {session_of(session[0][0])}: {len(session)} calls")
        for call, ms, headers in session:
            by = headers["x-slmify-route"]
            answered[by] += 1
            latency.setdefault("llm" if by == "llm" else "specialist", []).append(ms)
            print(f"  {call['id']:24s} {by:28s} {ms:8.0f} ms   {headers['x-slmify-reason']}")
            record = records[key(call["request"]["messages"])]
            text, score = specialist_said(call, by, record, encoder)
            if text is not None:
                said = f"   agreement {score:.2f}" if score is not None else ""
                print(f"    specialist said: {text[:110]!r}{said}")
                scores += [] if score is None else [score]
    for who, ms in latency.items():
        print(f"{who}: {len(ms)} calls, latency p50 {percentile(ms, 0.5):.0f} ms")
    if scores:
        mean = sum(scores) / len(scores)
        print(f"specialist agreement with the logged LLM: mean {mean:.3f} over {len(scores)} calls")
    routed = sum("route" in r.metadata for r in records.values())
    print(
        f"answered by {dict(answered)}; the server recorded {summary['recorded']} of "
        f"{summary['requests']} calls, {routed} with a route"
    )


if __name__ == "__main__":
    main()
