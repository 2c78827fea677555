"""How much latency the recording proxy adds to a chat call, on loopback.

Starts a local fake LLM (its own process) and the real `slmify collect proxy` (its own
process, SQLite store in a temporary workspace), then sends the same real tau-airline
request N times directly to the upstream and N times through the proxy, alternating, so
both see the same machine load. Prints p50/p99 of each path, the added latency, and how
many calls the proxy recorded (read from its --json summary after SIGINT).

    .venv/bin/python bench/bench_proxy.py [N]    # N defaults to 500
"""

from __future__ import annotations

import asyncio
import gzip
import json
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
TAU = ROOT.parent / "shared" / "datasets" / "tau-airline" / "calls.jsonl.gz"
WARMUP = 20


def run_upstream(port_out: multiprocessing.Queue, response: dict) -> None:
    """A fake LLM answering every chat call with `response` under a fresh id."""
    count = 0

    async def chat(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.json_response({**response, "id": f"chatcmpl-bench-{count}"})

    serve_chat(chat, port_out)


def serve_chat(chat: Callable, port_out: multiprocessing.Queue) -> None:
    """Answer POST /v1/chat/completions with `chat` on a free loopback port (put on
    `port_out`), until the process is stopped."""

    async def main() -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port_out.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(direct: str, proxied: str, body: dict, n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    async with aiohttp.ClientSession() as s:
        for i in range(WARMUP + n):
            for name, base in (("direct", direct), ("proxy", proxied)):
                t0 = time.perf_counter()
                async with s.post(f"{base}/v1/chat/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200, (name, r.status)
                if i >= WARMUP:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return times


def main(n: int) -> None:
    with gzip.open(TAU, "rt", encoding="utf-8") as f:
        call = json.loads(f.readline())
    ports: multiprocessing.Queue = multiprocessing.Queue()
    upstream = multiprocessing.Process(target=run_upstream, args=(ports, call["response"]))
    upstream.start()
    direct = f"http://127.0.0.1:{ports.get(timeout=30)}"
    with tempfile.TemporaryDirectory() as ws:
        proxy = subprocess.Popen(
            [str(Path(sys.executable).parent / "slmify"), "collect", "proxy", "--upstream",
             f"{direct}/v1", "--port", "0", "--json", "-w", ws],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = proxy.stderr.readline()
            proxied = line.split()[4].rstrip(",").removesuffix("/v1")
            times = asyncio.run(measure(direct, proxied, call["request"], n))
        finally:
            proxy.send_signal(signal.SIGINT)
            out, err = proxy.communicate(timeout=60)
            upstream.terminate()
        summary = json.loads(out)
    body_kb = len(json.dumps(call["request"])) / 1024
    print(f"proxy bench: {n} calls each way, request {body_kb:.1f} KB, loopback, sequential")
    for name in ("direct", "proxy"):
        t = times[name]
        print(f"  {name:7s} p50 {percentile(t, 0.5):6.2f} ms   p99 {percentile(t, 0.99):6.2f} ms")
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        added = percentile(times["proxy"], q) - percentile(times["direct"], q)
        print(f"  added   {label} {added:6.2f} ms" + ("   (target < 2 ms)" if q == 0.5 else ""))
    print(
        f"  recorded {summary['recorded']} of {summary['requests']} proxied calls"
        f" (failed {summary['failed']}, not recorded {summary['not_recorded']})"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
