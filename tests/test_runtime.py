"""The specialist runtime's fast path gives the greedy answers of today's path (HF
`generate` on the base with its LoRA unmerged): the decoding loop exactly, merging and
guessed tokens to 1e-3 in confidence where they are on (float32), and off in bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmify.runtime import Specialist, draft_tokens, greedy_decode

PROMPTS = [
    "<|im_start|>user\nWhere is order AC-342703? It never arrived.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nPlease cancel AC-935146, I no longer need it.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nMy Desk Lamp came broken (order #AC-715517).<|im_end|>\n"
    "<|im_start|>assistant\n",
]
CAP = 12


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA on every projection of the tiny base, large enough to change answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    torch.manual_seed(1)  # before peft draws lora_A: the same adapter whatever ran before
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    folder = tmp_path_factory.mktemp("random-lora")
    peft_model.save_pretrained(folder)
    return folder


def _dtype(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Generate in `name` whatever this CPU computes natively (`Specialist` reads it)."""
    import torch

    monkeypatch.setattr("slmify.models.inference_dtype", lambda device: getattr(torch, name))


def _today(spec: Specialist, prompt: str, use_adapter: bool = True) -> tuple[list, list]:
    """Today's path: HF generate on the unmerged PeftModel, as `answer` ran it before."""
    import contextlib

    import torch

    ids = spec.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    switch = contextlib.nullcontext() if use_adapter else spec.model.disable_adapter()
    with switch, torch.inference_mode():
        return spec._generate(spec.model, ids, CAP)


def _forwards(model) -> tuple[list[int], object]:  # noqa: ANN001
    """A list that grows by one per forward of `model` from now on, and the hook."""
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


def test_draft_tokens_follow_the_longest_recent_match() -> None:
    # In the tokens themselves: what followed the last earlier "1 2 3".
    assert draft_tokens([1, 2, 3, 9, 9, 1, 2, 3], []) == [9, 9, 1, 2, 3]
    # A longer match in memory beats a shorter one; the newest memory first.
    assert draft_tokens([5, 6, 7], [[1, 6, 7, 8, 8], [0, 7, 4]]) == [8, 8]
    assert draft_tokens([5, 6, 7], [[0, 7, 4], [2, 7, 3]]) == [3]
    assert draft_tokens([5, 6, 7], [[1, 6, 7, 8, 8]], k=1) == [8]
    # Nothing matches, or the match has nothing after it: no guess.
    assert draft_tokens([5, 6, 7], [[7]]) == [] and draft_tokens([5], []) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoding_loop_is_hf_generate_exactly(
    tiny_base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    import torch

    _dtype(monkeypatch, dtype)
    spec = Specialist(tiny_base, adapter, CAP)
    for prompt in PROMPTS:
        ids = spec.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            loop = greedy_decode(spec.model, ids["input_ids"], CAP, spec.stop_ids)
        assert loop == _today(spec, prompt)  # same tokens, bit-identical log-probabilities


def test_merged_and_guessing_answer_as_today_in_float32(
    tiny_base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slmify.runtime import answer_confidence

    _dtype(monkeypatch, "float32")
    today = Specialist(tiny_base, adapter, CAP)
    fast = Specialist(tiny_base, adapter, CAP, merge=True)
    assert fast.merged and not hasattr(fast.model, "disable_adapter")  # a plain model
    calls, _ = _forwards(fast.model)
    rounds = []
    # Round 1 guesses from the prompt only; round 2 also from round 1's answers.
    for _ in range(2):
        before = len(calls)
        for prompt in PROMPTS:
            new, logprobs = _today(today, prompt)
            kept = [lp for lp, t in zip(logprobs, new, strict=True) if t not in today.stop_ids]
            text = today.tokenizer.decode(new).split(today.end, 1)[0].strip()
            got = fast.answer(prompt, True, CAP)
            assert (got.text, got.output_tokens) == (text, len(new))
            assert got.confidence == pytest.approx(answer_confidence(kept, "tool_call"), abs=1e-3)
            assert got.confidence > 0
        rounds.append(len(calls) - before)
    # Guesses checked in one forward: fewer forwards than tokens, fewer still remembering.
    assert rounds[1] <= rounds[0] < sum(fast.answer(p, True).output_tokens for p in PROMPTS)
    # A prompt answered just before: the prefill, then its whole answer checked at once.
    before = len(calls)
    fast.answer(PROMPTS[-1], True, CAP)
    assert len(calls) - before == 2
    # The base alone (eval's comparison) is the unmerged model with its adapter off.
    for prompt in PROMPTS:
        base = fast.answer(prompt, False, CAP)
        new, _ = _today(today, prompt, use_adapter=False)
        assert base.text == today.tokenizer.decode(new).split(today.end, 1)[0].strip()
    assert any(fast.answer(p, False).text != fast.answer(p, True).text for p in PROMPTS)


def test_bfloat16_keeps_the_adapter_unmerged_and_one_token_per_forward(
    tiny_base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dtype(monkeypatch, "bfloat16")
    spec = Specialist(tiny_base, adapter, CAP, merge=True)
    assert not spec.merged and spec.model.get_base_model().dtype.is_floating_point
    for _ in range(2):
        for prompt in PROMPTS:
            calls, hook = _forwards(spec.model.get_base_model())
            got = spec.answer(prompt, True, CAP)
            hook.remove()
            new, _ = _today(spec, prompt)
            assert got.output_tokens == len(new) == len(calls)  # one forward a token
            assert got.text == spec.tokenizer.decode(new).split(spec.end, 1)[0].strip()
