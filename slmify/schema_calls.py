"""The data contract, S1/S2: one collected LLM call (`CallRecord`: what the agent asked,
what the LLM answered) and what curation decided about it (`Curation`), with the helpers
that read a chat message and hash a call. Pydantic models; reads and writes nothing.
Import them from slmify.schema, which gathers the whole contract.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

CallStatus = Literal["ok", "error"]
OutputShape = Literal["tool_call", "json", "label", "text"]


class ChatRequest(BaseModel):
    """What the agent sent: OpenAI chat-completions request fields."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    # The legacy API (`functions` / `function_call`) is kept as sent, not rewritten, so
    # an export reproduces exactly what the agent saw.
    functions: list[dict[str, Any]] | None = None
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Sampling and control parameters: temperature, top_p, max_tokens, "
        "tool_choice, response_format, stream...",
    )


class ChatResponse(BaseModel):
    """What the LLM answered: the first choice's assistant message."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    message: dict[str, Any] = Field(
        description="The assistant message: role, content, tool_calls or function_call."
    )
    finish_reason: str | None = None
    response_id: str | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class CallRecord(BaseModel):
    """One LLM call the agent made, as collected (S1) and curated (S2)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    source: str = Field(description="The file (path:line) or `proxy:<upstream>` it came from.")
    timestamp: datetime | None = None
    session_id: str | None = None
    agent: str | None = None
    request: ChatRequest
    response: ChatResponse | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float | None = None
    status: CallStatus = "ok"
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    def content_hash(self) -> str:
        """Hash of what was asked and answered; equal hashes are exact duplicates."""
        # The models' fields as they are (all JSON types), not a model_dump copy: hashing
        # is on every import's hot path.
        response = None
        if self.response is not None:
            response = {k: v for k, v in self.response if k != "response_id"}
        return content_hash({"request": dict(self.request), "response": response})

    def tool_calls(self) -> list[dict[str, Any]]:
        """The response's tool calls as `[{"name": ..., "arguments": str}]`.

        The legacy `function_call` is returned in the same shape, so later stages see one
        representation for both APIs.
        """
        return message_tool_calls(self.response.message) if self.response else []

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tool schemas offered (`tools` or legacy `functions`) as function specs."""
        specs = [t["function"] for t in self.request.tools or [] if "function" in t]
        return specs + list(self.request.functions or [])

    def output_text(self) -> str:
        if self.response is None:
            return ""
        return message_text(self.response.message.get("content"))


class Curation(BaseModel):
    """What S2 decided about one call; stored beside the record."""

    scrubbed: bool = False
    replacements: dict[str, int] = Field(default_factory=dict)
    duplicate_of: str | None = None
    excluded: str | None = Field(
        default=None, description="Why the call is kept out of training, if it is."
    )
    masked_hash: str | None = Field(
        default=None,
        description="Content hash of the call with PII masked by type only (`<EMAIL>`), the "
        "same in any session: equal hashes are exact duplicates. No hash of the raw text is "
        "kept, since with the scrubbed record it would let a short value (an SSN) be guessed.",
    )


def message_text(content: Any) -> str:
    """The text of an OpenAI message `content`: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def message_tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's tool calls as `[{"name": ..., "arguments": str}]`, the legacy
    `function_call` included; the LLM's answer and a specialist's are read the same way."""
    calls = [
        {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or ""}
        for c in message.get("tool_calls") or []
        if isinstance(c, dict) and isinstance(c.get("function"), dict)
    ]
    fc = message.get("function_call")
    if isinstance(fc, dict) and fc.get("name"):
        calls.append({"name": fc["name"], "arguments": fc.get("arguments") or ""})
    return calls


def content_hash(obj: Any) -> str:
    """A stable sha256 of a JSON-serializable object (keys sorted, compact, UTF-8).

    orjson, not json: the stdlib's sorted dump was half of an import's time. The bytes are
    the same as `json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))`
    for JSON data (non-string keys become strings, as there); float spellings may differ.
    """
    options = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    return hashlib.sha256(orjson.dumps(obj, option=options)).hexdigest()
