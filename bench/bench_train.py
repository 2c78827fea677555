"""Training speed and memory: the CPU recipe vs trl's plain defaults, and prompt pruning.

Prints, for the same calls in the same run:
1. training tokens/s and peak RSS of `recipes/cpu-smollm2-135m.yaml` (bf16, top-8-layer
   LoRA, length-grouped batches, max_length 384) and of trl's SFTConfig defaults with
   peft's LoraConfig defaults (float32 weights under trl's default bf16 autocast, r=8 on
   q/v of every layer, batch 8, max_length 1024; only `use_cpu` set, without which they
   refuse to start), each in its own process so each peak is its own; the data: the same
   fireact calls (real ReAct QA steps) for both;
2. what prompt pruning saves on tau-airline (one ~1.3k-token policy + 14 tool schemas in
   every call): prompt tokens per example before and after, per pruning setting.

Run: .venv/bin/python bench/bench_train.py [--steps 2] [--calls 300]
Needs: ../shared/datasets (fireact, tau-airline); the embedded SmolLM2 (materialized on
first use). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def read_calls(name: str, every: int, limit: int) -> list:
    import tempfile

    from slmify.collect import import_files
    from slmify.store import open_store

    folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    sample = folder / "sample.jsonl"
    with gzip.open(DATASETS / name / "calls.jsonl.gz", "rt") as f, sample.open("w") as out:
        kept = [line for i, line in enumerate(f) if i % every == 0][:limit]
        out.writelines(kept)
    with open_store(str(folder / "calls.db")) as st:
        import_files(st, [sample], folder / "rejects.jsonl", progress=False)
        return [s.record for s in st.iter_calls()]


def run_one(mode: str, steps: int, calls: int) -> dict:
    """One training run in this process; prints one JSON line for the parent."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from slmify.datasets import build_task_dataset, tokenize_rows
    from slmify.models import TrainPlan, resolve_base
    from slmify.recipes import load_recipe
    from slmify.train import lora_config, sft_config

    recipe = load_recipe("cpu-smollm2-135m", [f"train.max_steps={steps}"])
    location = resolve_base(recipe.model.base)
    tokenizer = AutoTokenizer.from_pretrained(location)
    records = [r for r in read_calls("fireact", 4, calls) if r.response is not None]
    out = Path(tempfile.mkdtemp(prefix=f"bench-train-{mode}-"))
    rows = build_task_dataset(records, tokenizer, recipe.dataset, out)
    if mode == "recipe":
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.bfloat16)
        model = get_peft_model(model, lora_config(recipe, model, 30))
        train_ds, _ = tokenize_rows(rows["train"], tokenizer, recipe.dataset.max_length, None)
        plan = TrainPlan("cpu", "bfloat16", 2, 4, ())
        args = sft_config(recipe, out / "ckpt", plan)
        args.save_strategy = "no"
    else:  # what a user gets from trl and peft with no settings beyond the step count
        from datasets import Dataset

        model = AutoModelForCausalLM.from_pretrained(location)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
        train_ds = Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows["train"]]
        )
        args = SFTConfig(
            output_dir=str(out / "ckpt"),
            max_steps=steps,
            use_cpu=True,  # the defaults refuse to start on a machine without a GPU
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "mode": mode,
        "steps": steps,
        "examples": steps * args.per_device_train_batch_size,
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "s_per_example": round(wall / (steps * args.per_device_train_batch_size), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def pruning_savings(calls: int) -> list[dict]:
    from transformers import AutoTokenizer

    from slmify.datasets import build_prompt, find_pruning
    from slmify.models import resolve_base
    from slmify.recipes import PruneConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_base("smollm2-135m"))
    records = read_calls("tau-airline", 8, calls)
    results = []
    for system, tools in (
        ("keep", "keep"),
        ("drop", "keep"),
        ("drop", "compact"),
        ("drop", "drop"),
    ):
        pruning = find_pruning(records, PruneConfig(system=system, tools=tools))
        lengths = [
            len(tokenizer(build_prompt(tokenizer, r.request, pruning))["input_ids"])
            for r in records
        ]
        results.append(
            {
                "system": system,
                "tools": tools,
                "calls": len(records),
                "prompt_tokens_mean": round(sum(lengths) / len(lengths)),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--child", choices=["recipe", "defaults"])
    a = parser.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.calls)))
        return
    print(f"== training, fireact sample, {a.steps} steps each, one process each ==")
    results = []
    for mode in ("recipe", "defaults"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--steps",
            str(a.steps),
            "--calls",
            str(a.calls),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    r, d = results
    print(
        f"tokens/s: recipe {r['tokens_per_s']} vs trl defaults {d['tokens_per_s']} "
        f"({r['tokens_per_s'] / d['tokens_per_s']:.1f}x); s/example: {r['s_per_example']} "
        f"vs {d['s_per_example']}; peak RSS MB: {r['peak_rss_mb']} vs {d['peak_rss_mb']}"
    )
    print("== prompt pruning, tau-airline sample (every 8th call) ==")
    rows = pruning_savings(a.calls)
    base = rows[0]["prompt_tokens_mean"]
    for row in rows:
        saved = 1 - row["prompt_tokens_mean"] / base
        print(
            f"system={row['system']:<4} tools={row['tools']:<7} prompt tokens/example "
            f"{row['prompt_tokens_mean']:>6} ({saved:.0%} saved, {row['calls']} calls)"
        )


if __name__ == "__main__":
    main()
