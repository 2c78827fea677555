"""Where slmify keeps its state, the files stages pass each other, and how a command prints
what it did.

One folder holds everything a run produces (the SQLite store, cluster artifacts,
specialists, reports, the manifest). It is `--workspace DIR`, else `$SLMIFY_WORKSPACE`,
else `./slmify-workspace`. Tests point `SLMIFY_WORKSPACE` at a temporary folder.

The files one stage writes and another reads are named here and nowhere else, each read
and written by one method of `Workspace`, as a model of slmify.schema:

- cluster/tasks.json          `TaskList` (`tasks`, `write_tasks`), written by cluster and by
                              drift's placing of new calls;
- cluster/router/router.json  `RouterMeta` (`router_meta`; `read_router_meta` and
                              `write_router_meta` for the staging folder cluster writes it
                              in), beside router.npz (the weights, slmify.router's);
- assignments.jsonl           `Assignment` per line (`assignments`, `write_assignments`);
- eval/<task id>/report.json  `EvalReport` (`eval_report`, `write_eval_report`), written by
                              eval, read by the manifest, run and the workspace report;
- eval/endtoend/summary.json  `EndToEnd` (`end_to_end`, `write_end_to_end`), eval's headline;
- run/state.json              `RunState` (`run_state`, `write_run_state`), `slmify run`'s;
- specialists/<task id>/      train's folder per task (`specialist_dir`): result.json
                              (`SpecialistResult`: `result`, `write_result`), splits.json
                              (`Splits`: `splits`, `write_splits`; `read_splits_file` and
                              `write_splits_file` for a folder outside a workspace), the
                              resolved recipe (`recipe_file`) and metrics.json (training's
                              figures, `write_metrics_file`; read by people only).

Readers are strict: a missing file, a missing or other `schema_version`, or a field the
model rejects is a `WorkspaceError` naming the file. Writers write a temporary file in the
same folder and rename it over the old one, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from slmify.errors import SlmifyError

if TYPE_CHECKING:  # pydantic and the schema load on first use: `--help` stays instant
    from pydantic import BaseModel, ValidationError

    from slmify.schema import (
        EndToEnd,
        EvalReport,
        RouterMeta,
        RunState,
        SpecialistResult,
        Splits,
        TaskCluster,
    )

DEFAULT_WORKSPACE = "slmify-workspace"
# The artifacts' names, relative to the workspace or to a specialist's folder.
CLUSTER_DIR = "cluster"
TASKS_FILE = "tasks.json"
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
RESULT_FILE = "result.json"
SPLITS_FILE = "splits.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"

M = TypeVar("M", bound="BaseModel")


class WorkspaceError(SlmifyError, ValueError):
    """A stage's file that is missing or not what its writer writes; the message names it."""


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

    def assignments(self) -> dict[str, str | None]:
        """Every clustered call id -> its task id, None for a call that fits no task."""
        from pydantic import ValidationError

        from slmify.schema import Assignment

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
                        f"{path}:{lineno}: not an assignment line ({_first(e)})"
                    ) from None
                out[row.id] = row.task
        return out

    def assigned(self) -> dict[str, str]:
        """The calls a task holds: call id -> task id."""
        return {c: t for c, t in self.assignments().items() if t is not None}

    def write_assignments(self, assignment: Mapping[str, str | None]) -> Path:
        path = self.assignments_file()
        rows = ({"id": c, "task": t} for c, t in assignment.items())
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

    def splits(self, task_id: str) -> Splits:
        return read_splits_file(self.specialist_dir(task_id))

    def write_splits(self, task_id: str, splits: Splits) -> Path:
        return write_splits_file(self.specialist_dir(task_id), splits)

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
        """The headline of the last `slmify eval`, None before one. The file has no
        schema_version: EndToEnd is also the manifest's `end_to_end`, whose bytes a version
        would change; its `extra="forbid"` still refuses another version's fields."""
        from slmify.schema import EndToEnd

        path = self.end_to_end_file()
        return read_model(path, EndToEnd, versioned=False) if path.exists() else None

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


def write_splits_file(folder: Path, splits: Splits) -> Path:
    path = folder / SPLITS_FILE
    write_text(path, json.dumps(splits.model_dump(mode="json"), indent=1))
    return path


# -- strict reads, atomic writes ------------------------------------------------------------


def read_model(path: Path, model: type[M], versioned: bool = True) -> M:
    """The file as `model`, its `schema_version` this slmify's (unless not `versioned`);
    else a WorkspaceError."""
    from pydantic import ValidationError

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise WorkspaceError(f"{path}: not JSON ({e})") from None
    if versioned:
        _check_version(path, model.__name__, doc)
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise WorkspaceError(f"{path}: not a {model.__name__} ({_first(e)})") from None


def _check_version(path: Path, name: str, doc: Any) -> None:
    from slmify.schema import SCHEMA_VERSION

    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise WorkspaceError(f"{path}: no schema_version, not a {name} file as slmify writes it")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise WorkspaceError(
            f"{path}: schema_version {doc['schema_version']!r}, this slmify reads "
            f"{SCHEMA_VERSION}: run the stage that writes it again"
        )


def write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (its folder made), then rename it over
    `path`."""
    # Named by process (not mkstemp's 0600 file): the file keeps the umask's permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _first(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "the document"
    return f"{where}: {err['msg']}" + (f", {len(e.errors())} errors" if len(e.errors()) > 1 else "")


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """Print a command's summary: one JSON object for scripts, else key: value lines."""
    if as_json:
        print(json.dumps(summary, default=str, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str, ensure_ascii=False)
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console().print(table)
