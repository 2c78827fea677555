"""The data contract: every record that passes between slmify's stages.

A collected LLM call (`CallRecord`), a discovered task type (`TaskCluster`), a trained
specialist (`SpecialistResult`), an evaluation (`EvalReport`) and the deployment
`Manifest` are pydantic models, all imported from here: the call records are defined in
slmify.schema_calls, the eval and serving records in slmify.schema_eval, and the cluster,
train, manifest and run records below; what each stage reports of a run (the summaries
`--json` prints) is in slmify.schema_stages. Files on disk are these models serialized
(JSONL or YAML) with a `schema_version` field, so an artifact written by one stage can be
read back, checked, by the next. Reads and writes nothing itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmify.schema_calls import (
    SCHEMA_VERSION,
    CallRecord,
    ChatRequest,
    ChatResponse,
    Curation,
    OutputShape,
    Usage,
    content_hash,
    message_text,
    message_tool_calls,
)
from slmify.schema_eval import (
    Agreement,
    AnswerScore,
    Deferral,
    EndToEnd,
    EvalReport,
    GateDecision,
    ModelAnswer,
    ModelEval,
    ReplayedCall,
    ServedRoute,
    SpecialistAttempt,
    TaskServed,
)

# The whole contract, the gathered models included: other modules import them from here.
__all__ = [
    "HEAD_KINDS",
    "SCHEMA_VERSION",
    "Agreement",
    "AnswerScore",
    "Assignment",
    "CallRecord",
    "ChatRequest",
    "ChatResponse",
    "ContextPolicy",
    "Curation",
    "Deferral",
    "DriftFinding",
    "EndToEnd",
    "EvalReport",
    "FallbackLLM",
    "GateDecision",
    "Manifest",
    "ManifestTask",
    "ModelAnswer",
    "ModelEval",
    "OutputShape",
    "PromptPruning",
    "ReplayedCall",
    "RouterSpec",
    "Savings",
    "ServedRoute",
    "SpecialistAttempt",
    "SpecialistKind",
    "SpecialistResult",
    "SpecialistSpec",
    "Splits",
    "StageOutcome",
    "TaskCluster",
    "TaskEvaluation",
    "TaskList",
    "TaskServed",
    "Usage",
    "content_hash",
    "message_text",
    "message_tool_calls",
]

# A LoRA adapter on a small base model that generates the answer; a classification head on
# sentence embeddings that answers from a closed label set; or a field head that assembles
# a tool call or JSON answer from closed choices and values copied from the request.
SpecialistKind = Literal["lora", "label-head", "field-head"]
HEAD_KINDS = ("label-head", "field-head")

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


class TaskList(BaseModel):
    """`cluster/tasks.json`: the tasks `slmify cluster` found, ranked by value."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    tasks: list[TaskCluster]


class Assignment(BaseModel):
    """One line of `assignments.jsonl`: a clustered call and its task, None when it fits
    none. Each line carries the version (about 20 bytes a line), so a line read alone is
    checked too; a line written before it had one is version 1."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    task: str | None


class RouterMeta(BaseModel):
    """`cluster/router/router.json`: what routing needs besides the weights (router.npz).
    The fields keep the order the router has always written them in."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str
    max_seq_length: int
    min_confidence: float = Field(description="Below this a call goes to the LLM.")
    shared_lines: dict[str, list[str]] = Field(
        description="Per agent identity, the boilerplate lines' hashes dropped before embedding."
    )
    schema_version: int = SCHEMA_VERSION
    identities: list[str] = Field(description="Agent identities seen while clustering.")
    previous_actions: list[str]
    holdout: dict[str, float | int | str | None] = Field(
        description="Accuracy on held-out sessions, or why there is none (`reason`)."
    )
    classes: list[str] = Field(description="Task ids and `LLM`, in the weights' row order.")
    held_out_share: float | None = Field(
        None,
        description="Sessions placed below this by datasets.hash_unit were never fitted "
        "(eval replays them); None: fitted on every call (a router written before this "
        "field, or a log whose every session is held out).",
    )
    features: list[Literal["turn_embedding", "turn_ngrams"]] | None = Field(
        None,
        description="The optional blocks the router reads of the last turn, besides the "
        "fixed ones (identity, answer format, turn role, previous action) and the task "
        "statement's (task_features); None: written before this field, the turn embedding only.",
    )
    turn_ngrams: list[str] = Field(
        default_factory=list,
        description="The last turn's word 1-2-gram vocabulary, in column order (their idf "
        "in router.npz); empty without the turn_ngrams block.",
    )
    task_features: list[Literal["task_embedding", "task_ngrams"]] | None = Field(
        None,
        description="The optional blocks the router reads of the task statement (the "
        "first user message); None: written before this field, its embedding only.",
    )
    task_ngrams: list[str] = Field(
        default_factory=list,
        description="The task statement's word 1-2-gram vocabulary, in column order (their "
        "idf in router.npz); empty without the task_ngrams block.",
    )
    reply_ngrams: list[str] = Field(
        default_factory=list,
        description="The word 1-2-gram vocabulary of the agent's last assistant message, in "
        "column order after every other block (their idf in router.npz); empty: no such "
        "block (router_features without reply_ngrams, or a router written before it).",
    )


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


