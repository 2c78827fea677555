"""Where slmify keeps its state, and the files stages pass each other.

One folder holds everything a run produces (the SQLite store, cluster artifacts,
specialists, reports, the manifest). It is `--workspace DIR`, else `$SLMIFY_WORKSPACE`,
else `./slmify-workspace`. Tests point `SLMIFY_WORKSPACE` at a temporary folder.

The files one stage writes and another reads are named here and nowhere else, each read
and written by one method of `Workspace`, as a model of slmify.schema:

- cluster/tasks.json          `TaskList` (`tasks`, `write_tasks`), written by cluster and by
                              drift's placing of new calls;
- cluster/report.json         `ClusterReport` (`cluster_report`; `write_cluster_report` for
                              the staging folder), the cluster run's summary and tasks;
- cluster/map.json            `CallMap` (`call_map`; `write_call_map`), the calls in 2-D;
- cluster/router/router.json  `RouterMeta` (`router_meta`; `read_router_meta` and
                              `write_router_meta` for the staging folder cluster writes it
                              in), beside router.npz (the weights, slmify.router's);
- assignments.jsonl           `Assignment` per line (`assignments`, `write_assignments`);
                              a line without `schema_version` is read as version 1;
- eval/<task id>/report.json  `EvalReport` (`eval_report`, `write_eval_report`), written by
                              eval, read by the manifest, run and the workspace report;
- eval/endtoend/summary.json  `EndToEnd` (`end_to_end`, `write_end_to_end`), eval's headline
                              (one without `schema_version`, written before it had one, is
                              read as version 1);
- run/state.json              `RunState` (`run_state`, `write_run_state`), `slmify run`'s;
- run/summary.json            `RunRecord` (`run_summary`, `write_run_summary`), its summary;
- specialists/summary.json    `TrainRecord` (`train_summary`, `write_train_summary`), the
                              last training run's summary;
- specialists/<task id>/      train's folder per task (`specialist_dir`): result.json
                              (`SpecialistResult`: `result`, `write_result`), splits.json
                              (`Splits`: `splits`, `write_splits`; `read_splits_file` and
                              `write_splits_file` for a folder outside a workspace),
                              pruning.json (`PromptPruning`: `read_pruning_file`,
                              `write_pruning_file`), the resolved recipe (`recipe_file`) and
                              metrics.json (training's figures, `write_metrics_file`; read
                              by people only).

Readers are strict: a missing file, a missing or other `schema_version`, or a field the
model rejects is a `WorkspaceError` naming the file. Writers write a temporary file in the
same folder and rename it over the old one, so a reader never sees half a file (both in
slmify.modelfile).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmify.modelfile import WorkspaceError, first_error, read_model, write_text

if TYPE_CHECKING:  # the schema loads on first use: `--help` stays instant
    from slmify.schema import (
        AgentPlan,
        EndToEnd,
        EvalReport,
        PromptPruning,
        RouterMeta,
        RunState,
        SpecialistResult,
        Splits,
        TaskCluster,
    )
    from slmify.schema_stages import (
        CallMap,
        ClusterReport,
        ClusterSummary,
        RunSummary,
        TrainSummary,
    )

DEFAULT_WORKSPACE = "slmify-workspace"
# The artifacts' names, relative to the workspace or to a specialist's folder.
CLUSTER_DIR = "cluster"
TASKS_FILE = "tasks.json"
CLUSTER_REPORT_FILE = "report.json"
CLUSTER_PAGE_FILE = "report.html"
CALL_MAP_FILE = "map.json"
ROUTER_DIR = "router"
ROUTER_META_FILE = "router.json"
ROUTER_WEIGHTS_FILE = "router.npz"
ASSIGNMENTS_FILE = "assignments.jsonl"
SPECIALISTS_DIR = "specialists"
EVAL_DIR = "eval"
EVAL_REPORT_FILE = "report.json"
ENDTOEND_DIR = "endtoend"
ENDTOEND_FILE = "summary.json"
RUN_DIR = "run"
RUN_STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"  # a stage's last summary: specialists/ and run/
CURATION_REPORT_FILE = "curation-report.json"
RESULT_FILE = "result.json"
SPLITS_FILE = "splits.json"
PRUNING_FILE = "pruning.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
AGENT_PLAN_FILE = "agent.json"  # an agent-level specialist's folder: which task each action is


@dataclass(frozen=True)
class Workspace:
    root: Path
    store_url: str

    @classmethod
    def resolve(cls, workspace: Path | None = None, store: str | None = None) -> Workspace:
        root = Path(workspace or os.environ.get("SLMIFY_WORKSPACE") or DEFAULT_WORKSPACE)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root=root, store_url=store or str(root / "calls.db"))

    @classmethod
    def at(cls, root: Path) -> Workspace:
        """The workspace in `root`, for code handed a folder (its store is not used)."""
        return cls(root=Path(root), store_url=str(Path(root) / "calls.db"))

    def path(self, *parts: str) -> Path:
        """A path inside the workspace, its parent folder created."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def curation_report_file(self) -> Path:
        """curate's audit report (for people; no stage reads it)."""
        return self.path(CURATION_REPORT_FILE)

    def open_store(self):  # noqa: ANN201 - avoids importing the store for --help
        from slmify.store import open_store

        return open_store(self.store_url)

    # -- cluster: the tasks, the router, which task each call is --------------------------

    def cluster_dir(self) -> Path:
        return self.root / CLUSTER_DIR

    def tasks_file(self) -> Path:
        return self.cluster_dir() / TASKS_FILE

    def router_dir(self) -> Path:
        return self.cluster_dir() / ROUTER_DIR

    def assignments_file(self) -> Path:
        return self.root / ASSIGNMENTS_FILE

    def has_clustering(self) -> bool:
        """Whether `slmify cluster` has left its tasks, router and assignments."""
        files = (self.tasks_file(), router_meta_file(self.router_dir()), self.assignments_file())
        return all(f.exists() for f in files)

    def router_meta(self) -> RouterMeta | None:
        """The router's settings and classes, None when clustering fitted none."""
        if not router_meta_file(self.router_dir()).exists():
            return None
        return read_router_meta(self.router_dir())

    def tasks(self) -> list[TaskCluster]:
        """The tasks, ranked by value as clustering wrote them."""
        from slmify.schema import TaskList

        path = self.tasks_file()
        if not path.exists():
            raise WorkspaceError(f"{path} not found: run `slmify cluster` first")
        return read_model(path, TaskList).tasks

    def write_tasks(self, tasks: list[TaskCluster], folder: Path | None = None) -> Path:
        """tasks.json in the cluster folder, or in `folder` (cluster's staging folder, swapped
        in whole once everything in it is written)."""
        from slmify.schema import SCHEMA_VERSION, TaskList

        path = (folder or self.cluster_dir()) / TASKS_FILE
        doc = TaskList(schema_version=SCHEMA_VERSION, tasks=tasks).model_dump(mode="json")
        write_text(path, json.dumps(doc, indent=1))
        return path

    def cluster_report(self) -> ClusterReport | None:
        """The last clustering's summary and tasks, None before `slmify cluster`."""
        from slmify.schema_stages import ClusterReport

        path = self.cluster_dir() / CLUSTER_REPORT_FILE
        return read_model(path, ClusterReport) if path.exists() else None

    def call_map(self) -> CallMap | None:
        """The map of the calls report.html shows, None before `slmify cluster`."""
        from slmify.schema_stages import CallMap

        path = self.cluster_dir() / CALL_MAP_FILE
        return read_model(path, CallMap) if path.exists() else None

    def assignments(self) -> dict[str, str | None]:
        """Every clustered call id -> its task id, None for a call that fits no task."""
        from pydantic import ValidationError

        from slmify.schema import SCHEMA_VERSION, Assignment

        path = self.assignments_file()
        if not path.exists():
            raise WorkspaceError(f"{path} not found: run `slmify cluster` first")
        out: dict[str, str | None] = {}
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    row = Assignment.model_validate_json(line)
                except ValidationError as e:
                    raise WorkspaceError(
                        f"{path}:{lineno}: not an assignment line ({first_error(e)})"
                    ) from None
                if row.schema_version != SCHEMA_VERSION:
                    raise WorkspaceError(
                        f"{path}:{lineno}: schema_version {row.schema_version!r}, this slmify "
                        f"reads {SCHEMA_VERSION}: run `slmify cluster` again"
                    )
                out[row.id] = row.task
        return out

    def assigned(self) -> dict[str, str]:
        """The calls a task holds: call id -> task id."""
        return {c: t for c, t in self.assignments().items() if t is not None}

    def write_assignments(self, assignment: Mapping[str, str | None]) -> Path:
        from slmify.schema import SCHEMA_VERSION

        path = self.assignments_file()
        rows = (
            {"schema_version": SCHEMA_VERSION, "id": c, "task": t} for c, t in assignment.items()
        )
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return path

    # -- train: a folder per task ----------------------------------------------------------

    def specialists_dir(self) -> Path:
        return self.root / SPECIALISTS_DIR

    def specialist_dir(self, task_id: str) -> Path:
        return self.specialists_dir() / task_id

    def result_file(self, task_id: str) -> Path:
        return self.specialist_dir(task_id) / RESULT_FILE

    def recipe_file(self, task_id: str) -> Path:
        """The resolved recipe training used (slmify.recipes reads and writes it)."""
        return recipe_file(self.specialist_dir(task_id))

    def result(self, task_id: str) -> SpecialistResult | None:
        """The task's training record, None before `slmify train` ran for it. Its adapter or
        head is the one in the task's folder, not at the path recorded then: a workspace
        may have been moved or copied."""
        from slmify.schema import SpecialistResult

        path = self.result_file(task_id)
        if not path.exists():
            return None
        result = read_model(path, SpecialistResult)
        folder = path.parent
        return result.model_copy(
            update={
                "adapter": str(folder / "adapter") if result.adapter else None,
                "head": str(folder / "head") if result.head else None,
            }
        )

    def write_result(self, result: SpecialistResult) -> Path:
        path = self.result_file(result.id)
        write_text(path, result.model_dump_json(indent=2))
        return path

    def trained(self, task_id: str) -> SpecialistResult | str:
        """The task's trained specialist, or why it has none (what eval and the manifest
        say of a task kept on the LLM for want of one)."""
        result = self.result(task_id)
        if result is None:
            return "no specialist trained (run `slmify train`)"
        if result.status != "trained" or not (result.adapter or result.head):
            return f"no specialist: training {result.status}" + (
                f" ({result.reason})" if result.reason else ""
            )
        return result

    def agent_plans(self) -> dict[str, AgentPlan]:
        """The agent-level specialists' plans (slmify.agent), by specialist id."""
        from slmify.schema import AgentPlan

        root = self.specialists_dir()
        found = sorted(root.glob(f"*/{AGENT_PLAN_FILE}")) if root.is_dir() else []
        return {p.parent.name: read_model(p, AgentPlan) for p in found}

    def write_agent_plan(self, agent: str, plan: AgentPlan) -> Path:
        path = self.specialist_dir(agent) / AGENT_PLAN_FILE
        write_text(path, plan.model_dump_json(indent=2))
        return path

    def splits(self, task_id: str) -> Splits:
        return read_splits_file(self.specialist_dir(task_id))

    def write_splits(self, task_id: str, splits: Splits) -> Path:
        return write_splits_file(self.specialist_dir(task_id), splits)

    def train_summary(self) -> TrainSummary | None:
        """The last training run's summary, None before `slmify train`."""
        from slmify.schema_stages import TrainRecord

        path = self.specialists_dir() / SUMMARY_FILE
        return read_model(path, TrainRecord).summary if path.exists() else None

    def write_train_summary(self, summary: TrainSummary) -> Path:
        from slmify.schema_stages import TrainRecord

        path = self.specialists_dir() / SUMMARY_FILE
        write_text(path, TrainRecord(summary=summary).model_dump_json(indent=2))
        return path

    # -- eval: a report per task, the headline of the whole deployment ------------------

    def evals_dir(self) -> Path:
        return self.root / EVAL_DIR

    def eval_dir(self, task_id: str) -> Path:
        """eval/<task id>/: its report and its routed test calls."""
        return self.evals_dir() / task_id

    def eval_report_file(self, task_id: str) -> Path:
        return self.eval_dir(task_id) / EVAL_REPORT_FILE

    def eval_report(self, task_id: str) -> EvalReport | None:
        """The task's evaluation, None before `slmify eval` evaluated it."""
        from slmify.schema import EvalReport

        path = self.eval_report_file(task_id)
        return read_model(path, EvalReport) if path.exists() else None

    def write_eval_report(self, report: EvalReport) -> Path:
        path = self.eval_report_file(report.task_id)
        write_text(path, report.model_dump_json(indent=2))
        return path

    def endtoend_dir(self) -> Path:
        """eval/endtoend/: the replayed calibration and test calls and the headline."""
        return self.evals_dir() / ENDTOEND_DIR

    def end_to_end_file(self) -> Path:
        return self.endtoend_dir() / ENDTOEND_FILE

    def end_to_end(self) -> EndToEnd | None:
        """The headline of the last `slmify eval`, None before one; a file written before
        EndToEnd had a schema_version is read as version 1."""
        from slmify.schema import EndToEnd

        path = self.end_to_end_file()
        return read_model(path, EndToEnd, unversioned_ok=True) if path.exists() else None

    def write_end_to_end(self, headline: EndToEnd) -> Path:
        path = self.end_to_end_file()
        write_text(path, headline.model_dump_json(indent=2))
        return path

    # -- run: the inputs each stage last ran on ------------------------------------------

    def run_state_file(self) -> Path:
        return self.root / RUN_DIR / RUN_STATE_FILE

    def run_state(self) -> RunState:
        """What `slmify run` recorded, an empty state before its first run."""
        from slmify.schema import RunState

        path = self.run_state_file()
        return read_model(path, RunState) if path.exists() else RunState()

    def write_run_state(self, state: RunState) -> Path:
        """Stamped with the time: written after every stage, so an interrupted run resumes."""
        from datetime import datetime, timezone

        state.updated_at = datetime.now(timezone.utc)
        path = self.run_state_file()
        write_text(path, state.model_dump_json(indent=2))
        return path

    def run_summary(self) -> RunSummary | None:
        """The last `slmify run`'s summary, None before one."""
        from slmify.schema_stages import RunRecord

        path = self.root / RUN_DIR / SUMMARY_FILE
        return read_model(path, RunRecord).summary if path.exists() else None

    def write_run_summary(self, summary: RunSummary) -> Path:
        from slmify.schema_stages import RunRecord

        path = self.root / RUN_DIR / SUMMARY_FILE
        write_text(path, RunRecord(summary=summary).model_dump_json(indent=2))
        return path


