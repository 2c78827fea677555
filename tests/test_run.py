"""`slmify run`: stages skipped when their inputs are unchanged, incremental retraining,
drift and demotion, and the exit codes a CI job branches on.

Collect, curate, the run state, the incremental assignment and the manifest are real.
Clustering, the router, training and evaluation are fakes that write the same artifacts
in a moment (the real ones take minutes on a CPU): the clusters are the demo agent's four
steps, told apart by their system prompt, so these tests check the run's decisions, not
the stages (each stage has its own tests).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slmify.cli import app
from slmify.drift import (
    DriftConfig,
    Routed,
    agreement_finding,
    gate_regressions,
    live_scores,
    routing_findings,
)
from slmify.run import EXIT_BAD_INPUT
from slmify.run import run_pipeline as run_stages
from slmify.runconfig import (
    RunConfigError,
    load_config,
    resolve_cluster_recipe,
    resolve_recipe,
    resolve_sources,
)
from slmify.schema import (
    Agreement,
    AnswerScore,
    EvalReport,
    GateDecision,
    ModelEval,
    PromptPruning,
    RouterMeta,
    ServedRoute,
    SpecialistAttempt,
    SpecialistResult,
    TaskCluster,
)
from slmify.schema_stages import ClusterSummary, RunSummary, TrainSummary
from slmify.store import open_store
from slmify.workspace import Workspace, write_pruning_file, write_router_meta

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "calls.jsonl.gz"
STEPS = {
    "ticket triage": ("t01-classify", "label"),
    "extract order details": ("t02-extract", "json"),
    "order assistant": ("t03-lookup", "tool_call"),
    "write replies": ("t04-reply", "text"),
}
DRIFT = DriftConfig(
    min_new_calls=10,
    unassigned_fraction=0.25,
    share_change=0.1,
    confidence_drop=0.1,
    min_live_calls=5,
)


def step_of(request) -> str | None:
    system = request.messages[0].get("content", "") if request.messages else ""
    return next((task for key, (task, _) in STEPS.items() if key in system), None)


# -- fakes for the slow stages --------------------------------------------------------------


@dataclass
class Fakes:
    tiny_base: Path
    clustered: int = 0
    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    promote: set[str] = field(default_factory=set)
    fail_train: bool = False

    def cluster_store(self, store, ws, config, progress=False):
        """Tasks = the demo agent's steps; every training call assigned by its prompt."""
        self.clustered += 1
        rows = []
        for stored in store.iter_calls(training_only=True):
            rows.append({"id": stored.record.id, "task": step_of(stored.record.request)})
        tasks = []
        for task_id, shape in STEPS.values():
            n = sum(r["task"] == task_id for r in rows)
            tasks.append(
                TaskCluster(
                    id=task_id,
                    label=task_id,
                    output_shape=shape,
                    calls=n,
                    share=n / len(rows),
                    llm_cost_usd=0.01 * n,
                )
            )
        meta = RouterMeta(
            embedding_model="all-MiniLM-L6-v2",
            max_seq_length=128,
            min_confidence=0.5,
            shared_lines={},
            identities=[],
            previous_actions=[],
            holdout={"accuracy": None, "reason": "scripted"},
            classes=[t.id for t in tasks],
        )
        write_router_meta(ws.router_dir(), meta)
        ws.write_tasks(tasks)
        ws.write_assignments({r["id"]: r["task"] for r in rows})
        return ClusterSummary(
            calls=len(rows), tasks=len(tasks), unassigned=0, unassigned_share=0.0,
            algorithm="scripted", clusters_found=len(tasks), silhouette=None, embedded=0,
            embeddings_cached=0, tokens="from logged usage", router_holdout=meta.holdout,
            embed_seconds=0.0, cluster_seconds=0.0, seconds=0.0,
            tasks_path=str(ws.tasks_file()), assignments=str(ws.assignments_file()),
            report="", router=str(ws.router_dir()),
        )  # fmt: skip

    def route_calls(self, router, store, call_ids):
        routed = []
        for call_id in call_ids:
            # As the real router: an agent it never saw goes to the LLM, "sure" of it.
            task = step_of(store.get_call(call_id).record.request)
            routed.append(Routed(call_id, task, 0.95 if task else 1.0))
        return routed

    def train_all(self, ws, recipe, task_id=None, progress=True, only_agents=False):
        """A specialist folder as `slmify train` writes it; the adapter's bytes are a hash
        of the task's calls and the recipe, so they change exactly when those do. The demo
        agent's four prompts have a task each: no agent-level specialist to train (the
        real function finds none, loading no model)."""
        from slmify.datasets import assign_splits
        from slmify.recipes import save_resolved
        from slmify.schema import content_hash
        from slmify.train import TrainError, agent_jobs, gather_calls

        if only_agents:
            assert agent_jobs(ws, gather_calls(ws, ws.assigned())[0], recipe, None) == {}
            return TrainSummary(
                recipe=recipe.name,
                base_model=recipe.model.base,
                device="none",
                plan=[],
                calls="",
                trained=0,
                skipped=0,
                validation_loss={},
                heads={},
                tasks=[],
            )

        if self.fail_train:
            raise TrainError("specialists/t01-classify: out of memory (fake)")
        self.trained.append(task_id)
        calls = gather_calls(ws, ws.assigned())[0][task_id]
        folder = ws.specialist_dir(task_id)
        adapter = folder / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(self.tiny_base / name, adapter / name)
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
        ids = sorted(c.id for c in calls)
        weights = content_hash([ids, recipe.model_dump(mode="json")])
        (adapter / "adapter_model.safetensors").write_text(weights)
        save_resolved(recipe, ws.recipe_file(task_id))
        write_pruning_file(folder, PromptPruning())
        ws.write_splits(task_id, assign_splits(calls, recipe.dataset, None))
        result = SpecialistResult(
            id=task_id, status="trained", adapter=str(adapter), base_model=str(self.tiny_base)
        )
        ws.write_result(result)
        return TrainSummary(
            recipe=recipe.name, base_model=str(self.tiny_base), device="cpu", plan=[],
            calls="fake", trained=1, skipped=0, validation_loss={}, heads={}, tasks=[result],
        )  # fmt: skip

    def evaluate_workspace(
        self, ws_root, store, task_ids=None, limit=None, judge=None, progress=True, announce=print
    ):
        from slmify.evaluate import trained_task

        if task_ids is None:  # the whole deployment, as the real eval replays it
            tasks = Workspace.at(ws_root).tasks()
            task_ids = [t.id for t in tasks if not isinstance(trained_task(ws_root, t), str)]
        out = []
        for task_id in task_ids:
            self.evaluated.append(task_id)
            status = "promoted" if task_id in self.promote else "llm"
            write_report(ws_root, task_id, status, datetime.now(timezone.utc))
            out.append({"id": task_id, "status": status})
        return {"evaluated": len(out), "tasks": out}


