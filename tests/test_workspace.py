"""The files stages pass each other: one strict reader and one atomic writer each (slmify
.workspace), their bytes those the stages wrote before, and their names spelled only there."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmify.cli import app
from slmify.errors import SlmifyError
from slmify.schema import RouterMeta, SpecialistResult, Splits, TaskCluster
from slmify.workspace import (
    Workspace,
    WorkspaceError,
    read_router_meta,
    read_splits_file,
    write_router_meta,
)

TASKS = [
    TaskCluster(id="t01-book", label="book", output_shape="tool_call", calls=3, share=0.75),
    TaskCluster(id="t02-ask", label="ask", output_shape="text", calls=1, share=0.25),
]
SPLITS = Splits(
    key="session (call id when absent), sha256",
    validation_fraction=0.1,
    test_fraction=0.2,
    calibration_fraction=0.3,
    train=["c1"],
    validation=[],
    calibration=["c2"],
    test=["c3", "é4"],
)


def test_round_trips_and_the_bytes_the_stages_wrote_before(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.write_tasks(TASKS)
    ws.write_assignments({"c1": "t01-book", "c2": None, "é4": "t02-ask"})
    ws.write_splits("t01-book", SPLITS)
    assert ws.tasks() == TASKS
    assert ws.assignments() == {"c1": "t01-book", "c2": None, "é4": "t02-ask"}
    assert ws.assigned() == {"c1": "t01-book", "é4": "t02-ask"}
    assert ws.splits("t01-book") == SPLITS
    # What cluster, drift and datasets wrote by hand before there was one writer.
    doc = {"schema_version": 1, "tasks": [t.model_dump(mode="json") for t in TASKS]}
    assert ws.tasks_file().read_text() == json.dumps(doc, indent=1)
    assert ws.assignments_file().read_text(encoding="utf-8") == (
        '{"schema_version": 1, "id": "c1", "task": "t01-book"}\n'
        '{"schema_version": 1, "id": "c2", "task": null}\n'
        '{"schema_version": 1, "id": "é4", "task": "t02-ask"}\n'
    )
    # Lines written before each carried its version are version 1; another version is not.
    ws.assignments_file().write_text(
        '{"id": "c1", "task": "t01-book"}\n{"id": "c2", "task": null}\n'
    )
    assert ws.assignments() == {"c1": "t01-book", "c2": None}
    ws.assignments_file().write_text('{"schema_version": 2, "id": "c1", "task": "t01-book"}\n')
    with pytest.raises(WorkspaceError) as e:
        ws.assignments()
    assert str(e.value) == (
        f"{ws.assignments_file()}:1: schema_version 2, this slmify reads 1: "
        "run `slmify cluster` again"
    )
    split_record = {
        "schema_version": 1,
        "key": "session (call id when absent), sha256",
        "validation_fraction": 0.1,
        "test_fraction": 0.2,
        "calibration_fraction": 0.3,
        **{s: getattr(SPLITS, s) for s in ("train", "validation", "calibration", "test")},
    }
    path = ws.specialist_dir("t01-book") / "splits.json"
    assert path.read_text() == json.dumps(split_record, indent=1)
    # Only the files: no temporary file left beside them.
    assert sorted(p.name for p in ws.cluster_dir().iterdir()) == ["tasks.json"]


ROUTER_SETTINGS = {
    "embedding_model": "sentence-transformers/all-MiniLM-L6-v2",
    "max_seq_length": 128,
    "min_confidence": 0.5,
    "shared_lines": {"agent-a": ["h1", "h2"]},
}


def test_the_router_metadata_as_fit_router_wrote_it(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    assert ws.router_meta() is None
    holdout = {"accuracy": 0.9, "test_calls": 10, "test_sessions": 2, "routed_share": 0.8}
    meta = RouterMeta(
        **ROUTER_SETTINGS,
        identities=["agent-a"],
        previous_actions=["", "tool:search"],
        holdout=holdout | {"accuracy_when_routed": None},
        classes=["LLM", "t01-book"],
    )
    write_router_meta(ws.router_dir(), meta)
    assert ws.router_meta() == meta == read_router_meta(ws.router_dir())
    # The dict router.fit_router dumped before RouterMeta, key for key.
    old = {
        **ROUTER_SETTINGS,
        "schema_version": 1,
        "identities": ["agent-a"],
        "previous_actions": ["", "tool:search"],
        "holdout": holdout | {"accuracy_when_routed": None},
        "classes": ["LLM", "t01-book"],
    }
    path = ws.router_dir() / "router.json"
    added = {"held_out_share": None, "features": None, "turn_ngrams": []}
    added |= {"task_features": None, "task_ngrams": [], "reply_ngrams": []}
    assert path.read_text(encoding="utf-8") == json.dumps(old | added, indent=1)
    assert type(ws.router_meta().holdout["test_calls"]) is int
    # A router written before held_out_share: fitted on every call, as it then was.
    path.write_text(json.dumps(old, indent=1), encoding="utf-8")
    assert ws.router_meta() == meta and ws.router_meta().held_out_share is None
    # ...and before features and turn_ngrams: the turn's embedding, no n-grams.
    path.write_text(json.dumps(old | {"held_out_share": 0.35}, indent=1), encoding="utf-8")
    assert ws.router_meta() == meta.model_copy(update={"held_out_share": 0.35})
    assert (ws.router_meta().features, ws.router_meta().turn_ngrams) == (None, [])
    # A router on the last turn's n-grams: its blocks and vocabulary, after the old keys.
    ngrams = meta.model_copy(
        update={"held_out_share": 0.35, "features": ["turn_ngrams"], "turn_ngrams": ["a", "a b"]}
    )
    write_router_meta(ws.router_dir(), ngrams)
    added = {"held_out_share": 0.35, "features": ["turn_ngrams"], "turn_ngrams": ["a", "a b"]}
    assert path.read_text(encoding="utf-8") == json.dumps(
        old | added | {"task_features": None, "task_ngrams": [], "reply_ngrams": []}, indent=1
    )
    assert ws.router_meta() == ngrams
    # ...and before task_features and task_ngrams: the task statement's embedding only.
    path.write_text(json.dumps(old | added, indent=1), encoding="utf-8")
    assert ws.router_meta() == ngrams
    assert (ws.router_meta().task_features, ws.router_meta().task_ngrams) == (None, [])
    # A router on the task statement's n-grams too: after every older key.
    task = {"task_features": ["task_ngrams"], "task_ngrams": ["b", "b c", "c"]}
    both = ngrams.model_copy(update=task)
    write_router_meta(ws.router_dir(), both)
    reply = {"reply_ngrams": []}
    assert path.read_text(encoding="utf-8") == json.dumps(old | added | task | reply, indent=1)
    assert ws.router_meta() == both
    bad = old | added | task | {"task_features": ["turn_ngrams"]}
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(WorkspaceError) as e:
        ws.router_meta()
    tasks = "'task_embedding' or 'task_ngrams'"
    assert str(e.value) == f"{path}: not a RouterMeta (task_features.0: Input should be {tasks})"
    path.write_text(json.dumps(old | added | {"features": ["turn_words"]}), encoding="utf-8")
    with pytest.raises(WorkspaceError) as e:
        ws.router_meta()
    names = "'turn_embedding' or 'turn_ngrams'"
    assert str(e.value) == f"{path}: not a RouterMeta (features.0: Input should be {names})"
    # What tests/test_run.py forged before: no version, no vocabularies.
    path.write_text(json.dumps({**ROUTER_SETTINGS, "schema_version": 1, "classes": []}))
    with pytest.raises(WorkspaceError) as e:
        ws.router_meta()
    assert str(e.value) == f"{path}: not a RouterMeta (identities: Field required, 3 errors)"


def test_eval_reports_and_the_headline(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from slmify.schema import Agreement, EndToEnd, EvalReport, GateDecision, ModelEval

    ws = Workspace.at(tmp_path)
    assert ws.eval_report("t01-book") is None and ws.end_to_end() is None
    agree = Agreement(n=3, mean=1.0, lower=0.4, upper=1.0, confidence=0.95, method="wilson")
    report = EvalReport(
        task_id="t01-book",
        output_shape="tool_call",
        specialist=ModelEval(agreement=agree),
        base=None,
        decision=GateDecision(status="llm", reason="3 calls", threshold=0.9),
        adapter="adapter",
        calls_file="calls.jsonl",
        created_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
    )
    ws.write_eval_report(report)
    assert ws.eval_report("t01-book") == report
    # evaluate wrote model_dump_json(indent=2) to eval/<task id>/report.json before.
    path = tmp_path / "eval" / "t01-book" / "report.json"
    assert path.read_text(encoding="utf-8") == report.model_dump_json(indent=2)
    headline = EndToEnd(
        split="test",
        sessions=2,
        calls=5,
        served=0,
        served_share=0.0,
        agreement=None,
        agreement_lower=None,
        confidence=0.95,
        method=None,
        served_without_deferral=0,
        agreement_without_deferral=None,
        agreement_lower_without_deferral=None,
        reasons={"llm": 5},
        routed_share=0.0,
        routing_accuracy=None,
    )
    ws.write_end_to_end(headline)
    assert ws.end_to_end() == headline
    summary = tmp_path / "eval" / "endtoend" / "summary.json"
    assert summary.read_text(encoding="utf-8") == headline.model_dump_json(indent=2)
    assert json.loads(summary.read_text())["schema_version"] == 1
    # A headline written before it had a version reads as version 1; another version not.
    summary.write_text(headline.model_dump_json(exclude={"schema_version"}))
    assert ws.end_to_end() == headline
    summary.write_text(headline.model_copy(update={"schema_version": 2}).model_dump_json())
    with pytest.raises(WorkspaceError, match="schema_version 2, this slmify reads 1"):
        ws.end_to_end()
    path.write_text(report.model_dump_json().replace('"schema_version":1', '"schema_version":0'))
    with pytest.raises(WorkspaceError) as e:
        ws.eval_report("t01-book")
    assert str(e.value) == (
        f"{path}: schema_version 0, this slmify reads 1: run the stage that writes it again"
    )


def test_the_run_state_is_empty_until_written_then_stamped(tmp_path: Path) -> None:
    from slmify.schema import Demotion, RunState

    ws = Workspace.at(tmp_path)
    assert ws.run_state() == RunState()
    state = RunState(
        eval={"t01-book": "h1"}, demoted={"t02-ask": Demotion(adapter="a", reason="r")}
    )
    ws.write_run_state(state)
    assert state.updated_at is not None and ws.run_state() == state
    assert ws.run_state_file().read_text() == state.model_dump_json(indent=2)
    assert sorted(p.name for p in ws.run_state_file().parent.iterdir()) == ["state.json"]


def test_a_result_names_the_adapter_in_its_folder_wherever_the_workspace_moved(
    tmp_path: Path,
) -> None:
    ws = Workspace.at(tmp_path / "a")
    trained = SpecialistResult(id="t01-book", status="trained", adapter="/elsewhere/adapter")
    ws.write_result(trained)
    assert ws.result_file("t01-book").read_text() == trained.model_dump_json(indent=2)
    assert ws.result("t01-book").adapter == str(ws.specialist_dir("t01-book") / "adapter")
    assert ws.trained("t01-book").id == "t01-book"
    ws.write_result(SpecialistResult(id="t02-ask", status="skipped", reason="3 calls"))
    assert ws.trained("t02-ask") == "no specialist: training skipped (3 calls)"
    assert ws.trained("t03-none") == "no specialist trained (run `slmify train`)"
    assert ws.result("t03-none") is None


def test_readers_refuse_what_their_writer_does_not_write(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    with pytest.raises(WorkspaceError) as e:
        ws.tasks()
    assert str(e.value) == f"{ws.tasks_file()} not found: run `slmify cluster` first"
    # The forgeries the tests used to write: no version, and a split file of "test" only.
    ws.cluster_dir().mkdir()
    ws.tasks_file().write_text(json.dumps({"tasks": [t.model_dump(mode="json") for t in TASKS]}))
    with pytest.raises(WorkspaceError) as e:
        ws.tasks()
    assert str(e.value) == (
        f"{ws.tasks_file()}: no schema_version, not a TaskList file as slmify writes it"
    )
    ws.tasks_file().write_text(json.dumps({"schema_version": 2, "tasks": []}))
    with pytest.raises(WorkspaceError) as e:
        ws.tasks()
    assert str(e.value) == (
        f"{ws.tasks_file()}: schema_version 2, this slmify reads 1: "
        "run the stage that writes it again"
    )
    folder = ws.specialist_dir("t01-book")
    folder.mkdir(parents=True)
    (folder / "splits.json").write_text(json.dumps({"schema_version": 1, "test": ["c3"]}))
    with pytest.raises(WorkspaceError) as e:
        ws.splits("t01-book")
    assert str(e.value) == (
        f"{folder / 'splits.json'}: not a Splits (key: Field required, 7 errors)"
    )
    ws.assignments_file().write_text('{"id": "c1", "task": "t01-book"}\n{"id": "c2"}\n')
    with pytest.raises(WorkspaceError) as e:
        ws.assignments()
    assert str(e.value) == (
        f"{ws.assignments_file()}:2: not an assignment line (task: Field required)"
    )
    assert issubclass(WorkspaceError, SlmifyError) and WorkspaceError("x").exit_code == 1


def test_a_forged_file_is_one_error_line_from_the_cli(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    ws.write_tasks(TASKS)
    ws.write_assignments({"c1": "t01-book"})
    ws.tasks_file().write_text(json.dumps({"tasks": []}))
    result = CliRunner().invoke(app, ["train", "-w", str(ws.root)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {ws.tasks_file()}: no schema_version, not a TaskList file as slmify writes it"
    )


def test_a_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace.at(tmp_path)
    ws.write_splits("t01-book", SPLITS)
    before = (ws.specialist_dir("t01-book") / "splits.json").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("slmify.modelfile.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ws.write_splits("t01-book", SPLITS.model_copy(update={"test": []}))
    assert (ws.specialist_dir("t01-book") / "splits.json").read_bytes() == before
    assert [p.name for p in ws.specialist_dir("t01-book").iterdir()] == ["splits.json"]
    assert read_splits_file(ws.specialist_dir("t01-book")) == SPLITS


# -- the names, spelled once ----------------------------------------------------------------

FILES = (
    "tasks.json",
    "map.json",
    "report.json",
    "assignments.jsonl",
    "result.json",
    "splits.json",
    "recipe.yaml",
    "router.json",
    "router.npz",
    "summary.json",
    "state.json",
    "metrics.json",
    "pruning.json",
)
FOLDERS = ("specialists", "cluster", "eval")
SLMIFY = Path(__file__).resolve().parents[1] / "slmify"


def spelled_paths(source: str) -> list[str]:
    """Where a module spells an artifact's name: a file name in any string but a docstring
    or a field's `description=` (documentation, as docstrings are), or a folder name joined
    onto the workspace (`ws.root / "cluster"`, `ws.path("cluster")`)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    docstrings |= {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "description"
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and any(f in node.value for f in FILES):
                found.append((node.lineno, node.col_offset, node.value))
        joined = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            # Onto the workspace only: `RECIPES_DIR / "cluster"` is the cluster recipes.
            if any(w in ast.unparse(node.left) for w in ("root", "ws")):
                joined = [node.right]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("path", "joinpath"):
                joined = node.args
        for arg in joined:
            if isinstance(arg, ast.Constant) and arg.value in FOLDERS:
                found.append((arg.lineno, arg.col_offset, arg.value))
    return [f"line {line}: {value!r}" for line, _, value in sorted(found)]


def test_the_check_sees_each_spelling() -> None:
    src = (
        'a = ws.root / "cluster" / "tasks.json"\nb = ws_root / "specialists"\n'
        'c = self.ws.path("cluster", "x")\nd = RECIPES_DIR / "cluster"\ne = f"{x}/splits.json"\n'
        'f = Field(description="weights in router.npz")\n'
    )
    assert spelled_paths(src) == [
        "line 1: 'cluster'",
        "line 1: 'tasks.json'",
        "line 2: 'specialists'",
        "line 3: 'cluster'",
        "line 5: '/splits.json'",
    ]


def test_only_the_workspace_spells_the_artifacts_paths() -> None:
    found = {
        path.name: where
        for path in sorted(SLMIFY.glob("*.py"))
        if path.name != "workspace.py"
        and (where := spelled_paths(path.read_text(encoding="utf-8")))
    }
    assert found == {}, "name these through slmify.workspace: " + json.dumps(found, indent=1)


# -- the stages' summaries and the cluster report -------------------------------------------


def test_summaries_and_the_cluster_report_round_trip(tmp_path: Path) -> None:
    from slmify.schema import DriftFinding, Savings, StageOutcome
    from slmify.schema_stages import (
        CallMap,
        ClusterSummary,
        ManifestStatus,
        ManifestUnreadable,
        RunSummary,
        TrainSummary,
    )
    from slmify.workspace import write_call_map, write_cluster_report

    ws = Workspace.at(tmp_path)
    assert (ws.cluster_report(), ws.call_map(), ws.train_summary(), ws.run_summary()) == (
        (None,) * 4
    )
    cluster = ClusterSummary(
        calls=5, tasks=2, unassigned=1, unassigned_share=0.2, algorithm="kmeans",
        clusters_found=2, silhouette=None, embedded=10, embeddings_cached=0,
        tokens="from logged usage", router_holdout={"accuracy": 0.9, "test_calls": 4},
        embed_seconds=0.1, cluster_seconds=0.2, seconds=0.4, tasks_path="t", assignments="a",
        report="r", router="d",
    )  # fmt: skip
    write_cluster_report(ws.cluster_dir(), cluster, TASKS)
    write_call_map(
        ws.cluster_dir(), CallMap(points=[(0.5, -1.25), (2, 3)], task=["t01-book", None])
    )
    report = ws.cluster_report()
    assert (report.summary, report.tasks) == (cluster, TASKS)
    assert type(report.summary.router_holdout["test_calls"]) is int
    # report.json's shape as report.py wrote it by hand before.
    doc = json.loads((ws.cluster_dir() / "report.json").read_text())
    assert list(doc) == ["schema_version", "summary", "tasks"] and doc["schema_version"] == 1
    assert doc["summary"] == cluster.model_dump(mode="json")
    assert json.loads((ws.cluster_dir() / "map.json").read_text()) == {
        "schema_version": 1,
        "points": [[0.5, -1.25], [2.0, 3.0]],
        "task": ["t01-book", None],
    }
    result = SpecialistResult(id="t01-book", status="skipped", reason="too few calls")
    train = TrainSummary(
        recipe="cpu", base_model="smollm2-135m", device="cpu", plan=["1 thread"], calls="curated",
        trained=0, skipped=1, validation_loss={}, heads={}, tasks=[result],
    )  # fmt: skip
    ws.write_train_summary(train)
    assert ws.train_summary() == train
    savings = Savings(
        specialist_share=0.0, specialist_calls=0, llm_cost_usd=1.0, llm_cost_usd_moved=0.0,
        llm_latency_s_moved=None, prices="test",
    )  # fmt: skip
    status = ManifestStatus(
        path="m", headline="h", end_to_end=None, promoted="0 of 2 tasks",
        tasks={"t01-book": "llm: x"}, savings=savings,
    )  # fmt: skip
    drift = DriftFinding(kind="share-moved", task_id="t01-book", action="retrain", detail="d")
    run = RunSummary(
        config="c", workspace=str(tmp_path), message="m", did_work=True,
        stages=[StageOutcome(name="collect", ran=True, reason="new", details={"read": 3})],
        drift=[drift], demoted={}, manifest=status, exit_code=0, exit_meaning="ok",
    )  # fmt: skip
    for manifest in (status, ManifestUnreadable(path="m", error="bad"), None):
        ws.write_run_summary(run.model_copy(update={"manifest": manifest}))
        assert ws.run_summary() == run.model_copy(update={"manifest": manifest})
    (ws.root / "run" / "summary.json").write_text(json.dumps({"summary": {}}))
    with pytest.raises(WorkspaceError, match="no schema_version, not a RunRecord file"):
        ws.run_summary()


def test_the_pruning_as_datasets_writes_it(tmp_path: Path) -> None:
    from slmify.schema import ContextPolicy, PromptPruning
    from slmify.workspace import read_pruning_file, write_pruning_file

    pruning = PromptPruning(
        system="You are the booking step.",
        tools_action="compact",
        tools=[{"name": "book", "parameters": {"type": "object"}}],
        context=ContextPolicy(max_turns=4),
    )
    with pytest.raises(WorkspaceError) as e:
        read_pruning_file(tmp_path)
    assert str(e.value) == f"{tmp_path / 'pruning.json'} not found: run `slmify train` first"
    path = write_pruning_file(tmp_path, pruning)
    # The bytes slmify.datasets writes (model_dump_json(indent=2)).
    assert path.read_text(encoding="utf-8") == pruning.model_dump_json(indent=2)
    assert read_pruning_file(tmp_path) == pruning
