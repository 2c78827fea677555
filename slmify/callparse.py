"""Parsing one logged LLM call into the data contract, shared by every way calls arrive.

Reads a chat-completions request body, an OpenAI chat.completion answer and a timestamp
as they appear in logs, OTLP spans and proxied traffic, and returns the `ChatRequest`,
`ChatResponse`, `Usage` and `datetime` of a `CallRecord` (slmify.schema). What cannot be
used raises `Reject`, whose message is the reason an importer writes to its rejects file;
`as_reject` turns any exception one record raised into such a reason, free of the
record's values. Writes nothing. The file importer (slmify.collect), the OTLP reader
(slmify.otlp), the recording proxy and `slmify serve` all parse with it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from slmify.schema import ChatRequest, ChatResponse, Usage

REQUEST_KEYS = {"model", "messages", "tools", "functions"}


class Reject(ValueError):
    """A record that cannot be imported; the message is the reason written to rejects."""


def parse_request(req: Any) -> ChatRequest:
    """A chat-completions request body as `ChatRequest` (the proxy records with it too)."""
    if not isinstance(req, dict):
        raise Reject("`request` is not an object")
    messages = req.get("messages")
    # An empty list is a real (if useless) call and is kept; curation excludes it.
    if not isinstance(messages, list):
        raise Reject("request has no `messages` list")
    if not all(isinstance(m, dict) and "role" in m for m in messages):
        raise Reject("a request message is not an object with a `role`")
    return ChatRequest.model_validate(
        {
            "model": req.get("model"),
            "messages": messages,
            "tools": req.get("tools"),
            "functions": req.get("functions"),
            "params": {k: v for k, v in req.items() if k not in REQUEST_KEYS},
        }
    )


def parse_response(resp: Any) -> tuple[ChatResponse | None, Usage, str | None]:
    """(response, usage, error message) from an OpenAI chat.completion object."""
    if not isinstance(resp, dict):
        raise Reject("record has no `response` object")
    usage = resp.get("usage") or {}
    # Provider extras (prompt_tokens_details...) are not part of `Usage`.
    usage = Usage.model_validate({k: v for k, v in usage.items() if k in Usage.model_fields})
    if "error" in resp and not resp.get("choices"):
        err = resp["error"]
        return None, usage, err.get("message") if isinstance(err, dict) else str(err)
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Reject("response has no `choices`")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise Reject("response choice has no `message`")
    response = {
        "model": resp.get("model"),
        "message": message,
        "finish_reason": choices[0].get("finish_reason"),
        "response_id": resp.get("id"),
    }
    return ChatResponse.model_validate(response), usage, None


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601, or epoch seconds / ms / µs / ns (a number or digits), told apart by size."""
    if value is None or value == "":
        return None
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        or (isinstance(value, str) and value.isdigit())
    ):
        seconds = float(value)
        for _ in range(3):  # ms, µs, ns at the finest
            if abs(seconds) <= 1e11:  # 1e11 s is the year 5138: larger numbers are finer units
                break
            seconds /= 1000
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError) as e:  # NaN, or before the year 1
            raise Reject("timestamp out of range") from e
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as e:
        raise Reject("unreadable timestamp (neither ISO 8601 nor epoch)") from e


def as_reject(e: BaseException) -> Reject:
    """The reject for an exception raised by one record, its reason free of the record's
    values: pydantic's messages quote the input, and a ValueError can quote anything."""
    from pydantic import ValidationError

    if isinstance(e, Reject):
        return e
    if isinstance(e, RecursionError):
        return Reject("invalid record: nested too deeply")
    if isinstance(e, ValidationError):
        errors = e.errors(include_url=False, include_input=False, include_context=False)
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])[:120]}: {err['msg'][:120]}"
            for err in errors[:3]
        )
        n = e.error_count()
        return Reject(
            f"invalid record: {n} validation error{'s' if n > 1 else ''} for {e.title}: {where}"
        )
    if isinstance(e, ValueError | TypeError) and (
        "Recursion limit" in str(e) or "depth exceeded" in str(e)
    ):  # orjson stops at 255 levels, pydantic's serializer at a few hundred
        return Reject("invalid record: nested too deeply to serialize")
    if isinstance(e, UnicodeError) or "surrogates not allowed" in str(e):
        return Reject("invalid record: text that is not valid Unicode (a lone surrogate)")
    return Reject(f"invalid record: {type(e).__name__} while converting it")
