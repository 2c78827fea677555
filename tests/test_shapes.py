"""One output-shape function: clustering (features) and eval (metrics) read an answer's
shape the same way, so a task's cluster action and its gate threshold never disagree."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dataset

from slmify import features, metrics, shapes
from slmify.schema import CallRecord, ChatRequest, ChatResponse

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "calls.jsonl.gz"

FENCED = '```json\n{"order_id": "W123", "items": [1, 2]}\n```'


def _call(content: str) -> CallRecord:
    return CallRecord(
        id="c1",
        source="test",
        request=ChatRequest(model="m", messages=[{"role": "user", "content": "extract"}]),
        response=ChatResponse(message={"role": "assistant", "content": content}),
    )


@pytest.mark.parametrize(
    ("content", "shape"),
    [
        (FENCED, "json"),
        ('```\n["a", "b"]\n```', "json"),
        ('  {"a": 1}  ', "json"),
        ("```json\n{not json}\n```", "text"),
        ("yes", "label"),
        ("", "label"),
        ("Thought: I need to search X.\nAction: search[X]", "text"),
    ],
)
def test_clustering_and_eval_agree_on_the_shape(content: str, shape: str) -> None:
    message = {"role": "assistant", "content": content}
    assert metrics.answer_shape(message) == shape
    assert features.output_shape(_call(content)) == shape
    assert features.action_of(_call(content)) == shape


def test_one_definition() -> None:
    # The stages import it; a second copy would be a second definition to drift.
    assert features.text_shape is shapes.text_shape
    assert metrics.answer_shape is shapes.answer_shape
    assert metrics.parse_json is shapes.parse_json


def test_a_tool_call_is_a_tool_call_whatever_the_text() -> None:
    message = {
        "role": "assistant",
        "content": FENCED,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert shapes.answer_shape(message) == "tool_call"


def _old_clustering_rule(text: str) -> str:
    """features.text_shape before the two definitions became one: fences were text."""
    s = text.strip()
    if s[:1] in "[{":
        try:
            json.loads(s)
            return "json"
        except ValueError:
            pass
    return "label" if "\n" not in s and len(s) <= 40 and len(s.split()) <= 4 else "text"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


@pytest.mark.parametrize("name", ["demo", "tau-airline", "fireact", "toolbench-legacy"])
def test_no_real_text_changes_shape_for_clustering(name: str) -> None:
    # Clustering reads the shape of answers (action) and of task statements (input shape):
    # no string in the demo or the real logs is fenced JSON, so their clusters and the
    # demo's gate decisions are what they were before the rules were unified.
    path = DEMO if name == "demo" else dataset(name)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        texts = [s for line in f for s in _strings(json.loads(line))]
    assert len(texts) > 1000
    changed = [t for t in texts if shapes.text_shape(t) != _old_clustering_rule(t)]
    assert changed == []
