"""Why specialists generate in `slmify.models.inference_dtype`: tokens/s of the embedded
SmolLM2-135M in float32 against that dtype, in the same process, greedy, a fixed prompt.

A generated token reads every weight once, so on a CPU the speed follows the bytes read:
bfloat16 halves them where the CPU computes in it natively (avx512_bf16, AMX); elsewhere
inference_dtype stays float32 and both lines print the same dtype.

    .venv/bin/python bench/bench_generate.py [NEW_TOKENS]    # default 64
"""

from __future__ import annotations

import os
import sys
import time

# First: importing slmify quiets the Hugging Face progress bars transformers sets up.
from slmify.models import inference_dtype, resolve_base


def tokens_per_s(model, ids, new_tokens: int) -> float:  # noqa: ANN001
    import torch

    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t0)


def main(new_tokens: int = 64) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(location)
    ids = tokenizer("Write a short story about a cat and a dog. " * 5, return_tensors="pt")
    print(
        f"SmolLM2-135M, prompt {ids['input_ids'].shape[1]} tokens, {new_tokens} new tokens, "
        f"load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}"
    )
    rates = {}
    for dtype in (torch.float32, inference_dtype("cpu")):
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).eval()
        rates[dtype] = tokens_per_s(model, ids, new_tokens)
        print(f"  {str(dtype):15s} {rates[dtype]:6.1f} tokens/s")
    fast = rates[inference_dtype("cpu")]
    print(f"  inference_dtype / float32: {fast / rates[torch.float32]:.2f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
