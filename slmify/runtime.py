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

Speed on a CPU (bench/bench_generate.py prints today's path against this one). A token of
a 135M model is ~320 matrix-vector products reading every weight once: memory-bound, so
checking 16 guessed tokens in one forward costs ~1.5x one token (`greedy_decode`). The
guesses (`draft_tokens`) are what followed the same last tokens in the prompt (an order id
the answer copies) or in this adapter's recent answers (the tool call's fixed format); the
model's own greedy choice at each position decides, so the answer is the greedy answer
whatever the guesses. A base serving one adapter has it merged into its weights: no LoRA
matmuls per layer. Both only reorder sums, which float32 absorbs (same answers, same
log-probabilities to 1e-5: CPUs without native bfloat16, such as AVX2 ones) and bfloat16
does not (measured on SmolLM2 with a LoRA: a merged adapter changed 4 of 8 greedy
answers, guessing 2 of 8), so in bfloat16 both are off and each token is one forward, as
HF `generate` computes it. The loop replaces `generate` either way (its per-token
overhead is ~2%), except for a template whose end of turn is several tokens (stop
strings). Threads: with other busy processes on the same 2 cores, torch's second thread
makes each bfloat16 matmul wait for a core (38 tokens: 16-39 s at 2 threads, 2.4 s at 1,
at nice 10 beside two busy processes); set OMP_NUM_THREADS=1 for serve on a shared box.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmify.schema import OutputShape

DRAFT_TOKENS = 16  # guessed tokens checked per forward: ~1.5x one token's cost on a CPU
DRAFT_NGRAM = 3  # the longest run of last tokens looked up to guess what follows
REMEMBERED_ANSWERS = 32  # recent answers per adapter searched for guesses


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


def turn_stops(tokenizer: Any) -> tuple[str, list[int], bool]:
    """Where an answer ends: the template's end of turn (`<|im_end|>`), the token ids that
    stop generating (EOS, and the end of turn when it is one token), and whether the end
    of turn is several tokens (then only a stop string finds it)."""
    from slmify.datasets import turn_end

    end = turn_end(tokenizer)
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"]
    eos = {tokenizer.eos_token_id} | ({end_ids[0]} if len(end_ids) == 1 else set())
    return end, sorted(i for i in eos if i is not None), len(end_ids) != 1


def cut_at_turn_end(text: str, end: str, eos_token: str | None) -> str:
    """A generated text up to the end of turn or EOS, stripped: the answer."""
    text = text.split(end, 1)[0]
    if eos_token:
        text = text.split(eos_token, 1)[0]
    return text.strip()


def draft_tokens(tokens: list[int], memory: Any, k: int = DRAFT_TOKENS) -> list[int]:
    """Up to `k` tokens guessed to follow `tokens`: what followed the longest match (up to
    DRAFT_NGRAM tokens) of its last tokens, looked up in `tokens` themselves (latest first)
    and then in the remembered sequences of `memory` (newest first). Empty: no guess."""
    best: list[int] = []
    best_n = 0
    for source in [tokens, *reversed(memory)]:
        for j in range(len(source) - 2, -1, -1):  # a match ending at j, a guess from j + 1
            if source[j] != tokens[-1]:
                continue
            n = 1
            while n < min(DRAFT_NGRAM, j + 1, len(tokens)) and source[j - n] == tokens[-1 - n]:
                n += 1
            if n > best_n:
                best, best_n = list(source[j + 1 : j + 1 + k]), n
                if n == DRAFT_NGRAM:
                    return best
    return best