def write_report(ws_root: Path, task_id: str, status: str, created: datetime) -> None:
    agree = Agreement(
        n=25,
        mean=0.96 if status == "promoted" else 0.5,
        lower=0.91,
        upper=0.99,
        confidence=0.95,
        method="wilson",
    )
    shape = next(t.output_shape for t in Workspace.at(ws_root).tasks() if t.id == task_id)
    report = EvalReport(
        task_id=task_id,
        output_shape=shape,
        specialist=ModelEval(agreement=agree),
        base=ModelEval(agreement=agree),
        decision=GateDecision(status=status, reason=f"fake gate: {status}", threshold=0.9),
        adapter="adapter",
        calls_file="calls.jsonl",
        created_at=created,
    )
    Workspace.at(ws_root).write_eval_report(report)


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch, tiny_base: Path) -> Fakes:
    """Training and evaluation faked; clustering and the router real."""
    f = Fakes(tiny_base)
    monkeypatch.setattr("slmify.train.train_all", f.train_all)
    monkeypatch.setattr("slmify.evaluate.evaluate_workspace", f.evaluate_workspace)
    return f


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, fake_training: Fakes) -> Fakes:
    """Clustering and the router faked too."""
    f = fake_training
    monkeypatch.setattr("slmify.cluster.cluster_store", f.cluster_store)
    monkeypatch.setattr("slmify.run.load_router", lambda path: None)
    monkeypatch.setattr("slmify.run.route_calls", f.route_calls)
    monkeypatch.setattr("slmify.run.router_confidence", lambda router, store, ids: 0.95)
    return f