# -- the router's folder, wherever it is (cluster writes it in a staging folder) -------------


def router_meta_file(folder: Path) -> Path:
    return folder / ROUTER_META_FILE


def router_weights_file(folder: Path) -> Path:
    """router.npz: the projections and the weights, which slmify.router reads and writes."""
    return folder / ROUTER_WEIGHTS_FILE


def read_router_meta(folder: Path) -> RouterMeta:
    from slmify.schema import RouterMeta

    path = router_meta_file(folder)
    if not path.exists():
        raise WorkspaceError(f"{path} not found: run `slmify cluster` first")
    return read_model(path, RouterMeta)


def write_router_meta(folder: Path, meta: RouterMeta) -> Path:
    path = router_meta_file(folder)
    write_text(path, json.dumps(meta.model_dump(mode="json"), indent=1))
    return path


# -- the cluster report's files, in the folder cluster stages them in ------------------------


def cluster_page_file(folder: Path) -> Path:
    """report.html, which slmify.report renders (for people; no stage reads it)."""
    return folder / CLUSTER_PAGE_FILE


def write_cluster_report(folder: Path, summary: ClusterSummary, tasks: list[TaskCluster]) -> Path:
    from slmify.schema_stages import ClusterReport

    path = folder / CLUSTER_REPORT_FILE
    write_text(path, ClusterReport(summary=summary, tasks=tasks).model_dump_json(indent=1))
    return path


