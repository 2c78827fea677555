"""How fast a specialist answers on this machine: today's path (HF `generate` on the base
with its LoRA adapter unmerged) against the fast path (`slmify.runtime.Specialist`: the
adapter merged, guessed tokens checked in one forward), in the same run, call by call
alternating, so both see the same load; then, with --dtype, why generation runs in
`slmify.models.inference_dtype` (tokens/s of float32 against it).

Default specialist: SmolLM2-135M with a random LoRA shaped like the CPU recipe's (rank 16,
every projection of the top 8 layers; trains nothing), answering the demo's tool-call step
(data/demo/calls.jsonl.gz, system prompt and tool schemas pruned as training does) with the
demo's 38-token cap. A random adapter writes prose, not tool calls, so its guesses hit less
often than a trained one's: --workspace WS --task ID runs a trained specialist on its own
test prompts instead (specialists/ID/dataset/test.jsonl).

Prints per path p50/p99 latency and tokens/s, their ratios, and how many answers are the
same text (and the largest confidence difference): both paths are greedy, and the fast
one sums in another order, which moves bfloat16 log-probabilities slightly.

    nice -n 10 .venv/bin/python bench/bench_generate.py [--calls 20] [--threads N]
        [--workspace WS --task ID] [--float32] [--dtype]

--float32 runs both paths in float32, as on a CPU without native bfloat16 (the AVX2 CPUs
the issue measured on), where merging and guessing are on; in bfloat16 they are off and
the two paths differ only by the decoding loop.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# First: importing slmify quiets the Hugging Face progress bars transformers sets up.
from slmify.models import inference_dtype, resolve_base

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "calls.jsonl.gz"


def random_adapter(location: Path, folder: Path) -> None:
    """A LoRA like the CPU recipe's (r 16, alpha 32, all projections of the top 8 layers)
    with random B, so it changes the model's answers as a trained one would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(location)
    layers = model.config.num_hidden_layers
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=targets,
        layers_to_transform=list(range(layers - 8, layers)),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.002)
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(location).save_pretrained(folder)


def demo_prompts(tokenizer, n: int) -> list[str]:  # noqa: ANN001
    """The demo's tool-call requests as the trained specialist reads them."""
    from slmify.collect import parse_request
    from slmify.datasets import build_prompt
    from slmify.schema import PromptPruning

    prompts = []
    for line in gzip.open(DEMO, "rt"):
        request = json.loads(line)["request"]
        if not request.get("tools") or len(prompts) >= n:
            continue
        pruning = PromptPruning(
            system=request["messages"][0]["content"],
            tools_action="drop",
            tools=[t["function"] for t in request["tools"]],
        )
        prompts.append(build_prompt(tokenizer, parse_request(request), pruning))
    return prompts


def today(spec, prompt: str, cap: int):  # noqa: ANN001, ANN201
    """The path before the fast one: HF generate on the unmerged PeftModel."""
    import torch

    from slmify.runtime import Generation, answer_confidence

    ids = spec.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.inference_mode():
        new, logprobs = spec._generate(spec.model, ids, cap)
    latency_ms = (time.perf_counter() - t0) * 1000
    kept = [lp for lp, t in zip(logprobs, new, strict=False) if t not in spec.stop_ids]
    text = spec.tokenizer.decode(new).split(spec.end, 1)[0].strip()
    return Generation(text, latency_ms, len(new), answer_confidence(kept, "tool_call"))


def summary(name: str, runs: list) -> float:  # noqa: ANN001
    ms = sorted(g.latency_ms for g in runs)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    rate = sum(g.output_tokens for g in runs) / sum(ms) * 1000
    tokens = statistics.median(g.output_tokens for g in runs)
    print(
        f"  {name:36s} p50 {statistics.median(ms):7.0f} ms  p99 {p99:7.0f} ms  "
        f"{rate:6.1f} tokens/s  ({tokens:.0f} tokens per answer)"
    )
    return statistics.median(ms)


def specialists(args: argparse.Namespace) -> None:
    from slmify.runtime import Specialist

    location = resolve_base("smollm2-135m")
    if args.workspace:
        folder = Path(args.workspace) / "specialists" / args.task
        adapter = folder / "adapter"
        test = (folder / "dataset" / "test.jsonl").read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in test][: args.calls]
        what = f"trained {args.task}"
    else:
        adapter = Path(tempfile.mkdtemp(prefix="slmify-bench-lora-"))
        random_adapter(location, adapter)
        what = "random LoRA"
    slow = Specialist(location, adapter, args.cap)
    fast = Specialist(location, adapter, args.cap, merge=True)
    if not args.workspace:
        prompts = demo_prompts(fast.tokenizer, args.calls)
    import torch

    import slmify.models

    dtype = slmify.models.inference_dtype("cpu")  # --float32 replaces it
    print(
        f"SmolLM2-135M + {what}, {len(prompts)} calls, cap {args.cap} tokens, {dtype}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    today(slow, prompts[0], 4)  # warm-up
    fast.answer(prompts[0], True, 4)
    pairs = [(today(slow, p, args.cap), fast.answer(p, True)) for p in prompts]
    before = summary("today: generate, LoRA unmerged", [a for a, _ in pairs])
    after = summary("fast: merged, guessed tokens checked", [b for _, b in pairs])
    same = sum(a.text == b.text for a, b in pairs)
    gap = max(abs(a.confidence - b.confidence) for a, b in pairs)
    print(f"  p50 today / fast: {before / after:.2f}x")
    print(f"  same answer text: {same} of {len(pairs)}; largest confidence difference {gap:.4f}")


def tokens_per_s(model, ids, new_tokens: int) -> float:  # noqa: ANN001
    import torch

    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t0)


def dtypes(new_tokens: int = 64) -> None:
    """A generated token reads every weight once, so on a CPU the speed follows the bytes
    read: bfloat16 halves them where the CPU computes in it natively (avx512_bf16, AMX);
    elsewhere inference_dtype stays float32 and both lines print the same dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(location)
    ids = tokenizer("Write a short story about a cat and a dog. " * 5, return_tensors="pt")
    print(f"SmolLM2-135M, prompt {ids['input_ids'].shape[1]} tokens, {new_tokens} new tokens")
    rates = {}
    for dtype in (torch.float32, inference_dtype("cpu")):
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).eval()
        rates[dtype] = tokens_per_s(model, ids, new_tokens)
        print(f"  {str(dtype):15s} {rates[dtype]:6.1f} tokens/s")
    fast = rates[inference_dtype("cpu")]
    print(f"  inference_dtype / float32: {fast / rates[torch.float32]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--cap", type=int, default=38, help="max new tokens (the demo's call)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--workspace", help="a workspace with a trained specialist")
    parser.add_argument("--task", help="its task id (with --workspace)")
    parser.add_argument("--dtype", action="store_true", help="also float32 vs inference_dtype")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="generate in float32 as a CPU without native bfloat16 (AVX2) does",
    )
    args = parser.parse_args()
    if args.float32:
        import torch

        import slmify.models

        slmify.models.inference_dtype = lambda device: torch.float32
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    specialists(args)
    if args.dtype:
        dtypes()


if __name__ == "__main__":
    main()
