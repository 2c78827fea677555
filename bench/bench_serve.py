"""What `slmify serve` costs and delivers, on loopback, with bounded request counts.

Builds a deployment in a temporary workspace: `slmify cluster` fitted on 100 FireAct and
100 tau-airline calls (tasks and the real router), the real SmolLM2-135M base
(slmify.models) with a LoRA adapter shaped by the CPU recipe (slmify.train.lora_config;
untrained: its weights do not change the cost of a forward pass) promoted for the FireAct
task with the most calls, and a manifest pointing at both. Then prints:

1. router decision time: `router.route(request)` in-process on 100 calls it was not fitted
   on, after a warm-up: p50 / p99 (target < 10 ms), as served (bf16 one-pass embedding on
   CPUs with bf16) and against the same router embedding in float32, with how many
   decisions the two share. The default recipe's router reads the last turn's n-grams and
   embeds only task statements it has not cached (bench/bench_router.py compares the
   recipe's `router_features` settings on whole held-out sets);
2. the specialist: K FireAct requests the router sends to it, one at a time, through the
   real `slmify serve` (its own process): latency p50 / max, generated tokens/s
   (generation capped at MAX_NEW tokens);
3. throughput: N tau-airline requests (routed, then answered by a fake LLM in its own
   process) at several concurrencies, through the server and straight to the fake LLM;
4. how many calls the server recorded (its --json summary after SIGINT).

The machine's load average and torch's thread count are printed with the figures: on a
shared CPU, torch's default of one thread per core can be several times slower than one
thread (set OMP_NUM_THREADS=1 to compare).

    .venv/bin/python bench/bench_serve.py [N] [K]    # N defaults to 200, K to 3
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from bench_proxy import percentile, run_upstream

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
MAX_NEW = 64
THRESHOLD = 0.5
CONCURRENCY = (1, 16)


def load(name: str, n: int) -> list[dict[str, Any]]:
    with gzip.open(DATASETS / name / "calls.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def fit_router(root: Path, calls: list[dict[str, Any]]) -> tuple[list[dict], dict[str, str]]:
    """`slmify cluster` on the calls: the tasks, and the task of each call id."""
    from slmify.cluster import ClusterConfig, cluster_store
    from slmify.collect import from_openai_log
    from slmify.workspace import Workspace

    ws = Workspace.resolve(root)
    with ws.open_store() as st:
        st.add_calls([from_openai_log(c, "bench")[0] for c in calls])
        cluster_store(st, ws, ClusterConfig())
    return [t.model_dump(mode="json") for t in ws.tasks()], ws.assigned()


def build_deployment(root: Path, tasks: list[dict], promoted: str, calls: list[dict]) -> Path:
    """The adapter, its pruning and eval settings, and a manifest promoting `promoted`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from slmify.collect import from_openai_log
    from slmify.datasets import find_pruning
    from slmify.manifest import write_manifest
    from slmify.models import resolve_base
    from slmify.recipes import load_recipe
    from slmify.schema import (
        FallbackLLM,
        Manifest,
        ManifestTask,
        RouterSpec,
        Savings,
        SpecialistSpec,
    )
    from slmify.train import lora_config

    recipe = load_recipe("cpu-smollm2-135m", [])
    base = resolve_base(recipe.model.base)
    folder = root / "specialists" / promoted
    loaded = AutoModelForCausalLM.from_pretrained(base)
    layers = loaded.config.num_hidden_layers
    model = get_peft_model(loaded, lora_config(recipe, loaded, layers))
    model.save_pretrained(folder / "adapter")
    records = [from_openai_log(c, "bench")[0] for c in calls]
    (folder / "pruning.json").write_text(
        find_pruning(records, recipe.dataset.prune).model_dump_json()
    )
    (folder / "recipe.yaml").write_text(f"eval: {{max_new_tokens: {MAX_NEW}}}\n")
    spec = SpecialistSpec(
        base_model=recipe.model.base,
        base_model_path=str(base),
        adapter_path=str(folder / "adapter"),
        lora_rank=recipe.lora.r,
        input_pruning=[],
        chat_template="SmolLM2's",
    )
    entries = [
        ManifestTask(
            id=t["id"],
            label=t["label"],
            share=t["share"],
            calls=t["calls"],
            output_shape=t["output_shape"],
            status="promoted" if t["id"] == promoted else "llm",
            reason="bench",
            specialist=spec if t["id"] == promoted else None,
        )
        for t in tasks
    ]
    manifest = Manifest(
        created_at=datetime.now(timezone.utc),
        router=RouterSpec(
            embedding_model="all-MiniLM-L6-v2",
            artifact="cluster/router",
            confidence_threshold=THRESHOLD,
        ),
        fallback=FallbackLLM(model="gpt-4o", endpoint=None),
        tasks=entries,
        savings=Savings(
            specialist_share=0.0,
            specialist_calls=0,
            llm_cost_usd=0.0,
            llm_cost_usd_moved=0.0,
            llm_latency_s_moved=None,
            prices="bench",
        ),
    )
    path = root / "manifest.yaml"
    write_manifest(manifest, path)
    return path


def start_server(
    manifest: Path, upstream: str, ws: Path, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    cmd = [str(Path(sys.executable).parent / "slmify"), "serve", "--manifest", str(manifest)]
    cmd += ["--upstream", f"{upstream}/v1", "--port", "0", "--json", "-w", str(ws), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in iter(proc.stderr.readline, ""):
        if line.startswith("slmify serve listening on "):
            return proc, line.split()[4].rstrip(":").removesuffix("/v1")
    raise RuntimeError(f"slmify serve did not start: {proc.stderr.read()}")


async def post_all(url: str, bodies: list[dict], concurrency: int) -> tuple[list, float]:
    """POST every body with at most `concurrency` in flight: [(ms, headers, json)], wall s."""
    gate = asyncio.Semaphore(concurrency)

    async def one(s: aiohttp.ClientSession, body: dict) -> tuple[float, dict, dict]:
        async with gate:
            t0 = time.perf_counter()
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                data = await r.json(content_type=None)
                assert r.status == 200, (r.status, data)
                return (time.perf_counter() - t0) * 1000, dict(r.headers), data

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(s, b) for b in bodies))
        return list(out), time.perf_counter() - t0


