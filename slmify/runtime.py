"""The model runtime shared by eval and serve: a base model with LoRA adapters that answers
greedily with a confidence taken from its own probabilities, and the text encoder that
scores free-text answers.

Reads a base model folder and an adapter folder (peft `save_pretrained`); writes nothing.
Eval and serve both answer through `Specialist.answer`, so a served answer and its
confidence are exactly what eval measured and calibrated.

Confidence of one answer, from the probabilities of the tokens generated (cheap: the
logits are there anyway while generating greedily):
- tool calls, JSON and labels: the lowest probability of any generated token. A trained
  specialist writes its format tokens (`<tool_call>`, braces, key names) at nearly 1, so
  the minimum is set by the tokens that decide the answer: the tool's name, an argument
  value, the label;
- free text: the length-normalised sequence probability (the geometric mean of the
  tokens' probabilities), since one unusual word does not make a reply wrong.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmify.schema import OutputShape


@dataclass(frozen=True)
class Generation:
    """A greedy answer: its text (cut at the end of turn), cost and confidence."""

    text: str
    latency_ms: float
    output_tokens: int
    confidence: float


def answer_confidence(token_logprobs: list[float], shape: OutputShape) -> float:
    """The confidence of an answer of `shape` from its tokens' log-probabilities."""
    if not token_logprobs:
        return 0.0
    if shape == "text":
        return math.exp(sum(token_logprobs) / len(token_logprobs))
    return math.exp(min(token_logprobs))


class Specialist:
    """A base model with a task's LoRA adapter; `answer` runs with or without it."""

    def __init__(self, location: Path | str, adapter: Path, max_new_tokens: int):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from slmify.datasets import turn_end
        from slmify.models import inference_dtype

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        dtype = inference_dtype(self.device)
        base = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        self.model = PeftModel.from_pretrained(base, str(adapter)).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.end = turn_end(self.tokenizer)
        end_ids = self.tokenizer(self.end, add_special_tokens=False)["input_ids"]
        eos = {self.tokenizer.eos_token_id} | ({end_ids[0]} if len(end_ids) == 1 else set())
        self.stop_ids = sorted(i for i in eos if i is not None)
        self.stop: dict[str, Any] = {"eos_token_id": self.stop_ids}
        if len(end_ids) != 1:
            self.stop |= {"stop_strings": [self.end], "tokenizer": self.tokenizer}

    def answer(
        self,
        prompt: str,
        use_adapter: bool,
        max_new_tokens: int | None = None,
        shape: OutputShape = "tool_call",
    ) -> Generation:
        """The greedy answer to `prompt` (at most `max_new_tokens`, else the evaluation's
        cap), with its confidence as an answer of `shape`."""
        import torch

        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.device)
        switch = contextlib.nullcontext() if use_adapter else self.model.disable_adapter()
        t0 = time.perf_counter()
        with switch, torch.inference_mode():
            out = self.model.generate(
                **ids,
                max_new_tokens=max_new_tokens or self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.stop_ids[0],
                output_scores=True,
                return_dict_in_generate=True,
                **self.stop,
            )
        latency_ms = (time.perf_counter() - t0) * 1000
        new = out.sequences[0, ids["input_ids"].shape[1] :]
        logprobs = [
            float(torch.log_softmax(step[0].float(), dim=-1)[token])
            for step, token in zip(out.scores, new.tolist(), strict=False)
            if token not in self.stop_ids
        ]
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        text = text.split(self.end, 1)[0]
        if self.tokenizer.eos_token:
            text = text.split(self.tokenizer.eos_token, 1)[0]
        return Generation(
            text=text.strip(),
            latency_ms=latency_ms,
            output_tokens=int(new.shape[0]),
            confidence=answer_confidence(logprobs, shape),
        )


class TextEncoder:
    """MiniLM from its embedded weight package (never the network), loaded on first use:
    tasks answered only with tool calls, JSON or labels never need it."""

    def __init__(self) -> None:
        self.model: Any = None

    def encode(self, texts: list[str]) -> Any:
        if self.model is None:
            from slmify.embed import Embedder

            self.model = Embedder()
        return self.model.encode(texts)