def write_config(
    folder: Path, sources: list[str], overrides: list[str] | None = None, **sections: dict
) -> Path:
    cfg = {
        **sections,
        "sources": sources,
        "train": {"recipe": "cpu-smollm2-135m", "overrides": overrides or []},
        "eval": {"limit": 10},
        "drift": DRIFT.model_dump(),
    }
    path = folder / "slmify.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def new_calls(path: Path, marker: str, n: int, source: Path = DEMO) -> Path:
    """`n` new demo calls of the step whose system prompt holds `marker`: another order
    number and a reference line, so curation keeps them (not duplicates)."""
    out = []
    with gzip.open(source, "rt") as f:
        for line in f:
            row = json.loads(line)
            if marker in row["request"]["messages"][0]["content"] and row["response"].get(
                "choices"
            ):
                row["id"] = f"{path.stem}-{len(out)}"
                row["metadata"]["session_id"] = f"{path.stem}-session-{len(out)}"
                turn = row["request"]["messages"][-1]
                text = re.sub(r"AC-\d+", f"AC-9{len(out):05d}", turn["content"])
                turn["content"] = f"{text}\n(ref {path.stem}-{len(out)})"
                out.append(json.dumps(row))
            if len(out) == n:
                break
    path.write_text("\n".join(out) + "\n")
    return path


def run_pipeline(ws: Workspace, config: Path, progress: bool = True) -> dict:
    """`slmify run`'s summary as `--json` prints it; checked to be the one the run kept."""
    summary = run_stages(ws, config, progress=progress)
    assert isinstance(summary, RunSummary) and ws.run_summary() == summary
    return summary.model_dump(mode="json")


def ran(summary: dict) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in summary["stages"] if s["ran"]}


def workspace() -> Workspace:
    return Workspace.resolve()


# -- skipping what has not changed ----------------------------------------------------------


def test_second_run_does_nothing_and_says_so(fakes: Fakes, tmp_path: Path) -> None:
    config = write_config(tmp_path, [str(DEMO)])
    first = run_pipeline(workspace(), config, progress=False)
    assert first["exit_code"] == 0, first
    assert list(ran(first)) == ["collect", "curate", "cluster", "train", "eval", "manifest"]
    assert sorted(fakes.trained) == sorted(t for t, _ in STEPS.values())
    assert first["manifest"]["promoted"] == "0 of 4 tasks"

    second = run_pipeline(workspace(), config, progress=False)
    assert ran(second) == {}
    assert second["did_work"] is False
    assert second["message"].startswith("nothing to do")
    assert second["exit_code"] == 0
    assert (fakes.clustered, len(fakes.trained), len(fakes.evaluated)) == (1, 4, 4)
    # The manifest summary and savings are printed even when nothing ran.
    assert second["manifest"]["savings"]["llm_cost_usd"] > 0
    shown = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert shown.exit_code == 0
    assert "slmify run: nothing to do" in shown.stdout
    assert "t01-classify: llm: fake gate: llm" in shown.stdout
    assert "savings: 0.0% of calls (0) move to specialists, $0.00 of $12.00 LLM cost" in (
        shown.stdout
    )


def test_changed_recipe_retrains_every_task_but_does_not_recluster(
    fakes: Fakes, tmp_path: Path
) -> None:
    run_pipeline(workspace(), write_config(tmp_path, [str(DEMO)]), progress=False)
    fakes.trained.clear()
    config = write_config(tmp_path, [str(DEMO)], ["lora.r=4"])
    summary = run_pipeline(workspace(), config, progress=False)
    assert list(ran(summary)) == ["train", "eval", "manifest"]
    assert sorted(fakes.trained) == sorted(t for t, _ in STEPS.values())
    assert "t01-classify: the recipe changed" in ran(summary)["train"]
    assert fakes.clustered == 1


