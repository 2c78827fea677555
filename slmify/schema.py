"""The data contract: every record that passes between slmify's stages.

A collected LLM call (`CallRecord`), a discovered task type (`TaskCluster`), a trained
specialist (`SpecialistInfo`), an evaluation (`EvalReport`) and the deployment
`Manifest` are pydantic models defined here and nowhere else. Files on disk are these
models serialized (JSONL or YAML) with a `schema_version` field, so an artifact written
by one stage can be read back, checked, by the next.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

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
        return content_hash(
            {
                "request": self.request.model_dump(mode="json"),
                "response": self.response.model_dump(mode="json", exclude={"response_id"})
                if self.response
                else None,
            }
        )

    def tool_calls(self) -> list[dict[str, Any]]:
        """The response's tool calls as `[{"name": ..., "arguments": str}]`.

        The legacy `function_call` is returned in the same shape, so later stages see one
        representation for both APIs.
        """
        if self.response is None:
            return []
        msg = self.response.message
        calls = [
            {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or ""}
            for c in msg.get("tool_calls") or []
            if isinstance(c, dict) and isinstance(c.get("function"), dict)
        ]
        fc = msg.get("function_call")
        if isinstance(fc, dict) and fc.get("name"):
            calls.append({"name": fc["name"], "arguments": fc.get("arguments") or ""})
        return calls

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


def message_text(content: Any) -> str:
    """The text of an OpenAI message `content`: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") if isinstance(p, dict) else str(p) for p in content
        )
    return str(content)


def content_hash(obj: Any) -> str:
    """A stable sha256 of a JSON-serializable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# -- S3 cluster ---------------------------------------------------------------------------


class TaskCluster(BaseModel):
    """One recurring task type found by `slmify cluster`."""

    schema_version: int = SCHEMA_VERSION
    id: str = Field(description="Stable readable id, e.g. `t03-extract-order-fields`.")
    label: str
    top_terms: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list, description="Tools the LLM called.")
    output_shape: OutputShape
    calls: int
    share: float
    input_tokens: int = 0
    output_tokens: int = 0
    llm_cost_usd: float = 0.0
    output_diversity: float = 0.0
    value_score: float = 0.0
    representatives: list[str] = Field(default_factory=list, description="Call ids.")