def write_call_map(folder: Path, call_map: CallMap) -> Path:
    path = folder / CALL_MAP_FILE
    write_text(path, call_map.model_dump_json())
    return path


# -- a specialist's folder, wherever it is (datasets builds one outside a workspace too) ----


def recipe_file(folder: Path) -> Path:
    return folder / RECIPE_FILE


def read_splits_file(folder: Path) -> Splits:
    from slmify.schema import Splits

    path = folder / SPLITS_FILE
    if not path.exists():
        raise WorkspaceError(f"{path} not found: run `slmify train` first")
    return read_model(path, Splits)


def write_metrics_file(folder: Path, metrics: Mapping[str, Any]) -> Path:
    """Training's figures for a person (curves, losses, speed), the same as the result's
    `metrics`; no stage reads this file, so it stays a plain object with no model."""
    path = folder / METRICS_FILE
    write_text(path, json.dumps(metrics, indent=2))
    return path


def read_pruning_file(folder: Path) -> PromptPruning:
    """What the task's prompts leave out (and its context policy), as training built them."""
    from slmify.schema import PromptPruning

    path = folder / PRUNING_FILE
    if not path.exists():
        raise WorkspaceError(f"{path} not found: run `slmify train` first")
    return read_model(path, PromptPruning)


def write_pruning_file(folder: Path, pruning: PromptPruning) -> Path:
    path = folder / PRUNING_FILE
    write_text(path, pruning.model_dump_json(indent=2))
    return path


def write_splits_file(folder: Path, splits: Splits) -> Path:
    path = folder / SPLITS_FILE
    write_text(path, json.dumps(splits.model_dump(mode="json"), indent=1))
    return path
