"""OpenAI's server-sent events for chat completions: read a whole stream back
(`parse_sse`), add its `chat.completion.chunk` objects up to the `chat.completion` they
stream (`assemble_stream`: what the proxy and the router record), and write a completion
out as such a stream (`sse_events`: how the router streams a specialist's answer).
Pure functions; nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any


def parse_sse(body: bytes) -> Iterator[dict[str, Any]]:
    """The JSON payload of each `data:` event of a whole SSE body, `[DONE]` left out."""
    for block in re.split(r"\r?\n\r?\n", body.decode("utf-8")):
        data = "\n".join(
            line[5:].removeprefix(" ") for line in block.splitlines() if line.startswith("data:")
        )
        if data and data != "[DONE]":
            yield json.loads(data)


def assemble_stream(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The `chat.completion` a stream of `chat.completion.chunk` objects adds up to.

    Deltas merge as OpenAI's SDK merges them: strings are concatenated (content,
    `tool_calls[i].function.arguments`), list items are matched by their `index`, and
    `id`, `type`, `role`, `index` are repeated rather than split, so they are set. An
    `error` event is kept as `error`; the usage chunk (`stream_options.include_usage`)
    as `usage`.
    """
    completion: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for key in ("id", "created", "model", "system_fingerprint", "usage", "error"):
            if chunk.get(key) is not None:
                completion[key] = chunk[key]
        for part in chunk.get("choices") or []:
            i = part.get("index", 0)
            choice = choices.setdefault(
                i,
                {"index": i, "message": {"role": "assistant", "content": None},
                 "finish_reason": None},
            )  # fmt: skip
            _merge(choice["message"], part.get("delta") or {})
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
    for choice in choices.values():
        calls = choice["message"].get("tool_calls")
        if calls:
            calls.sort(key=lambda c: c.get("index", 0))
            for call in calls:
                call.pop("index", None)  # a non-streamed message has no index
    completion["choices"] = [choices[i] for i in sorted(choices)]
    return completion


SET_KEYS = frozenset({"id", "type", "role", "index"})


def _merge(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if isinstance(value, dict):
            if not isinstance(acc.get(key), dict):
                acc[key] = {}
            _merge(acc[key], value)
        elif isinstance(value, list):
            _merge_indexed(acc.setdefault(key, []), value)
        elif isinstance(value, str) and key not in SET_KEYS and isinstance(acc.get(key), str):
            acc[key] += value
        else:
            acc[key] = value


def _merge_indexed(acc: list[Any], items: list[Any]) -> None:
    """Items with an `index` merge into the item of that index; others are appended."""
    for item in items:
        if not isinstance(item, dict):
            acc.append(item)
            continue
        target = None
        if "index" in item:
            target = next(
                (a for a in acc if isinstance(a, dict) and a.get("index") == item["index"]), None
            )
        if target is None:
            acc.append(target := {})
        _merge(target, item)


def sse_events(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A whole completion as the `chat.completion.chunk` events OpenAI would stream:
    the text word by word, each tool call in one chunk, then the finish reason."""
    base = {k: completion[k] for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"
    choice = completion["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant"})]
    chunks += [
        chunk({"content": w}) for w in re.findall(r"\s*\S+\s*", message.get("content") or "")
    ]
    for i, call in enumerate(message.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": i, **call}]}))
    if message.get("function_call"):
        chunks.append(chunk({"function_call": message["function_call"]}))
    chunks.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