def greedy_decode(
    model: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    stop_ids: list[int],
    memory: Any = None,
    grammar: Any = None,
) -> tuple[list[int], list[float]]:
    """The greedy continuation of `prompt_ids` (stopping after a stop id or at the cap) and
    each generated token's log-probability under the model, stop tokens included; with a
    `grammar` (slmify.constrained.TokenMask), the likeliest token it allows.

    Each forward feeds the last chosen token and a guess of the next ones; the model's
    argmax at every position is the token chosen there, so guesses are kept up to the
    first one it would not have chosen, and the cache is cut back to what was kept. The
    positions are read in order, so the grammar has accepted exactly the tokens before
    each one it masks."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # memory None: one token per forward. A sliding-window cache cannot be cut back.
    speculate = memory is not None and all(
        type(layer).__name__ == "DynamicLayer" for layer in cache.layers
    )
    tokens = prompt_ids[0].tolist()
    fed = prompt_ids
    out_tokens: list[int] = []
    logprobs: list[float] = []
    while True:
        room = max_new_tokens - len(out_tokens) - 1  # the token after the guesses counts too
        guess = draft_tokens(tokens, memory)[:room] if speculate and out_tokens else []
        if guess:
            fed = torch.tensor([[tokens[-1], *guess]], device=prompt_ids.device)
        mask = torch.ones(1, len(tokens) + len(guess), dtype=torch.long, device=fed.device)
        logits = (
            model(input_ids=fed, cache=cache, attention_mask=mask, logits_to_keep=len(guess) + 1)
            .logits[0]
            .float()
        )
        chosen = logits.argmax(dim=-1).tolist() if grammar is None else None
        kept = 0
        for position in range(len(guess) + 1):
            # Masked, the probabilities are over what the grammar allows (a forced token is
            # certain), as vLLM computes them under the same grammar (slmify.backends).
            row = logits[position] if grammar is None else grammar.allowed(logits[position])
            token = chosen[position] if chosen else int(row.argmax())
            out_tokens.append(token)
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(row, dim=-1)[token]))
            refused = grammar is not None and not grammar.accept(token)  # at a dead end
            done = token in stop_ids or len(out_tokens) >= max_new_tokens or refused
            if done or position == len(guess) or guess[position] != token:
                break
            kept += 1
        if done:
            return out_tokens, logprobs
        cache.crop(-(len(guess) - kept))  # the guesses after the first miss were wrong
        fed = torch.tensor([[tokens[-1]]], device=prompt_ids.device)


class Specialist:
    """A base model with LoRA adapters (the task's is `default`); `answer` runs with or
    without the selected one. `merge`: the base serves this one adapter only, so in float32
    it is folded into the weights; the plain base is then loaded on first use without it."""

    remote = False  # generates here, under the pool's lock (see slmify.backends for remote)

    def __init__(
        self, location: Path | str, adapter: Path, max_new_tokens: int, merge: bool = False
    ):
        import torch
        from peft import PeftModel
        from transformers import AutoTokenizer

        from slmify.models import inference_dtype

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.location = location
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        base = self._load_base()
        self.model = PeftModel.from_pretrained(base, str(adapter)).to(self.device).eval()
        # Merging and guessing change the order of summation: harmless in float32 (the same
        # answers, log-probabilities within 1e-5), not in bfloat16, whose 8-bit mantissa
        # rounds most of a LoRA delta away when merged and flips near-tied tokens.
        self.exact_reorder = inference_dtype(self.device) == torch.float32
        self.merged = merge and self.exact_reorder
        if self.merged:
            self.model = self.model.merge_and_unload()
        self._base: Any = None
        self._grammars: Any = None
        self.adapter = "default"  # PeftModel.from_pretrained's name for the first adapter
        self.memory: dict[str, deque[list[int]]] = {}  # recent answers per adapter
        self.max_new_tokens = max_new_tokens
        self.end, self.stop_ids, several = turn_stops(self.tokenizer)
        self.stop: dict[str, Any] = {"eos_token_id": self.stop_ids}
        # Several tokens of end of turn: the grammar writes it, so that the stop string, not
        # an EOS the model was never taught to write, ends a constrained answer.
        self.grammar_end = self.end if several else None
        if several:
            self.stop |= {"stop_strings": [self.end], "tokenizer": self.tokenizer}

    def _load_base(self) -> Any:
        from transformers import AutoModelForCausalLM

        from slmify.models import inference_dtype

        dtype = inference_dtype(self.device)
        model = AutoModelForCausalLM.from_pretrained(self.location, dtype=dtype)
        return model.to(self.device).eval()

    @property
    def grammars(self) -> Any:
        """This tokenizer's `slmify.constrained.Grammars`, built on first use."""
        if self._grammars is None:
            from slmify.constrained import Grammars

            vocab = self.model.config.vocab_size
            self._grammars = Grammars(self.tokenizer, vocab, self.stop_ids)
        return self._grammars

    @property
    def context_window(self) -> int:
        """The most tokens a prompt and its answer may hold together."""
        return self.model.config.max_position_embeddings

    def add_adapter(self, adapter: Path, name: str) -> None:
        """Attach another adapter to this base (peft `load_adapter`), selected by `name`."""
        if self.merged:
            raise ValueError(f"{self.location}: a merged base serves one adapter only")
        self.model.load_adapter(str(adapter), adapter_name=name)

    def select(self, name: str) -> None:
        """Make `name` the adapter `answer` uses (callers hold the pool's lock)."""
        if not self.merged:
            self.model.set_adapter(name)
        self.adapter = name

    def _model_for(self, use_adapter: bool) -> tuple[Any, Any]:
        """The model to run and the context to run it in, with or without the adapter."""
        if use_adapter:
            return self.model, contextlib.nullcontext()
        if not self.merged:
            return self.model, self.model.disable_adapter()
        if self._base is None:  # eval's base comparison: the weights without the adapter
            self._base = self._load_base()
        return self._base, contextlib.nullcontext()

    def answer(
        self,
        prompt: str,
        use_adapter: bool,
        max_new_tokens: int | None = None,
        shape: OutputShape = "tool_call",
        grammar: dict[str, Any] | None = None,
    ) -> Generation:
        """The greedy answer to `prompt` (at most `max_new_tokens`, else the evaluation's
        cap), with its confidence as an answer of `shape`; under `grammar` (a structural
        tag, slmify.constrained; GrammarError when it does not compile) when given."""
        import torch

        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.device)
        cap = max_new_tokens or self.max_new_tokens
        model, switch = self._model_for(use_adapter)
        # The base alone has nothing to remember: its answers are not the adapter's format.
        memory = self.memory.setdefault(
            self.adapter if use_adapter else "", deque(maxlen=REMEMBERED_ANSWERS)
        )
        t0 = time.perf_counter()  # compiling a grammar counts: a first call pays it
        mask = self.grammars.matcher(grammar) if grammar else None
        with switch, torch.inference_mode():
            if "stop_strings" in self.stop:  # an end of turn of several tokens: HF's matcher
                new, logprobs = self._generate(model, ids, cap, mask)
            else:
                guesses = memory if self.exact_reorder else None
                new, logprobs = greedy_decode(
                    model, ids["input_ids"], cap, self.stop_ids, guesses, mask
                )
        latency_ms = (time.perf_counter() - t0) * 1000
        if use_adapter:
            memory.append(ids["input_ids"][0, -DRAFT_NGRAM:].tolist() + new)
        kept = [lp for lp, token in zip(logprobs, new, strict=False) if token not in self.stop_ids]
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        return Generation(
            text=cut_at_turn_end(text, self.end, self.tokenizer.eos_token),
            latency_ms=latency_ms,
            output_tokens=len(new),
            confidence=answer_confidence(kept, shape),
        )

    def _generate(
        self, model: Any, ids: Any, cap: int, mask: Any = None
    ) -> tuple[list[int], list[float]]:
        """HF `generate`, greedy (under `mask`'s grammar when given): the new tokens and
        their log-probabilities, masked as in `greedy_decode`."""
        import torch

        processors = [_MaskProcessor(mask)] if mask is not None else []
        out = model.generate(
            **ids,
            max_new_tokens=cap,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.stop_ids[0],
            logits_processor=processors,
            output_scores=True,
            return_dict_in_generate=True,
            **self.stop,
        )
        new = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
        logprobs = [
            float(torch.log_softmax(step[0].float(), dim=-1)[token])
            for step, token in zip(out.scores, new, strict=False)
        ]
        return new, logprobs


class _MaskProcessor:
    """A `TokenMask` as an HF logits processor (batch of one): it accepts the token chosen
    at the previous step, then masks this one. xgrammar's own (contrib.hf) asserts on a
    refused token; here the matcher just stops advancing and validation judges the answer."""

    def __init__(self, mask: Any):
        self.mask = mask
        self.steps = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.steps:
            self.mask.accept(int(input_ids[0, -1]))
        self.steps += 1
        if self.mask.finished:
            return scores
        return self.mask.allowed(scores[0].float()).to(scores.dtype).unsqueeze(0)


class TextEncoder:
    """MiniLM from its embedded weight package (never the network), loaded on first use:
    tasks answered only with tool calls, JSON or labels never need it."""

    def __init__(self) -> None:
        self.model: Any = None

    def encode(self, texts: list[str]) -> Any:
        if self.model is None:
            from slmify.embed import Embedder

            # 256 word pieces, as sentence-transformers loads this model by default.
            self.model = Embedder(max_seq_length=256)
        return self.model.encode(texts)
