"""Agreement metrics (S6): how close a model's answer is to the LLM's, by the answer's shape.

Pure functions on OpenAI assistant messages; `slmify eval` calls `score_answer` on every
test call and writes the figures it returns per call. The LLM's answer picks the metrics:

- tool calls: tool name accuracy, arguments exact match, per-argument F1, and whether the
  arguments validate against the offered tool's JSON schema. A tool that was not offered
  is wrong, whatever its arguments;
- JSON: parses, same keys, share of values that match;
- short labels: normalized exact match;
- free text: MiniLM embedding cosine and ROUGE-L F1, averaged.

Nothing here reads or writes files; the text encoder is any object with
`encode(texts) -> ndarray` (a sentence-transformers model in practice).
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

import numpy as np

from slmify.schema import AnswerScore, message_text, message_tool_calls
from slmify.shapes import answer_shape, parse_json

_WORD = re.compile(r"\w+", re.UNICODE)


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


def score_answer(
    reference: dict[str, Any],
    prediction: dict[str, Any],
    offered_tools: list[dict[str, Any]],
    encoder: Encoder | None,
) -> AnswerScore:
    """Score `prediction` against the LLM's `reference` answer to the same call.

    `encoder` is needed only when the reference is free text.
    """
    shape = answer_shape(reference)
    if shape == "tool_call":
        return score_tool_calls(reference, prediction, offered_tools)
    ref_text = message_text(reference.get("content"))
    # Answering with a tool call where the LLM answered in words is a disagreement.
    pred_text = "" if message_tool_calls(prediction) else message_text(prediction.get("content"))
    if shape == "json":
        return score_json(ref_text, pred_text)
    if shape == "label":
        return score_label(ref_text, pred_text)
    if encoder is None:
        raise ValueError("scoring a free-text answer needs a text encoder")
    return score_text(ref_text, pred_text, encoder)


# -- tool calls ---------------------------------------------------------------------------


def _arguments(raw: Any) -> dict[str, Any] | None:
    """Tool-call arguments as a dict: they arrive as a JSON string or already parsed."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _argument_items(calls: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    items = []
    for call in calls:
        args = _arguments(call["arguments"]) or {}
        items += [(call["name"], k, _canonical(v)) for k, v in args.items()]
    return items


def argument_f1(reference: list[dict[str, Any]], prediction: list[dict[str, Any]]) -> float:
    """F1 over (tool, argument, value) items; 1.0 when both sides have none and match."""
    ref, pred = _argument_items(reference), _argument_items(prediction)
    if not ref and not pred:
        return float(sorted(c["name"] for c in reference) == sorted(c["name"] for c in prediction))
    common = 0
    remaining = list(pred)
    for item in ref:
        if item in remaining:
            remaining.remove(item)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def schema_valid(call: dict[str, Any], offered: dict[str, dict[str, Any]]) -> bool:
    """Whether a call names an offered tool and its arguments validate against its schema."""
    from jsonschema import validators

    spec = offered.get(call["name"])
    args = _arguments(call["arguments"])
    if spec is None or args is None:
        return False
    schema = spec.get("parameters") or {"type": "object"}
    validator_cls = validators.validator_for(schema)
    return validator_cls(schema).is_valid(args)