def test_new_calls_of_one_task_retrain_only_that_task(fakes: Fakes, tmp_path: Path) -> None:
    run_pipeline(workspace(), write_config(tmp_path, [str(DEMO)]), progress=False)
    fakes.trained.clear()
    fakes.evaluated.clear()
    new_calls(tmp_path / "new-1.jsonl", "ticket triage", 30)
    config = write_config(tmp_path, [str(DEMO), "new-*.jsonl"])
    summary = run_pipeline(workspace(), config, progress=False)

    stages = ran(summary)
    assert "new-1.jsonl (new)" in stages["collect"]
    assert stages["curate"] == "30 call(s) not curated yet"
    assert stages["cluster"] == "30 new call(s) placed in the existing tasks, no drift"
    assert fakes.clustered == 1  # placed by the router, not re-clustered
    assert fakes.trained == ["t01-classify"]
    assert stages["train"] == "t01-classify: its calls changed"
    # Eval replays the whole deployment: one retrained task changes what the others see.
    assert sorted(fakes.evaluated) == sorted(t for t, _ in STEPS.values())
    assert stages["eval"] == "new or retrained specialist(s): t01-classify"
    assert summary["drift"] == []
    tasks = workspace().tasks()
    sizes = {t.id: t.calls for t in tasks}
    assert sizes["t01-classify"] == sizes["t02-extract"] + 30
    assert sum(t.share for t in tasks) == pytest.approx(1.0, abs=1e-3)
    assert len(workspace().assignments()) == sum(sizes.values())


def test_new_task_type_reclusters_and_is_reported(fakes: Fakes, tmp_path: Path) -> None:
    run_pipeline(workspace(), write_config(tmp_path, [str(DEMO)]), progress=False)
    other = tmp_path / "new-agent.jsonl"
    new_calls(other, "ticket triage", 20)
    rows = [json.loads(line) for line in other.read_text().splitlines()]
    for row in rows:  # another agent: a system prompt no task has
        row["request"]["messages"][0]["content"] = "You translate tickets into French."
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_pipeline(
        workspace(), write_config(tmp_path, [str(DEMO), str(other)]), progress=False
    )
    assert ran(summary)["cluster"].startswith("re-clustered: drift: new-task-type")
    assert fakes.clustered == 2
    assert [f["kind"] for f in summary["drift"]] == ["new-task-type"]
    assert summary["exit_code"] == 0


# -- drift, unit by unit --------------------------------------------------------------------


def routed(task_counts: dict[str | None, int], confidence: float = 0.95) -> list[Routed]:
    return [
        Routed(f"{task}-{i}", task, confidence) for task, n in task_counts.items() for i in range(n)
    ]


def test_routing_drift_triggers() -> None:
    before = {f"{t}-{i}": t for t in ("a", "b") for i in range(50)}
    assert routing_findings(routed({"a": 6, "b": 6}), before, 0.95, DRIFT) == []
    # Too few new calls to judge anything, even all unplaced.
    assert routing_findings(routed({None: 9}), before, 0.95, DRIFT) == []

    unplaced = routing_findings(routed({"a": 10, None: 5}), before, 0.95, DRIFT)
    assert [f.kind for f in unplaced] == ["new-task-type"]
    assert unplaced[0].action == "re-cluster"
    assert unplaced[0].detail == "5 of 15 new calls fit no task (limit 25%)"

    moved = routing_findings(routed({"a": 40}), before, 0.95, DRIFT)
    assert [(f.kind, f.task_id) for f in moved] == [("share-moved", "a"), ("share-moved", "b")]
    assert moved[0].detail.startswith("share of calls 50.0% -> 64.3%")

    unsure = routing_findings(routed({"a": 5, "b": 5}, confidence=0.8), before, 0.95, DRIFT)
    assert [f.kind for f in unsure] == ["router-confidence-dropped"]
    assert "0.800 on 10 new calls, 0.950 on the calls it was fit on" in unsure[0].detail


