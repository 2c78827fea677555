"""What each stage says it did: the summaries its command prints (`--json`) and keeps, and the
cluster stage's report files. Part of the data contract (slmify.schema holds the records
these summaries name); reads and writes nothing itself: slmify.workspace reads and writes
the files.

- cluster: `ClusterSummary`, kept in cluster/report.json (`ClusterReport`, beside the tasks
  it found) with the map of the calls in cluster/map.json (`CallMap`);
- train: `TrainSummary`, kept in specialists/summary.json (`TrainRecord`: the last
  `slmify train`, or the last task `slmify run` trained);
- run: `RunSummary`, kept in run/summary.json (`RunRecord`), beside the run's state.

A summary is exactly what `--json` prints, so it carries no version; the file wraps it in
one with its `schema_version`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmify.schema import (
    SCHEMA_VERSION,
    DriftFinding,
    Savings,
    SpecialistResult,
    StageOutcome,
    TaskCluster,
)

# -- S3 cluster ---------------------------------------------------------------------------


class ClusterSummary(BaseModel):
    """What `slmify cluster` found and wrote, and how long it took."""

    model_config = ConfigDict(extra="forbid")

    calls: int
    tasks: int
    unassigned: int = Field(description="Calls that fit no task: they stay on the LLM.")
    unassigned_share: float
    algorithm: str
    clusters_found: int
    silhouette: float | None
    embedded: int = Field(description="Texts embedded by this run.")
    embeddings_cached: int = Field(description="Texts whose vectors the store already held.")
    tokens: str = Field(description="Where the token counts came from.")
    router_holdout: dict[str, float | int | str | None] = Field(
        description="The router's accuracy on held-out sessions, or why there is none."
    )
    embed_seconds: float
    cluster_seconds: float = Field(description="Clustering, describing and the router.")
    seconds: float
    tasks_path: str
    assignments: str
    report: str
    router: str


class ClusterReport(BaseModel):
    """`cluster/report.json`: the run's summary and the tasks, as on report.html."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    summary: ClusterSummary
    tasks: list[TaskCluster]


class CallMap(BaseModel):
    """`cluster/map.json`: a sample of the calls in 2-D (t-SNE of the clustering features)
    and each one's task (None: unassigned), which `slmify report` draws."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    points: list[tuple[float, float]]
    task: list[str | None]


# -- S4/S5 train --------------------------------------------------------------------------


class TrainSummary(BaseModel):
    """What `slmify train` trained, on what, and how each task went."""

    model_config = ConfigDict(extra="forbid")

    recipe: str
    base_model: str
    device: str
    plan: list[str] = Field(description="The training plan's notes (threads, dtype, batch).")
    calls: str = Field(description="Where the training calls came from.")
    trained: int
    skipped: int
    validation_loss: dict[str, str] = Field(description="Per LoRA task: base -> specialist.")
    heads: dict[str, str] = Field(description="Per head task: its kind and accuracy.")
    tasks: list[SpecialistResult]


class TrainRecord(BaseModel):
    """`specialists/summary.json`: the last training run's summary."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    summary: TrainSummary


# -- S6 retrain (slmify run) --------------------------------------------------------------


class ManifestStatus(BaseModel):
    """The manifest as `slmify run` left it: per task status, the headline, the savings."""

    model_config = ConfigDict(extra="forbid")

    path: str
    headline: str
    end_to_end: dict[str, Any] | None = Field(
        description="The end-to-end figures (EndToEnd's, without by_task and the version)."
    )
    promoted: str
    tasks: dict[str, str] = Field(description="Task id -> `status: reason`.")
    savings: Savings


class ManifestUnreadable(BaseModel):
    """A manifest.yaml `slmify run` found but could not read."""

    model_config = ConfigDict(extra="forbid")

    path: str
    error: str


class RunSummary(BaseModel):
    """What `slmify run` did: each stage, the drift found, the manifest, the exit code."""

    model_config = ConfigDict(extra="forbid")

    config: str
    workspace: str
    message: str
    did_work: bool
    stages: list[StageOutcome]
    drift: list[DriftFinding]
    demoted: dict[str, str] = Field(description="Task -> why it is still demoted.")
    manifest: ManifestStatus | ManifestUnreadable | None
    exit_code: int
    exit_meaning: str


class RunRecord(BaseModel):
    """`run/summary.json`: the last `slmify run`'s summary (what a CI job reads after it)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    summary: RunSummary
