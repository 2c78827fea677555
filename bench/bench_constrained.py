"""What constrained decoding (slmify.constrained, xgrammar) costs and buys: the demo's
tool-call and JSON-extraction prompts answered through the specialist pool with and
without the grammar, call by call alternating so both see the same load.

Default specialist: SmolLM2-135M base with a LoRA whose B is zero (peft's initialisation:
the base model's answers exactly), the full prompt (system text and tool schemas kept, as
an untrained model needs them). Prints per task and mode: how many answers are valid
(`answer_problem` finds nothing: a call of an offered tool with schema-valid arguments, or
JSON), p50 milliseconds per generated token and tokens per answer; then the per-token
overhead of the grammar.

    nice -n 10 .venv/bin/python bench/bench_constrained.py [--calls 6] [--cap 64]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
from pathlib import Path

# First: importing slmify quiets the Hugging Face progress bars transformers sets up.
from slmify.models import inference_dtype, resolve_base
from slmify.schema import ChatRequest, PromptPruning
from slmify.shapes import text_shape
from slmify.specialists import SpecialistPool, TaskRuntime, answer_problem

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "calls.jsonl.gz"


def demo_requests(calls: int) -> dict[str, list[ChatRequest]]:
    """The first `calls` demo requests answered with a tool call, and with JSON."""
    out: dict[str, list[ChatRequest]] = {"tool_call": [], "json": []}
    with gzip.open(DEMO, "rt") as f:
        for line in f:
            record = json.loads(line)
            if "choices" not in record["response"]:  # the demo's failed calls
                continue
            raw, message = record["request"], record["response"]["choices"][0]["message"]
            shape = "tool_call" if message.get("tool_calls") else text_shape(message["content"])
            if shape in out and len(out[shape]) < calls:
                params = {k: v for k, v in raw.items() if k not in ("model", "messages", "tools")}
                params.pop("max_tokens", None)  # the bench's cap, not the demo's
                out[shape].append(
                    ChatRequest(messages=raw["messages"], tools=raw.get("tools"), params=params)
                )
    return out


def zero_adapter(base: str, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        folder
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=6, help="prompts per task")
    parser.add_argument("--cap", type=int, default=64, help="generation cap per answer")
    args = parser.parse_args()
    base = str(resolve_base("smollm2-135m"))
    requests = demo_requests(args.calls)
    with tempfile.TemporaryDirectory() as tmp:
        zero_adapter(base, Path(tmp) / "adapter")
        tasks = [
            TaskRuntime(
                id=f"t-{shape}",
                output_shape=shape,
                kind="lora",
                base_path=base,
                adapter=Path(tmp) / "adapter",
                head=None,
                pruning=PromptPruning(),
                max_new_tokens=args.cap,
            )
            for shape in requests
        ]
        pool = SpecialistPool(tasks)
        dtype = str(inference_dtype("cpu")).removeprefix("torch.")
        print(
            f"SmolLM2-135M base (zero LoRA), {dtype}, cap {args.cap}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print("| task | mode | valid | ms/token p50 | tokens/answer p50 |")
        print("|---|---|---|---|---|")
        overhead = {}
        for shape, shape_requests in requests.items():
            task_id = f"t-{shape}"
            stats: dict[bool, list] = {True: [], False: []}
            pool.answer(task_id, shape_requests[0])  # warm: compile the grammar, first forward
            for request in shape_requests:
                for constrained in (True, False):
                    pool.constrained[task_id] = constrained
                    a = pool.answer(task_id, request)
                    ok = answer_problem(pool.tasks[task_id], request, a.text, a.message) is None
                    stats[constrained].append(
                        (ok, a.latency_ms / max(a.output_tokens, 1), a.output_tokens)
                    )
            for constrained in (True, False):
                pool.constrained[task_id] = constrained
                first = pool.answer(task_id, shape_requests[0]).text
                print(f"  {shape}, {'constrained' if constrained else 'free'}: {first[:160]!r}")
            for constrained in (True, False):
                rows = stats[constrained]
                valid = sum(ok for ok, _, _ in rows)
                ms = statistics.median(r[1] for r in rows)
                tokens = statistics.median(r[2] for r in rows)
                mode = "constrained" if constrained else "free"
                print(f"| {shape} | {mode} | {valid}/{len(rows)} | {ms:.1f} | {tokens:.0f} |")
            with_, without = (statistics.median(r[1] for r in stats[c]) for c in (True, False))
            overhead[shape] = with_ / without - 1
        for shape, value in overhead.items():
            print(f"{shape}: per-token time constrained vs free {value:+.0%}")
        print(f"unconstrained fallbacks: {pool.unconstrained or 'none'}")


if __name__ == "__main__":
    main()
