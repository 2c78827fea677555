"""Agreement per context policy on tau-airline: what a specialist should read of a long chat.

tau-airline's prompts average ~3k tokens (a GPT-4o agent's whole conversation); the CPU
recipe reads at most 1024. For the tools the LLM calls most (one task per tool: the calls
it answered with that one tool call), and for each context policy, this trains a SmolLM2
LoRA specialist with the CPU recipe (a --minutes budget per task) and prints, on the
task's validation split: examples left out for length, mean prompt tokens, and exact-call
agreement (tool name and arguments equal to the LLM's), greedy, unconstrained.

Run:   nice -n 10 .venv/bin/python bench/bench_context.py [--tasks 2] [--minutes 1] [--limit 12]
Needs: ../shared/datasets/tau-airline; the embedded SmolLM2 (materialized on first use).
Takes about tasks x policies x (minutes + 1) minutes on 2 cores: ~12 min with the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import read_calls  # noqa: E402

POLICIES = {
    "last 2 turns": ["dataset.context.max_turns=2", "dataset.context.max_tokens=null"],
    "last 4 turns": ["dataset.context.max_turns=4", "dataset.context.max_tokens=null"],
    "512 tokens (default)": [],
}


def tool_of(call) -> str | None:  # noqa: ANN001
    """The one tool the LLM called in its answer, if it called exactly one."""
    calls = (call.response.message.get("tool_calls") or []) if call.response else []
    return calls[0]["function"]["name"] if len(calls) == 1 else None


def agreement(folder: Path, calls: list, location: Path, tokenizer, limit: int) -> dict:  # noqa: ANN001
    """Exact-call agreement of the specialist in `folder` on its validation calls."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmify.datasets import build_prompt, parse_output, turn_end
    from slmify.metrics import score_tool_calls
    from slmify.models import inference_dtype
    from slmify.schema import PromptPruning

    pruning = PromptPruning.model_validate_json((folder / "pruning.json").read_text())
    ids = json.loads((folder / "splits.json").read_text())["validation"][:limit]
    by_id = {c.id: c for c in calls}
    base = AutoModelForCausalLM.from_pretrained(location, dtype=inference_dtype("cpu"))
    model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    end, agree, start = turn_end(tokenizer), 0, time.perf_counter()
    for cid in ids:
        call = by_id[cid]
        prompt = build_prompt(tokenizer, call.request, pruning)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=96, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        parsed = parse_output(text.split(end, 1)[0], call.offered_tools())
        agree += score_tool_calls(call.response.message, parsed, call.offered_tools()).agree
    return {"calls": len(ids), "agree": agree, "gen_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2, help="the N most called tools")
    parser.add_argument("--minutes", type=float, default=1.0, help="train budget per task")
    parser.add_argument("--limit", type=int, default=12, help="validation calls generated")
    a = parser.parse_args()

    from transformers import AutoTokenizer

    from slmify.models import describe_base, plan_training, resolve_base
    from slmify.recipes import load_recipe
    from slmify.schema import TaskCluster
    from slmify.train import train_task

    calls = [c for c in read_calls("tau-airline", 1, 10**6) if c.response is not None]
    counts = Counter(t for c in calls if (t := tool_of(c)))
    location = resolve_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(location)
    info = describe_base("smollm2-135m", location, None)
    print(f"== tau-airline: {len(calls)} calls; tools called most: {counts.most_common(6)} ==")
    for tool, n in counts.most_common(a.tasks):
        mine = [c for c in calls if tool_of(c) == tool]
        task = TaskCluster(id=f"t-{tool}", label=tool, output_shape="tool_call", calls=n, share=0)
        for name, sets in POLICIES.items():
            # A LoRA whatever the task: a field head reads no context policy.
            overrides = [f"train.max_minutes={a.minutes}", "structured.specialist=lora", *sets]
            recipe = load_recipe("cpu-smollm2-135m", overrides)
            plan = plan_training(info, recipe, "cpu")
            out = Path(tempfile.mkdtemp(prefix="bench-context-"))
            result = train_task(task, mine, recipe, info, tokenizer, plan, out)
            if result.status != "trained":
                print(f"{tool:<26} {name:<22} skipped: {result.reason}")
                continue
            m = result.metrics
            long = sum(m["dropped_too_long"].values())
            score = agreement(out, mine, location, tokenizer, a.limit)
            print(
                f"{tool:<26} {name:<22} calls {n:>4}  too long {long:>3}"
                f"  prompt tokens {m['prompt_tokens_mean']:>6.0f}  steps {m['steps']:>3}"
                f"  val loss {m['base_validation_loss']:.3f}->{m['validation_loss']:.3f}"
                f"  exact calls {score['agree']}/{score['calls']}"
            )


if __name__ == "__main__":
    main()
