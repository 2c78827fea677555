"""The data contract, S6 eval and serve: how a specialist's answers compare with the LLM's
(`AnswerScore`, `Agreement`, `EvalReport`), the held-out sessions replayed through the
deployment (`ReplayedCall`, `EndToEnd`), a task's confidence threshold (`Deferral`) and
who answered a served call (`ServedRoute`). Pydantic models; reads and writes nothing.
Import them from slmify.schema, which gathers the whole contract.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmify.schema_calls import SCHEMA_VERSION, OutputShape

# -- S6 eval, gate and manifest -----------------------------------------------------------


class AnswerScore(BaseModel):
    """How one model's answer to one call compares with the LLM's."""

    shape: OutputShape = Field(description="The LLM answer's shape, which picks the metrics.")
    agree: bool
    score: float = Field(ge=0.0, le=1.0, description="1/0 for exact shapes, similarity for text.")
    metrics: dict[str, float | bool | None] = Field(default_factory=dict)


class ModelAnswer(BaseModel):
    """A model's answer to one test call, as generated and as scored."""

    text: str
    message: dict[str, Any]
    score: AnswerScore
    latency_ms: float
    output_tokens: int
    judge: float | None = Field(default=None, description="LLM judge verdict (text calls).")
    confidence: float | None = Field(
        default=None, description="The model's own confidence in this answer (slmify.runtime)."
    )
    unconstrained: str | None = Field(
        default=None,
        description="Why it was generated without its grammar (slmify.constrained: a schema "
        "xgrammar cannot compile); null: under its grammar, or none applies.",
    )


class CallEval(BaseModel):
    """One line of `eval/<task id>/calls.jsonl`: the specialist and the base model on one call."""

    schema_version: int = SCHEMA_VERSION
    call_id: str
    task_id: str
    reference: dict[str, Any] = Field(description="The LLM's assistant message.")
    llm_latency_ms: float | None = None
    specialist: ModelAnswer
    base: ModelAnswer | None = Field(description="None when eval.compare_base is false.")


class Agreement(BaseModel):
    """Agreement with the LLM over a task's test calls, with a one-sided confidence bound."""

    n: int
    mean: float
    lower: float
    upper: float
    confidence: float
    method: Literal["wilson", "bootstrap"]
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Each per-call metric averaged over the calls having it."
    )
    by_shape: dict[str, int] = Field(default_factory=dict, description="Test calls per shape.")


class ModelEval(BaseModel):
    agreement: Agreement
    latency_ms_p50: float | None = None
    tokens_per_s: float | None = None


class GateDecision(BaseModel):
    status: Literal["promoted", "llm"]
    reason: str = Field(description="Human-readable, with the numbers.")
    threshold: float | None = None


class Deferral(BaseModel):
    """A task's confidence threshold, fitted on its calibration sessions: below it, serve
    sends the call to the LLM. Confidence is the specialist's own times the router's."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        description="Answers at or above it are served; 0: too few calibration answers to "
        "fit one (no deferral; the test gate decides); null: calibration shows the task below "
        "its target."
    )
    target: float = Field(description="Agreement whose lower bound the threshold must clear.")
    calibration_calls: int = Field(description="Calls routed to the task on calibration sessions.")
    calibration_served: int = Field(description="Of those, answered at or above the threshold.")
    calibration_agreement: float | None = None
    calibration_agreement_lower: float | None = None
    reason: str


class ReplayedCall(BaseModel):
    """One line of `eval/endtoend/<split>.jsonl`: a held-out call replayed through the
    serving decision path (router, scope checks, specialist, validation, deferral)."""

    schema_version: int = SCHEMA_VERSION
    call_id: str
    session_id: str | None
    cluster_task: str | None = Field(description="The task clustering put it in (reference).")
    picked: str | None = Field(description="The task the router chose; null: the LLM.")
    router_confidence: float | None
    answered_by: str = Field(description="The task id whose specialist answered, or `llm`.")
    reason: str = Field(description="As serve's x-slmify-reason header would say.")
    answer: ModelAnswer | None = Field(
        description="The specialist's answer, also when it was deferred or invalid."
    )
    base: ModelAnswer | None = Field(
        default=None, description="Its base model's answer (eval.compare_base), for comparison."
    )
    confidence: float | None = Field(description="Specialist confidence x router confidence.")
    agree: bool | None = Field(description="Whether that answer agrees with the LLM's.")
    llm_latency_ms: float | None = None


class TaskServed(BaseModel):
    """What one task's specialist answered of the held-out calls routed to it."""

    model_config = ConfigDict(extra="forbid")

    routed: int
    routed_as_clustered: int = Field(
        description="Of the routed calls, those the clustering (which saw the LLM's answer) "
        "put in this task too: the router's precision against it."
    )
    served: int
    agreement: float | None
    agreement_lower: float | None
    served_without_deferral: int
    agreement_without_deferral: float | None
    agreement_lower_without_deferral: float | None