def score_tool_calls(
    reference: dict[str, Any], prediction: dict[str, Any], offered_tools: list[dict[str, Any]]
) -> AnswerScore:
    ref_calls = message_tool_calls(reference)
    pred_calls = message_tool_calls(prediction)
    offered = {spec["name"]: spec for spec in offered_tools if "name" in spec}
    all_offered = all(c["name"] in offered for c in pred_calls)
    # Parallel calls come in any order: compare them sorted by name.
    ref_sorted = sorted(ref_calls, key=lambda c: c["name"])
    pred_sorted = sorted(pred_calls, key=lambda c: c["name"])
    names_ok = all_offered and [c["name"] for c in ref_sorted] == [c["name"] for c in pred_sorted]
    args_ok = names_ok and all(
        _arguments(p["arguments"]) is not None
        and _arguments(p["arguments"]) == _arguments(r["arguments"])
        for r, p in zip(ref_sorted, pred_sorted, strict=True)
    )
    valid = bool(pred_calls) and all(schema_valid(c, offered) for c in pred_calls)
    return AnswerScore(
        shape="tool_call",
        agree=args_ok,
        score=float(args_ok),
        metrics={
            "tool_name": names_ok,
            "arguments_exact": args_ok,
            "argument_f1": argument_f1(ref_calls, pred_calls) if all_offered else 0.0,
            "schema_valid": valid,
            "tool_offered": all_offered and bool(pred_calls),
        },
    )


# -- JSON and labels ----------------------------------------------------------------------


def _leaves(value: Any, prefix: str = "") -> dict[str, str]:
    """A JSON value flattened to {path: canonical leaf}, so nested keys compare one by one."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_leaves(v, f"{prefix}[{i}]"))
        return out
    return {prefix: _canonical(value)}


def score_json(reference_text: str, prediction_text: str) -> AnswerScore:
    ref = parse_json(reference_text)
    pred = parse_json(prediction_text)
    if pred is None:
        metrics = {"json_parses": False, "json_same_keys": False, "json_values": 0.0}
        return AnswerScore(shape="json", agree=False, score=0.0, metrics=metrics)
    ref_leaves, pred_leaves = _leaves(ref), _leaves(pred)
    matched = sum(pred_leaves.get(path) == leaf for path, leaf in ref_leaves.items())
    agree = ref == pred
    metrics = {
        "json_parses": True,
        "json_same_keys": set(ref_leaves) == set(pred_leaves),
        "json_values": matched / len(ref_leaves),
    }
    return AnswerScore(shape="json", agree=agree, score=float(agree), metrics=metrics)


def normalize_label(text: str) -> str:
    """Case, surrounding whitespace, quotes and final punctuation do not make a label differ."""
    return text.strip().strip("\"'`").strip().rstrip(".!?;:").strip().casefold()


def score_label(reference_text: str, prediction_text: str) -> AnswerScore:
    agree = normalize_label(reference_text) == normalize_label(prediction_text)
    return AnswerScore(shape="label", agree=agree, score=float(agree), metrics={"label": agree})


# -- free text ----------------------------------------------------------------------------


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 (Lin, 2004) over lowercased word tokens: longest common subsequence."""
    ref = _WORD.findall(reference.lower())
    pred = _WORD.findall(prediction.lower())
    if not ref or not pred:
        return float(ref == pred)
    # One row of the LCS table at a time: O(len(ref) * len(pred)) time, O(len(pred)) memory.
    prev = [0] * (len(pred) + 1)
    for r in ref:
        cur = [0]
        for j, p in enumerate(pred):
            cur.append(prev[j] + 1 if r == p else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def cosine(encoder: Encoder, a: str, b: str) -> float:
    va, vb = np.asarray(encoder.encode([a, b]), dtype=np.float64)
    denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb / denom) if denom else 0.0


def score_text(reference_text: str, prediction_text: str, encoder: Encoder) -> AnswerScore:
    """Mean of embedding cosine (rewards a paraphrase) and ROUGE-L (penalizes a different
    entity or action the embedding barely sees); `agree` is exact match after stripping."""
    if not prediction_text.strip():
        cos = 0.0
    else:
        cos = max(0.0, cosine(encoder, reference_text, prediction_text))
    rl = rouge_l(reference_text, prediction_text)
    score = min(1.0, (cos + rl) / 2)
    agree = reference_text.strip() == prediction_text.strip()
    return AnswerScore(
        shape="text", agree=agree, score=score, metrics={"cosine": cos, "rouge_l": rl}
    )