def bench_router(folder: Path, calls: list[dict[str, Any]]) -> Any:
    """The router as served (bf16 one-pass embedding where the CPU has bf16) against the
    same router embedding in float32, in the same process: times and decisions."""
    from slmify.collect import parse_request
    from slmify.embed import Embedder
    from slmify.router import load_router

    requests = [parse_request(c["request"]) for c in calls]
    router, baseline = load_router(folder), load_router(folder)
    baseline._embedder = Embedder(router.meta.embedding_model, router.meta.max_seq_length)
    print(f"router: {len(requests)} unseen calls, in-process, one at a time")
    decisions = {}
    for name, r in (("served", router), ("float32", baseline)):
        for q in requests[:10]:  # warm-up: loads MiniLM
            r.route(q)
        r._task_cache.clear()
        times, decisions[name] = [], []
        for q in requests:
            t0 = time.perf_counter()
            decisions[name].append(r.route(q)[0])
            times.append((time.perf_counter() - t0) * 1000)
        print(
            f"  {name:8s} decision p50 {percentile(times, 0.5):6.1f} ms   "
            f"p99 {percentile(times, 0.99):6.1f} ms   (target < 10 ms)"
        )
    same = sum(a == b for a, b in zip(decisions["served"], decisions["float32"], strict=True))
    print(f"  same task chosen: {same} of {len(requests)}")
    return router


def bench_specialist(url: str, bodies: list[dict[str, Any]]) -> None:
    asyncio.run(post_all(url, bodies[:1], 1))  # warm-up: first-call allocations
    results, _ = asyncio.run(post_all(url, bodies, 1))
    latencies = [ms for ms, _, _ in results]
    tokens = [d["usage"]["completion_tokens"] for _, _, d in results]
    prompt = sum(d["usage"]["prompt_tokens"] for _, _, d in results) / len(results)
    by = sorted({f"{h['x-slmify-route']} ({h['x-slmify-reason']})" for _, h, _ in results})
    print(
        f"specialist: SmolLM2-135M + the CPU recipe's LoRA, {len(bodies)} FireAct requests "
        f"through the server, one at a time, <= {MAX_NEW} new tokens; answered by {by}"
    )
    print(
        f"  latency p50 {percentile(latencies, 0.5):7.0f} ms   max {max(latencies):7.0f} ms"
        f"   prompt {prompt:.0f} tokens mean"
    )
    print(f"  generated {sum(tokens)} tokens: {sum(tokens) / (sum(latencies) / 1000):.1f} tokens/s")


def bench_throughput(url: str, direct: str, tau: list[dict[str, Any]], n: int) -> None:
    bodies = [tau[i % len(tau)]["request"] for i in range(n)]
    print(f"throughput: {n} tau-airline requests (not promoted: routed, then the LLM, a fake)")
    for name, base in (("direct", direct), ("serve", url)):
        for c in CONCURRENCY:
            asyncio.run(post_all(base, bodies[:10], c))  # warm-up
            results, wall = asyncio.run(post_all(base, bodies, c))
            ms = [r[0] for r in results]
            print(
                f"  {name:6s} concurrency {c:3d}: {n / wall:7.1f} req/s   "
                f"p50 {percentile(ms, 0.5):7.1f} ms   p99 {percentile(ms, 0.99):7.1f} ms"
            )


def main(n: int = 200, k: int = 3) -> None:
    import os

    import torch

    fireact, tau = load("fireact", 300), load("tau-airline", 300)
    fitted = fireact[:100] + tau[:100]
    ports: multiprocessing.Queue = multiprocessing.Queue()
    upstream = multiprocessing.Process(
        target=run_upstream, args=(ports, tau[0]["response"]), daemon=True
    )
    upstream.start()
    direct = f"http://127.0.0.1:{ports.get(timeout=30)}"
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tasks, assigned = fit_router(root, fitted)
        text_tasks = [t["id"] for t in tasks if t["output_shape"] == "text"]
        promoted = max(text_tasks, key=lambda t: sum(assigned.get(c["id"]) == t for c in fireact))
        manifest = build_deployment(
            root, tasks, promoted, [c for c in fitted if assigned.get(c["id"]) == promoted]
        )
        router = bench_router(root / "cluster" / "router", fireact[200:250] + tau[200:250])
        mine = [c["request"] for c in fireact[100:200] if routes(router, c) == promoted][:k]
        server, url = start_server(manifest, direct, root / "served")
        try:
            bench_specialist(url, mine)
            bench_throughput(url, direct, tau[100:200], n)
        finally:
            server.send_signal(signal.SIGINT)
            out, err = server.communicate(timeout=300)
            upstream.terminate()
    summary = json.loads(out)
    print(
        f"recorded {summary['recorded']} of {summary['requests']} served calls "
        f"(not recorded {summary['not_recorded']}); answered by {summary['answered_by']}, "
        f"reasons {summary['reasons']}"
    )


def routes(router: Any, call: dict[str, Any]) -> str | None:
    """The task the router sends `call` to with the manifest's threshold, else None."""
    from slmify.collect import parse_request

    picked, confidence = router.route(parse_request(call["request"]))
    return picked if confidence >= THRESHOLD else None


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
