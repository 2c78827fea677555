"""The quality gate (S6): when a specialist is good enough to replace the LLM on a task.

`EvalConfig` is the recipe's `eval:` section; the decision functions live beside it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    """Thresholds a cautious user would accept: agreement with the LLM, as a lower
    confidence bound, per output shape."""

    model_config = ConfigDict(extra="forbid")

    min_test_calls: int = Field(20, description="Fewer test calls than this: stays on the LLM.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"tool_call": 0.9, "json": 0.9, "label": 0.9, "text": 0.7}
    )
