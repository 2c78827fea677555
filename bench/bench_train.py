"""Training speed: the CPU recipe in `train.dtype: auto` against the other dtype, and pruning.

Prints, for the same calls in the same run:
1. training tokens/s and peak RSS of `recipes/cpu-smollm2-135m.yaml` with the dtype `auto`
   picks on this machine (bfloat16 where the CPU has avx512_bf16 or AMX, else float32)
   and with the other one, each in its own process so each peak is its own, a fixed
   number of steps each (no time budget, no validation passes); the data: the same
   fireact calls (real ReAct QA steps) for both. `--defaults` adds trl's SFTConfig
   defaults with peft's LoraConfig defaults, as before;
2. what prompt pruning saves on tau-airline (one ~1.3k-token policy + 14 tool schemas in
   every call): prompt tokens per example before and after, per pruning setting.

Run: .venv/bin/python bench/bench_train.py [--steps 4] [--calls 300] [--defaults]
Needs: ../shared/datasets (fireact, tau-airline); the embedded SmolLM2 (materialized on
first use). Takes a few minutes on 2 cores (bf16 on a CPU without it: much longer).
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
    from slmify.models import describe_base, plan_training, resolve_base
    from slmify.recipes import load_recipe
    from slmify.train import lora_config, sft_config

    location = resolve_base("smollm2-135m")
    info = describe_base("smollm2-135m", location, None)
    auto_dtype = plan_training(info, load_recipe("cpu-smollm2-135m"), "cpu").dtype
    dtype = {"auto": auto_dtype, "other": "float32" if auto_dtype == "bfloat16" else "bfloat16"}
    recipe = load_recipe("cpu-smollm2-135m", [f"train.dtype={dtype.get(mode, 'float32')}"])
    tokenizer = AutoTokenizer.from_pretrained(location)
    records = [r for r in read_calls("fireact", 4, calls) if r.response is not None]
    out = Path(tempfile.mkdtemp(prefix=f"bench-train-{mode}-"))
    rows = build_task_dataset(records, tokenizer, recipe.dataset, out)
    torch.set_num_threads(plan_training(info, recipe, "cpu").threads)
    if mode in ("auto", "other"):
        # The dtype is forced here: plan_training would turn bf16 into float32 on a CPU
        # without it, which is the point of auto but not of this comparison.
        model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype[mode]))
        model = get_peft_model(model, lora_config(recipe, model, info.layers))
        train_ds, _ = tokenize_rows(rows["train"], tokenizer, recipe.dataset.max_length, None)
        plan = plan_training(info, recipe, "cpu")
        args = sft_config(recipe, out / "ckpt", plan)
        args.max_steps, args.save_strategy, args.eval_strategy = steps, "no", "no"
        args.load_best_model_at_end = False
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
        "dtype": dtype.get(mode, "float32 (trl bf16 autocast)"),
        "auto_picks": auto_dtype,
        "steps": steps,
        "examples": steps * args.per_device_train_batch_size,
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "s_per_step": round(wall / steps, 2),
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
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--defaults", action="store_true", help="also trl's plain defaults")
    parser.add_argument("--child", choices=["auto", "other", "defaults"])
    a = parser.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.calls)))
        return
    print(f"== training, fireact sample, {a.steps} steps each, one process each ==")
    results = {}
    for mode in ("auto", "other", *(("defaults",) if a.defaults else ())):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(a.steps)]
        done = subprocess.run([*cmd, "--calls", str(a.calls)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    r, o = results["auto"], results["other"]
    print(
        f"tokens/s: auto ({r['dtype']}) {r['tokens_per_s']} vs {o['dtype']} {o['tokens_per_s']} "
        f"({r['tokens_per_s'] / o['tokens_per_s']:.2f}x); s/step {r['s_per_step']} vs "
        f"{o['s_per_step']}; peak RSS MB {r['peak_rss_mb']} vs {o['peak_rss_mb']}"
    )
    if "defaults" in results:
        d = results["defaults"]
        print(f"trl defaults: {d['tokens_per_s']} tokens/s, peak RSS MB {d['peak_rss_mb']}")
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
