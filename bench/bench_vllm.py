"""In-process generation against vLLM (`slmify serve --backend`), as serve runs each: the
in-process specialist (its one adapter merged) answers one call at a time under the pool's
lock, so concurrent calls queue; the backend client (slmify.backends) sends every call at
once and vLLM batches them. Each call's latency is what its caller waits (queueing
included); tokens/s is all calls' generated tokens over the level's wall time.

Specialist: SmolLM2-135M with a random LoRA shaped like the CPU recipe's (see
bench_generate.py), answering the demo's tool-call prompts (data/demo/calls.jsonl.gz, pruned
as training does) with the demo's 38-token cap, greedy, in slmify's `inference_dtype` on
both sides. The in-process levels run first, then vLLM is started (.venv-vllm, `make
vllm-venv`) on loopback, so neither competes with the other for the cores.

Prints per backend and concurrency (1, 8, 32) p50/p99 latency and tokens/s, and how many
of vLLM's answers are the in-process text.

    nice -n 10 .venv/bin/python bench/bench_vllm.py [--levels 1 8 32] [--calls 4]

--calls: calls per level at least (a level of concurrency c sends max(c, calls) calls).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_generate import demo_prompts, random_adapter

from slmify.models import inference_dtype, resolve_base

VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
ADAPTER = "bench-tool-call"


def run_level(answer, prompts: list[str], concurrency: int) -> tuple[list, float]:  # noqa: ANN001
    """Every prompt answered with `concurrency` callers at once: the answers and the wall
    time. A call's latency runs from its submission, so queueing counts."""

    def timed(prompt: str):  # noqa: ANN202
        t0 = time.perf_counter()
        generation = answer(prompt)
        return generation, (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as callers:
        out = list(callers.map(timed, prompts))
    return out, time.perf_counter() - t0


def report(name: str, concurrency: int, out: list, wall_s: float) -> None:
    ms = sorted(latency for _, latency in out)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    tokens = sum(g.output_tokens for g, _ in out)
    print(
        f"  {name:10s} c={concurrency:<3d} {len(out):3d} calls  p50 {statistics.median(ms):7.0f} ms"
        f"  p99 {p99:7.0f} ms  {tokens / wall_s:6.1f} tokens/s"
    )


def start_vllm(base: str, adapter: Path, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server on a free loopback port, as exports/vllm-serve.sh starts it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", base]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--enable-lora"]
    argv += ["--lora-modules", f"{ADAPTER}={adapter}", "--max-lora-rank", "16"]
    argv += ["--max-loras", "1"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return proc, url
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit(f"vLLM not ready in 600 s: see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--calls", type=int, default=4, help="calls per level at least")
    parser.add_argument("--cap", type=int, default=38, help="max new tokens (the demo's call)")
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():  # `make bench` runs every bench: say why, fail nothing
        print(f"bench_vllm: skipped, {VLLM_PYTHON} not found (run `make vllm-venv` first)")
        return
    from slmify.backends import CompletionsBackend
    from slmify.runtime import Specialist

    base = str(resolve_base("smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="slmify-bench-vllm-"))
    random_adapter(Path(base), work / "adapter")
    dtype = str(inference_dtype("cpu")).removeprefix("torch.")
    local = Specialist(base, work / "adapter", args.cap, merge=True)  # as the pool loads one
    prompts = demo_prompts(local.tokenizer, max(max(args.levels), args.calls))
    print(
        f"SmolLM2-135M + random LoRA (r 16), demo tool-call prompts, cap {args.cap} tokens, "
        f"{dtype}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    lock = threading.Lock()  # the pool's: one in-process generation at a time

    def in_process(prompt: str):  # noqa: ANN202
        with lock:
            return local.answer(prompt, True, args.cap)

    in_process(prompts[0])  # warm-up
    texts = {}
    for c in args.levels:
        out, wall = run_level(in_process, prompts[: max(c, args.calls)], c)
        texts |= {p: g.text for p, (g, _) in zip(prompts, out, strict=False)}
        report("in-process", c, out, wall)
    proc, url = start_vllm(base, work / "adapter", dtype, work / "vllm.log")
    try:
        backend = CompletionsBackend([url])
        backend.connect([ADAPTER])
        remote = backend.specialist(base, args.cap)

        def on_vllm(prompt: str):  # noqa: ANN202
            return remote.answer(prompt, True, args.cap, "tool_call", adapter=ADAPTER)

        on_vllm(prompts[0])  # warm-up
        same = total = 0
        for c in args.levels:
            out, wall = run_level(on_vllm, prompts[: max(c, args.calls)], c)
            report("vLLM", c, out, wall)
            same += sum(g.text == texts[p] for p, (g, _) in zip(prompts, out, strict=False))
            total += len(out)
        print(f"  vLLM's answer is the in-process text: {same} of {total}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