def served(call_id: str, task_id: str, at: datetime, score: float | None, problem=None) -> dict:
    attempt = SpecialistAttempt(
        task_id=task_id,
        text="x",
        problem=problem,
        latency_ms=5.0,
        output_tokens=1,
        score=None
        if score is None
        else AnswerScore(shape="label", agree=score == 1.0, score=score),
    )
    route = ServedRoute(
        answered_by="llm",
        reason="shadow: sampled",
        task_id=task_id,
        shadow=problem is None,
        specialist=attempt,
    )
    return {
        "id": call_id,
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": call_id}]},
        "response": {
            "choices": [
                {"message": {"role": "assistant", "content": "billing"}, "finish_reason": "stop"}
            ]
        },
        "metadata": {"session_id": call_id, "route": route.model_dump(mode="json")},
        "timestamp": at.isoformat(),
    }


def import_rows(store, folder: Path, rows: list[dict]) -> None:
    from slmify.collect import import_files

    path = folder / "served.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_files(store, [path], folder / "rejects.jsonl")


def test_live_agreement_since_promotion(tmp_path: Path) -> None:
    promoted = datetime(2026, 11, 20, tzinfo=timezone.utc)
    rows = [served(f"old-{i}", "t01", promoted - timedelta(days=1), 0.0) for i in range(5)]
    rows += [served(f"ok-{i}", "t01", promoted + timedelta(hours=i), 1.0) for i in range(4)]
    rows += [served("bad", "t01", promoted + timedelta(hours=5), 0.0)]
    rows += [served("invalid", "t01", promoted + timedelta(hours=6), None, "not a label")]
    rows += [served("other", "t02", promoted + timedelta(hours=7), 0.0)]
    with open_store(str(tmp_path / "calls.db")) as store:
        import_rows(store, tmp_path, rows)
        scores = live_scores(store, {"t01": promoted, "t03": promoted})
    # Before the promotion: not counted; an answer that failed validation counts 0.
    assert sorted(scores["t01"]) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert scores["t03"] == []  # t02's calls are not asked for
    scores = scores["t01"]
    finding = agreement_finding("t01", scores, 0.9, DRIFT)
    assert finding.action == "demote"
    assert finding.detail == (
        "agreement 0.667 with the LLM on 6 calls served since its promotion < gate threshold 0.90"
    )
    assert agreement_finding("t01", [1.0] * 6, 0.9, DRIFT) is None
    assert agreement_finding("t01", [0.0] * 4, 0.9, DRIFT) is None  # under min_live_calls


def test_gate_regressions() -> None:
    before = {"t01": "promoted: ok", "t02": "llm: too few", "t03": "promoted: ok"}
    after = {"t01": "llm: agreement 0.80 < 0.90", "t02": "promoted: ok", "t03": "promoted: ok"}
    [finding] = gate_regressions(before, after)
    assert (finding.kind, finding.task_id, finding.action) == ("gate-regressed", "t01", "demote")


# -- exit codes -----------------------------------------------------------------------------


def test_demoted_specialist_exits_3_and_stays_on_the_llm(fakes: Fakes, tmp_path: Path) -> None:
    fakes.promote = {"t01-classify"}
    config = write_config(tmp_path, [str(DEMO)])
    first = run_pipeline(workspace(), config, progress=False)
    assert first["manifest"]["tasks"]["t01-classify"].startswith("promoted")
    since = datetime.now(timezone.utc) + timedelta(seconds=1)
    rows = [served(f"live-{i}", "t01-classify", since, 1.0 if i < 3 else 0.0) for i in range(6)]
    with open_store(workspace().store_url) as store:
        import_rows(store, tmp_path, rows)

    result = CliRunner().invoke(app, ["run", "--config", str(config), "--json"])
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    [finding] = summary["drift"]
    assert (finding["kind"], finding["task_id"]) == ("specialist-agreement-dropped", "t01-classify")
    status = summary["manifest"]["tasks"]["t01-classify"]
    assert status.startswith("llm: demoted by slmify run: agreement 0.500")
    assert summary["manifest"]["savings"]["specialist_calls"] == 0

    # The demotion holds on the next run, which has nothing new to report.
    again = run_pipeline(workspace(), config, progress=False)
    assert again["exit_code"] == 0 and again["drift"] == []
    assert again["manifest"]["tasks"]["t01-classify"].startswith("llm: demoted")