class Splits(BaseModel):
    """`specialists/<task id>/splits.json`: the task's call ids per split, by session hash;
    test and calibration ids recorded here stay there on every later run."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    key: str = Field(description="What a call is split by, and the hash.")
    validation_fraction: float
    test_fraction: float
    calibration_fraction: float
    train: list[str]
    validation: list[str]
    calibration: list[str]
    test: list[str]


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
    constrained: bool | None = Field(
        default=None,
        description="Whether a LoRA specialist generates tool calls and JSON under a grammar "
        "(the recipe's generate.constrained), as it was evaluated. Null for heads, which do "
        "not generate, and in older manifests (serve then reads the recipe beside the adapter).",
    )


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
    answered_by: str | None = Field(
        default=None,
        description="The agent-level specialist (`agents`) that answers this task's calls "
        "(its `specialist` is then that one); null: the task's own specialist.",
    )


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


class AgentPlan(BaseModel):
    """`specialists/agent-<identity>/agent.json`: which task each action of an agent-level
    specialist's answers belongs to (the task where the LLM's calls with that action were
    clustered most)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    identity: str
    calls: int
    actions: dict[str, str] = Field(description="Action (tool name(s), or text shape) -> task.")


class AgentEntry(BaseModel):
    """An agent-level specialist: one adapter answering every call of one agent, its
    action naming the task whose threshold and promotion decide."""

    model_config = ConfigDict(extra="forbid")

    id: str
    identity: str
    design: Literal["tasks", "agent"] = Field(
        description="agent: it answers the agent's calls (the router is not asked for them); "
        "tasks: the router and task specialists do, as evaluated."
    )
    why: str
    actions: dict[str, str]
    specialist: SpecialistSpec


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
    agents: list[AgentEntry] = Field(
        default_factory=list, description="Agent-level specialists and the design chosen."
    )
    exports: dict[str, str] = Field(
        default_factory=dict, description="Serving configs written beside the manifest."
    )


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


class Demotion(BaseModel):
    """A promoted specialist `slmify run` took off serving, until it is retrained."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="Hash of the adapter demoted; a new one lifts it.")
    reason: str


class RunState(BaseModel):
    """WORKSPACE/run/state.json: the inputs each stage last ran on."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    sources: dict[str, str] = Field(default_factory=dict, description="File -> sha256.")
    stages: dict[str, str] = Field(default_factory=dict, description="Stage -> inputs hash.")
    cluster_settings: str | None = Field(None, description="Hash of the last full clustering's.")
    train: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Task -> hashes of its calls and of the recipe."
    )
    eval: dict[str, str] = Field(default_factory=dict, description="Task -> inputs hash.")
    demoted: dict[str, Demotion] = Field(default_factory=dict)
    router_confidence: float | None = Field(
        None, description="The router's mean confidence on the calls it was fit on."
    )
    updated_at: datetime | None = None


class StageOutcome(BaseModel):
    """One stage of `slmify run`: whether it ran, and why (or why it was skipped)."""

    name: Literal["collect", "curate", "cluster", "train", "eval", "manifest"]
    ran: bool
    reason: str
    failed: bool = False
    seconds: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)