class DesignChoice(BaseModel):
    """For one agent whose calls share one prompt: router + task specialists, or its
    agent-level specialist (slmify.agent), chosen by what each serves of the calibration
    sessions' calls at the targets (the test sessions only report)."""

    model_config = ConfigDict(extra="forbid")

    identity: str = Field(description="The agent (its system prompt and tool set, hashed).")
    agent: str = Field(description="The agent-level specialist's id (agent-<identity>).")
    design: Literal["tasks", "agent"]
    calibration_calls: int = Field(description="The agent's calls in the calibration sessions.")
    served_tasks: int = Field(description="Of those, served at a fitted threshold by tasks.")
    served_agent: int = Field(description="Of those, served at a fitted threshold by the agent.")
    why: str


class EndToEnd(BaseModel):
    """The headline: held-out sessions replayed through the deployment as serve runs it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    split: str = Field(description="Which held-out sessions: test.")
    sessions: int
    calls: int
    served: int = Field(description="Answered by promoted specialists at their thresholds.")
    served_share: float
    agreement: float | None = Field(description="Of the served answers, with the LLM's.")
    agreement_lower: float | None
    confidence: float
    method: Literal["wilson", "bootstrap"] | None
    served_without_deferral: int = Field(
        description="Served if every promoted task answered every valid call (no threshold)."
    )
    agreement_without_deferral: float | None
    agreement_lower_without_deferral: float | None
    reasons: dict[str, int] = Field(description="Calls per routing reason (code before ':').")
    routed_share: float = Field(description="Held-out calls the router sent to a trained task.")
    routing_accuracy: float | None = Field(
        description="Of those, the share the clustering (which saw the LLM's answer) put in "
        "the same task."
    )
    llm_cost_usd_moved: float | None = Field(
        default=None, description="LLM cost of the served calls, at the price table."
    )
    llm_latency_s_moved: float | None = Field(
        default=None, description="Recorded LLM seconds of the served calls, where logged."
    )
    by_task: dict[str, TaskServed] = Field(default_factory=dict)
    router_fitted_on: int = Field(
        default=0,
        description="Replayed calls (calibration and test) whose session the router was "
        "fitted on: routing figures over them are optimistic. 0 unless the router was "
        "clustered with a holdout_share below the recipe's test + calibration fractions, or "
        "before routers held sessions out.",
    )
    designs: list[DesignChoice] = Field(
        default_factory=list,
        description="Per agent with an agent-level specialist: which design these figures "
        "are of, and why.",
    )

    def headline(self) -> str:
        if self.served == 0 or self.agreement is None:
            return f"0 % of {self.calls} held-out calls answered by specialists"
        return (
            f"{self.served_share:.1%} of {self.calls} held-out calls answered by specialists, "
            f"agreement {self.agreement:.3f} (lower bound {self.agreement_lower:.3f})"
        )


class AnswerSample(BaseModel):
    """The test calls a task answered when its agreement cannot be decided (free text
    without a judge or eval.text_similarity): it can never be promoted, so it answers a
    sample of them (eval.undecidable_sample), for its similarity figures alone."""

    model_config = ConfigDict(extra="forbid")

    asked: int = Field(description="Calls it was asked to answer: the sample.")
    routed: int = Field(
        description="Calls routed to it past the router's threshold and the scope checks, "
        "which it would otherwise all have answered."
    )
    reason: str


class EvalReport(BaseModel):
    """`eval/<task id>/report.json`: what `slmify eval` measured on one task's test split."""

    schema_version: int = SCHEMA_VERSION
    task_id: str
    output_shape: OutputShape
    specialist: ModelEval
    base: ModelEval | None = Field(description="None when eval.compare_base is false.")
    llm_latency_ms_p50: float | None = Field(
        default=None, description="The LLM's recorded latency on the same calls, where logged."
    )
    judge_model: str | None = None
    decision: GateDecision
    deferral: Deferral | None = None
    served: TaskServed | None = Field(
        default=None, description="On the held-out test sessions, through the router."
    )
    sample: AnswerSample | None = Field(
        default=None,
        description="Set when the specialist's figures are over a sample of its routed "
        "calls; null: it answered every one.",
    )
    unconstrained: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Why answers were generated without their grammar: reason -> the test "
        "call ids (constrained decoding fell back; slmify.constrained).",
    )
    adapter: str
    calls_file: str
    created_at: datetime


# -- S6 serve -----------------------------------------------------------------------------


class SpecialistAttempt(BaseModel):
    """A specialist's answer to a served call that the client did not get: it failed
    validation, or it ran in shadow beside the LLM."""

    task_id: str
    text: str
    problem: str | None = Field(description="Why the answer is not valid; null when it is.")
    latency_ms: float
    output_tokens: int
    confidence: float | None = Field(default=None, description="The specialist's own.")
    score: AnswerScore | None = Field(
        default=None, description="Agreement with the LLM's answer (shadow mode)."
    )


class ServedRoute(BaseModel):
    """`metadata.route` of a call `slmify serve` answered: who answered, and why."""

    schema_version: int = SCHEMA_VERSION
    answered_by: str = Field(description="The task id of the specialist that answered, or `llm`.")
    reason: str = Field(description="As sent in the x-slmify-reason header.")
    task_id: str | None = Field(description="The task the router (or the request's model) chose.")
    confidence: float | None = Field(default=None, description="The router's.")
    answer_confidence: float | None = Field(
        default=None, description="The answering specialist's own confidence."
    )
    shadow: bool = False
    specialist: SpecialistAttempt | None = None