def test_gate_regression_after_retraining_exits_3(fakes: Fakes, tmp_path: Path) -> None:
    fakes.promote = {"t01-classify"}
    run_pipeline(workspace(), write_config(tmp_path, [str(DEMO)]), progress=False)
    fakes.promote = set()
    summary = run_pipeline(
        workspace(), write_config(tmp_path, [str(DEMO)], ["lora.r=4"]), progress=False
    )
    assert summary["exit_code"] == 3
    assert [(f["kind"], f["task_id"]) for f in summary["drift"]] == [
        ("gate-regressed", "t01-classify")
    ]


def test_failed_stage_exits_1_and_keeps_the_stages_before(fakes: Fakes, tmp_path: Path) -> None:
    fakes.fail_train = True
    config = write_config(tmp_path, [str(DEMO)])
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    last = summary["stages"][-1]
    assert (last["name"], last["failed"]) == ("train", True)
    assert summary["message"] == "train failed: specialists/t01-classify: out of memory (fake)"
    fakes.fail_train = False
    again = run_pipeline(workspace(), config, progress=False)
    assert list(ran(again)) == ["train", "eval", "manifest"]


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, [str(DEMO)])
    raw = yaml.safe_load(config.read_text())
    raw["drift"]["share_chnage"] = 0.2
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"{config}: drift.share_chnage: unknown key" in result.output

    missing = write_config(tmp_path, ["logs/*.jsonl"])
    result = CliRunner().invoke(app, ["run", "--config", str(missing)])
    assert result.exit_code == 2
    assert f"sources: 'logs/*.jsonl' matches no file (looked in {tmp_path})" in result.output

    write_config(tmp_path, [str(DEMO)], ["lora.rank=8"])
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert "lora.rank: unknown key" in result.output


def test_shipped_config_is_valid() -> None:
    cfg = load_config(ROOT / "slmify.yaml")
    assert resolve_sources(cfg.sources, ROOT) == [DEMO]
    assert resolve_recipe(cfg.train, ROOT).name == "cpu-smollm2-135m"
    assert resolve_cluster_recipe(cfg.cluster, ROOT).algorithm == "kmeans"
    with pytest.raises(RunConfigError, match="no such file|cannot read"):
        load_config(ROOT / "missing.yaml")


# -- the real cluster stage and router ------------------------------------------------------


@pytest.mark.slow
def test_real_router_places_new_calls_of_one_step_in_its_task(
    fake_training: Fakes, tmp_path: Path
) -> None:
    """The real clustering and router (MiniLM on CPU: a minute or two here), training and
    evaluation faked: the batched routing places new calls as `router.route` does one by
    one, all in the task of their step, and only that task retrains."""
    from slmify.drift import route_calls
    from slmify.router import load_router

    lines = gzip.open(DEMO, "rt").read().splitlines()[:160]
    subset = tmp_path / "demo-160.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    cluster = {"cluster": {"recipe": "default", "overrides": ["n_clusters=4"]}}
    first = run_pipeline(
        workspace(), write_config(tmp_path, [str(subset)], **cluster), progress=False
    )
    assert first["exit_code"] == 0, first
    fake_training.trained.clear()
    new_calls(tmp_path / "new-1.jsonl", "ticket triage", 20)
    config = write_config(tmp_path, [str(subset), "new-*.jsonl"], **cluster)
    summary = run_pipeline(workspace(), config, progress=False)

    assert ran(summary)["cluster"] == "20 new call(s) placed in the existing tasks, no drift"
    ws = workspace()
    assigned = ws.assignments()
    new_ids = [f"new-1-{i}" for i in range(20)]
    [task] = {assigned[i] for i in new_ids}
    assert task is not None
    assert fake_training.trained == [task]
    router = load_router(ws.router_dir())
    with open_store(ws.store_url) as store:
        batched = route_calls(router, store, new_ids)
        one_by_one = [router.route(store.get_call(i).record.request) for i in new_ids]
    # The same decisions; confidences equal but for the rounding of a padded bf16 batch
    # (rounding both to 4 decimals flipped 0.98025 one way and the other).
    assert [r.task_id for r in batched] == [t for t, _ in one_by_one]
    assert [r.confidence for r in batched] == pytest.approx([c for _, c in one_by_one], abs=1e-3)
