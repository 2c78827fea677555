"""The data contract: every record that passes between slmify's stages.

A collected LLM call (`CallRecord`), a discovered task type (`TaskCluster`), a trained
specialist (`SpecialistInfo`), an evaluation (`EvalReport`) and the deployment
`Manifest` are pydantic models defined here and nowhere else. Files on disk are these
models serialized (JSONL or YAML) with a `schema_version` field, so an artifact written
by one stage can be read back, checked, by the next.
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
# A LoRA adapter on a small base model that generates the answer; a classification head on
# sentence embeddings that answers from a closed label set; or a field head that assembles
# a tool call or JSON answer from closed choices and values copied from the request.
SpecialistKind = Literal["lora", "label-head", "field-head"]
HEAD_KINDS = ("label-head", "field-head")


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
    tokens_estimated: bool = Field(
        False, description="Counted with the embedding model's tokenizer: the logs lack usage."
    )
    llm_cost_usd: float = 0.0
    output_diversity: float = 0.0
    value_score: float = 0.0
    representatives: list[str] = Field(default_factory=list, description="Call ids.")


# -- S4/S5 train --------------------------------------------------------------------------


class ContextPolicy(BaseModel):
    """What a specialist reads of a long conversation, after the pruned system text and
    tools: the last `max_turns` messages and/or the last messages that fit `max_tokens`
    (counted from the end; the message the agent answers is always kept), with each tool
    result cut to `tool_result_chars`. None everywhere: the whole conversation."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int | None = Field(default=None, ge=1, description="Keep the last K messages.")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Keep the last messages whose text fits N tokens (at least the last one).",
    )
    tool_result_chars: int | None = Field(
        default=None,
        ge=0,
        description="Cut each tool result to its head and tail, M characters in all.",
    )


class PromptPruning(BaseModel):
    """`specialists/<task id>/pruning.json`: prompt text every call of the task repeats,
    removed before training; eval and serving apply the same to build the same input."""

    schema_version: int = SCHEMA_VERSION
    system: str | None = Field(
        default=None,
        description="Dropped system message: removed when a request's first message is a "
        "system message with exactly this text.",
    )
    tools_action: Literal["keep", "compact", "drop"] = "keep"
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        description="The task's shared tool schemas (function specs) as offered; a request "
        "offering exactly these gets them compacted (no descriptions) or dropped.",
    )
    context: ContextPolicy = Field(
        default_factory=ContextPolicy,
        description="How much of a long conversation the specialist reads (the recipe's "
        "dataset.context); absent in older files: all of it.",
    )


class SpecialistResult(BaseModel):
    """One task's line in `slmify train --json`, and `specialists/<task id>/result.json`."""

    schema_version: int = SCHEMA_VERSION
    id: str
    status: Literal["trained", "skipped"]
    reason: str | None = None
    kind: SpecialistKind = "lora"
    adapter: str | None = Field(default=None, description="The peft adapter folder.")
    head: str | None = Field(default=None, description="The head's folder (label or field head).")
    base_model: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


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
        description="Answers at or above it are served; null: no threshold reaches the target."
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


class EndToEnd(BaseModel):
    """The headline: held-out sessions replayed through the deployment as serve runs it."""

    model_config = ConfigDict(extra="forbid")

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

    def headline(self) -> str:
        if self.served == 0 or self.agreement is None:
            return f"0 % of {self.calls} held-out calls answered by specialists"
        return (
            f"{self.served_share:.1%} of {self.calls} held-out calls answered by specialists, "
            f"agreement {self.agreement:.3f} (lower bound {self.agreement_lower:.3f})"
        )


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
    adapter: str
    calls_file: str
    created_at: datetime


class RouterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_model: str
    params: dict[str, Any] = Field(default_factory=dict)
    artifact: str = Field(description="The file `load_router` reads.")
    confidence_threshold: float = Field(
        description="Below this routing confidence a call goes to the LLM."
    )


class FallbackLLM(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(description="The LLM the agent called, as recorded.")
    endpoint: str | None = Field(description="Its endpoint as recorded; null when logs lack it.")


class SpecialistSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: SpecialistKind = "lora"
    base_model: str | None = Field(description="As the recipe names it (null: a head).")
    base_model_path: str | None = Field(description="The folder or HF id a server loads.")
    adapter_path: str | None = None
    head_path: str | None = Field(default=None, description="The label or field head's folder.")
    labels: list[str] | None = Field(default=None, description="A label head's label set.")
    lora_rank: int | None = None
    input_pruning: list[str] = Field(description="What the prompt builder removes from a call.")
    chat_template: str = Field(description="Chat template convention the adapter was trained on.")
    pruning: PromptPruning | None = Field(
        default=None,
        description="Exactly what the prompt builder removes and keeps (as in training and "
        "eval); serving rebuilds the evaluated prompt from it. Null in older manifests.",
    )
    max_new_tokens: int | None = Field(default=None, description="The evaluated generation cap.")


class TaskEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_calls: int
    agreement: float
    agreement_lower: float
    base_agreement: float | None
    base_agreement_lower: float | None
    method: Literal["wilson", "bootstrap"]
    confidence: float
    specialist_latency_ms_p50: float | None
    specialist_tokens_per_s: float | None
    llm_latency_ms_p50: float | None
    report: str


class ManifestTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    label: str
    share: float
    calls: int
    output_shape: OutputShape
    status: Literal["promoted", "llm"]
    reason: str
    specialist: SpecialistSpec | None = None
    evaluation: TaskEvaluation | None = None
    deferral: Deferral | None = Field(
        default=None, description="Confidence threshold; null (older manifests): none."
    )
    served: TaskServed | None = None
    data_hash: str | None = None
    recipe_hash: str | None = None


class Savings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    specialist_share: float = Field(
        description="Share of all clustered calls promoted specialists serve: each task's "
        "share times the part of its routed held-out calls it served (deferral included)."
    )
    specialist_calls: int
    llm_cost_usd: float = Field(description="LLM cost of all clustered calls, at the price table.")
    llm_cost_usd_moved: float = Field(description="The part of it promoted tasks take off the LLM.")
    llm_latency_s_moved: float | None = Field(
        description="LLM seconds on the promoted tasks' calls (median recorded latency x "
        "calls); null when the logs have no latency."
    )
    prices: str = Field(description="Where the prices came from.")


class Manifest(BaseModel):
    """`WORKSPACE/manifest.yaml`: what to deploy, and why each task is or is not promoted."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = SCHEMA_VERSION
    created_at: datetime
    router: RouterSpec | None
    fallback: FallbackLLM
    tasks: list[ManifestTask]
    end_to_end: EndToEnd | None = Field(
        default=None, description="Held-out sessions replayed through this deployment."
    )
    savings: Savings
    exports: dict[str, str] = Field(
        default_factory=dict, description="Serving configs written beside the manifest."
    )


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


# -- S6 retrain (slmify run) --------------------------------------------------------------


class DriftFinding(BaseModel):
    """Something that changed between two `slmify run`s, and the work it calls for."""

    kind: Literal[
        "new-task-type",
        "share-moved",
        "router-confidence-dropped",
        "specialist-agreement-dropped",
        "gate-regressed",
    ]
    task_id: str | None = None
    action: Literal["re-cluster", "retrain", "re-evaluate", "demote"]
    detail: str = Field(description="Human-readable, with the numbers.")


class StageOutcome(BaseModel):
    """One stage of `slmify run`: whether it ran, and why (or why it was skipped)."""

    name: Literal["collect", "curate", "cluster", "train", "eval", "manifest"]
    ran: bool
    reason: str
    failed: bool = False
    seconds: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)
