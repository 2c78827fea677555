"""The shape of an answer: tool_call, json, label or text. One definition for every stage.

Clustering reads it as a call's action (features), eval picks the metrics and the gate's
threshold by it (metrics, gate), so the two must agree: a ```json fenced object is `json`
to both. Pure functions on text and OpenAI assistant messages; reads and writes nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from slmify.schema import OutputShape, message_text, message_tool_calls

# A label is a short single-line answer: a class name, yes/no, an option letter.
LABEL_MAX_CHARS = 40
LABEL_MAX_WORDS = 4
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json(text: str) -> Any | None:
    """The JSON object or array in `text` (a ```json fence allowed), else None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    if not text or text[0] not in "[{":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def text_shape(text: str) -> OutputShape:
    """json if it holds a JSON object or array; label if a few words on one line; else text."""
    text = text.strip()
    if parse_json(text) is not None:
        return "json"
    if "\n" not in text and len(text) <= LABEL_MAX_CHARS and len(text.split()) <= LABEL_MAX_WORDS:
        return "label"
    return "text"


def answer_shape(message: dict[str, Any]) -> OutputShape:
    """The shape of an assistant message: tool_call, else the shape of its text."""
    if message_tool_calls(message):
        return "tool_call"
    return text_shape(message_text(message.get("content")))
