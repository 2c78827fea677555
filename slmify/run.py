"""S6 retrain: the whole conversion as one incremental job, `slmify run --config slmify.yaml`.

Runs collect, curate, cluster, train, eval and manifest in order (the config:
slmify.runconfig), each only when its inputs changed since its last successful run. The
inputs' content hashes are recorded in WORKSPACE/run/state.json after each stage, so an
interrupted run resumes where it stopped and a second run with no new data does nothing:

- collect: the sha256 of every source file (files or globs in the config);
- curate: calls in the store not curated yet (the recording proxy adds calls too);
- cluster: the training calls (id and content hash) and the cluster settings. When only
  new calls arrived, the existing router places them in the existing tasks, unless that
  shows drift (slmify.drift), and only then is everything re-clustered;
- train: per task, its training calls and the resolved recipe: new calls of one task
  retrain that task only;
- eval: per task, the adapter's files, the test split and the eval limit;
- manifest: the tasks, each task's training result and eval report, and the demotions.

A promoted specialist whose live agreement (shadow answers recorded by `slmify serve`)
falls below its gate is demoted: the manifest keeps the task on the LLM until it is
retrained and evaluated again. The summary (slmify.run_summary: a `RunSummary`, kept in
WORKSPACE/run/summary.json) says what ran and why, and the drift found; `exit_code` is what
a CI job branches on (see EXIT_CODES).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmify.cluster import ClusterConfig
from slmify.drift import (
    adapter_digest,
    agreement_finding,
    assign_to_tasks,
    eval_inputs,
    file_sha256,
    gate_regressions,
    live_scores,
    manifest_inputs,
    route_calls,
    router_confidence,
    routing_findings,
    task_call_hashes,
    training_calls,
)
from slmify.recipes import Recipe
from slmify.router import load_router
from slmify.run_summary import EXIT_BAD_INPUT, EXIT_CODES, summarize
from slmify.runconfig import (
    RunConfig,
    load_config,
    resolve_cluster_recipe,
    resolve_recipe,
    resolve_sources,
)
from slmify.schema import Demotion, DriftFinding, RunState, StageOutcome, content_hash
from slmify.schema_stages import RunSummary
from slmify.workspace import Workspace

__all__ = ["EXIT_BAD_INPUT", "EXIT_CODES", "run_pipeline"]


# -- the run ------------------------------------------------------------------------------


def run_pipeline(
    ws: Workspace,
    config_path: Path,
    progress: bool = True,
    announce: Callable[[str], None] = lambda line: None,
) -> RunSummary:
    """Run every stage whose inputs changed; returns the summary (with `exit_code`), also
    written to WORKSPACE/run/summary.json.

    Raises RunConfigError for a bad config; a stage's own error is reported in the
    summary (`failed`, exit code 1) after the stages before it were recorded.
    """
    cfg = load_config(config_path)
    base = config_path.resolve().parent
    recipe = resolve_recipe(cfg.train, base)
    pipeline = Pipeline(
        ws=ws,
        cfg=cfg,
        sources=resolve_sources(cfg.sources, base),
        cluster_config=resolve_cluster_recipe(cfg.cluster, base, recipe),
        recipe=recipe,
        state=ws.run_state(),
        progress=progress,
        announce=announce,
    )
    outcomes, findings = pipeline.run()
    summary = summarize(ws, config_path, outcomes, findings, pipeline.state)
    ws.write_run_summary(summary)
    return summary


# -- the stages ---------------------------------------------------------------------------


@dataclass
class Pipeline:
    """One run: the config, the state it updates, and the drift it finds on the way."""

    ws: Workspace
    cfg: RunConfig
    sources: list[Path]
    cluster_config: ClusterConfig
    recipe: Recipe
    state: RunState
    progress: bool = True
    announce: Callable[[str], None] = lambda line: None
    findings: list[DriftFinding] = field(default_factory=list)

    def run(self) -> tuple[list[StageOutcome], list[DriftFinding]]:
        """Every stage in order; stops at the first that fails, recording the ones before."""
        outcomes: list[StageOutcome] = []
        stages = [
            ("collect", self.collect),
            ("curate", self.curate),
            ("cluster", self.cluster),
            ("train", self.train),
            ("eval", self.evaluate),
            ("manifest", self.manifest),
        ]
        with self.ws.open_store() as store:
            for name, stage in stages:
                started = time.perf_counter()
                try:
                    outcome = stage(store)
                except stage_errors() as e:
                    outcome = StageOutcome(name=name, ran=True, failed=True, reason=str(e))
                outcome.seconds = round(time.perf_counter() - started, 2)
                outcomes.append(outcome)
                verb = "failed" if outcome.failed else "ran" if outcome.ran else "skipped"
                self.announce(f"{name}: {verb} ({outcome.seconds:.0f} s): {outcome.reason}")
                if outcome.failed:
                    break
                self.ws.write_run_state(self.state)
        return outcomes, self.findings

    def collect(self, store: Any) -> StageOutcome:
        """Import the source files that are new or changed (re-imported ids are no-ops)."""
        from slmify.collect import import_files

        hashes = {str(p): file_sha256(p) for p in self.sources}
        changed = [p for p, h in hashes.items() if self.state.sources.get(p) != h]
        if not changed:
            return StageOutcome(
                name="collect", ran=False, reason=f"{len(hashes)} source file(s) unchanged"
            )
        summary = import_files(
            store, [Path(p) for p in changed], self.ws.path("rejects.jsonl"), self.progress
        )
        what = [
            f"{Path(p).name} ({'changed' if p in self.state.sources else 'new'})" for p in changed
        ]
        self.state.sources = hashes
        keys = ("read", "imported", "duplicates", "rejected")
        return StageOutcome(
            name="collect",
            ran=True,
            reason=f"source file(s) to import: {', '.join(what)}",
            details={k: summary[k] for k in keys},
        )

    def curate(self, store: Any) -> StageOutcome:
        from slmify.curate import curate_store

        pending = store.execute("SELECT COUNT(*) FROM calls WHERE curation IS NULL").fetchone()[0]
        if not pending:
            return StageOutcome(name="curate", ran=False, reason="every stored call is curated")
        summary = curate_store(
            store, self.ws.curation_report_file(), self.cfg.curate.keep_raw, self.progress
        )
        keys = ("curated", "scrubbed_calls", "duplicates", "excluded")
        return StageOutcome(
            name="curate",
            ran=True,
            reason=f"{pending} call(s) not curated yet",
            details={k: summary[k] for k in keys},
        )

    def cluster(self, store: Any) -> StageOutcome:
        """Place new calls in the existing tasks, or re-cluster everything when there is no
        clustering yet, its settings changed, or the new calls show drift."""
        from slmify.cluster import cluster_store

        calls = training_calls(store)
        settings = content_hash(self.cluster_config.model_dump(mode="json"))
        inputs = content_hash([sorted(calls.items()), settings])
        if self.state.stages.get("cluster") == inputs and self.ws.has_clustering():
            return StageOutcome(
                name="cluster", ran=False, reason=f"{len(calls)} training calls unchanged"
            )
        reason, details = self.recluster_reason(store, calls, settings)
        if reason is None:
            self.state.stages["cluster"] = inputs
            return StageOutcome(
                name="cluster", ran=True, reason=details.pop("reason"), details=details
            )
        summary = cluster_store(store, self.ws, self.cluster_config, self.progress)
        self.state.router_confidence = router_confidence(
            load_router(self.ws.router_dir()), store, list(calls)
        )
        self.state.cluster_settings = settings
        self.state.stages["cluster"] = inputs
        found = summary.model_dump(include={"calls", "tasks", "unassigned", "silhouette"})
        return StageOutcome(
            name="cluster", ran=True, reason=f"re-clustered: {reason}", details=found | details
        )

    def recluster_reason(
        self, store: Any, calls: dict[str, str], settings: str
    ) -> tuple[str | None, dict[str, Any]]:
        """Why everything must be re-clustered, or None after placing the new calls in the
        existing tasks (with what was done)."""
        if not self.ws.has_clustering():
            return "no clustering yet", {}
        if self.state.cluster_settings != settings:
            return "cluster settings changed", {}
        assigned = self.ws.assignments()
        gone = len(set(assigned) - set(calls))
        if gone:
            return f"{gone} clustered call(s) are no longer training calls", {}
        new = [c for c in calls if c not in assigned]
        # Answers a specialist gave while serving are not the LLM's: never training data.
        answered = [c for c in new if store.get_call(c).record.source.startswith("specialist:")]
        router = load_router(self.ws.router_dir())
        routed = route_calls(router, store, [c for c in new if c not in answered])
        found = routing_findings(routed, assigned, self.state.router_confidence, self.cfg.drift)
        self.findings += found
        if found:
            return "drift: " + "; ".join(sorted({f.kind for f in found})), {}
        added = assign_to_tasks(self.ws, routed, answered)
        unplaced = len(routed) - sum(added.values())
        return None, {
            "reason": f"{len(new)} new call(s) placed in the existing tasks, no drift",
            "added": added,
            "unassigned": unplaced + len(answered),
        }

    def train(self, store: Any) -> StageOutcome:
        """Train each task whose training calls or recipe changed, or that has no result."""
        from slmify.train import train_all

        tasks = self.ws.tasks()
        calls = task_call_hashes(training_calls(store), self.ws.assigned())
        recipe_hash = content_hash(self.recipe.model_dump(mode="json"))
        todo: dict[str, str] = {}
        for task in tasks:
            now = {"calls": calls.get(task.id, ""), "recipe": recipe_hash}
            before = self.state.train.get(task.id)
            if before is None or not self.ws.result_file(task.id).exists():
                todo[task.id] = "no specialist yet"
            elif before != now:
                todo[task.id] = (
                    "its calls changed"
                    if before["calls"] != now["calls"]
                    else ("the recipe changed")
                )
        # Tasks gone from tasks.json (re-clustered away) are forgotten.
        self.state.train = {
            t.id: v for t, v in ((t, self.state.train.get(t.id)) for t in tasks) if v
        }
        if not todo:
            return StageOutcome(
                name="train", ran=False, reason=f"{len(tasks)} task(s): calls and recipe unchanged"
            )
        results = {}
        for task_id in todo:
            summary = train_all(self.ws, self.recipe, task_id, progress=self.progress)
            results[task_id] = summary.tasks[0].status
            self.state.train[task_id] = {"calls": calls.get(task_id, ""), "recipe": recipe_hash}
            self.ws.write_run_state(self.state)
        # An agent-level specialist learns from its agent's tasks' calls: retrained with them.
        summary = train_all(self.ws, self.recipe, progress=self.progress, only_agents=True)
        results.update({r.id: r.status for r in summary.tasks})
        return StageOutcome(
            name="train",
            ran=True,
            reason="; ".join(f"{t}: {why}" for t, why in todo.items()),
            details={"tasks": results, "unchanged": len(tasks) - len(todo)},
        )

    def evaluate(self, store: Any) -> StageOutcome:
        """Evaluate end to end when any trained specialist's adapter, held-out splits or
        limit changed: the replay is of the whole deployment, so every specialist answers
        again (one changed task changes what the router's other candidates see)."""
        from slmify.evaluate import evaluate_workspace

        todo, trained = [], {}
        for task in self.ws.tasks():
            inputs = eval_inputs(self.ws, task.id, self.cfg.eval.limit)
            if inputs is None:
                continue
            trained[task.id] = inputs
            report = self.ws.eval_report_file(task.id)
            if self.state.eval.get(task.id) != inputs or not report.exists():
                todo.append(task.id)
        self.state.eval = {k: v for k, v in self.state.eval.items() if k in trained}
        if not todo:
            return StageOutcome(
                name="eval", ran=False, reason=f"{len(trained)} specialist(s) unchanged"
            )
        summary = evaluate_workspace(
            self.ws.root, store, None, self.cfg.eval.limit, None, self.progress, self.announce
        )
        self.state.eval = dict(trained)
        return StageOutcome(
            name="eval",
            ran=True,
            reason=f"new or retrained specialist(s): {', '.join(todo)}",
            details={
                "headline": summary.get("headline"),
                **{t["id"]: t["status"] for t in summary["tasks"]},
            },
        )

    def manifest(self, store: Any) -> StageOutcome:
        """Check live agreement, then rewrite the manifest if anything it reads changed."""
        self.check_live_agreement(store)
        inputs = manifest_inputs(self.ws, self.state)
        path = self.ws.root / "manifest.yaml"
        if self.state.stages.get("manifest") == inputs and path.exists():
            return StageOutcome(
                name="manifest", ran=False, reason="tasks, specialists and evaluations unchanged"
            )
        before = manifest_statuses(path)
        after = write_run_manifest(self.ws.root, store, self.state.demoted)
        demoted_now = {f.task_id for f in self.findings if f.action == "demote"}
        self.findings += [
            f for f in gate_regressions(before, after) if f.task_id not in demoted_now
        ]
        self.state.stages["manifest"] = inputs
        promoted = sum(s.startswith("promoted") for s in after.values())
        return StageOutcome(
            name="manifest",
            ran=True,
            reason="tasks, specialists or evaluations changed"
            if path.exists() and before
            else "no manifest yet",
            details={"promoted": promoted, "tasks": len(after)},
        )

    def check_live_agreement(self, store: Any) -> None:
        """Demote promoted specialists whose live agreement fell below their gate; lift
        demotions of adapters that have been retrained since."""
        promoted = {}
        for task in self.ws.tasks():
            adapter = adapter_digest(self.ws, task.id)
            demotion = self.state.demoted.get(task.id)
            if demotion is not None and demotion.adapter != adapter:
                del self.state.demoted[task.id]
            elif demotion is not None:
                continue
            report = self.ws.eval_report(task.id)
            if report is not None and report.decision.status == "promoted":
                promoted[task.id] = (report, adapter)
        if not promoted:
            return
        scores = live_scores(store, {t: r.created_at for t, (r, _) in promoted.items()})
        for task_id, (report, adapter) in promoted.items():
            threshold = report.decision.threshold or 0.0
            finding = agreement_finding(task_id, scores[task_id], threshold, self.cfg.drift)
            if finding is not None:
                self.findings.append(finding)
                self.state.demoted[task_id] = Demotion(adapter=adapter, reason=finding.detail)


# -- what each stage reads ----------------------------------------------------------------


def stage_errors() -> tuple[type[Exception], ...]:
    """The errors a stage reports about its inputs: the run stops there with exit code 1."""
    from slmify.cluster import ClusterError
    from slmify.embed import EmbeddingError
    from slmify.evaluate import EvalError
    from slmify.manifest import ManifestError
    from slmify.models import ModelError
    from slmify.store import StoreError
    from slmify.train import TrainError
    from slmify.workspace import WorkspaceError

    return (
        ClusterError,
        EmbeddingError,
        EvalError,
        ManifestError,
        ModelError,
        StoreError,
        TrainError,
        WorkspaceError,
    )


def manifest_statuses(path: Path) -> dict[str, str]:
    """Task id -> "status: reason" in a manifest.yaml; empty when there is none yet."""
    from slmify.manifest import ManifestError, read_manifest

    if not path.exists():
        return {}
    try:
        return {t.id: f"{t.status}: {t.reason}" for t in read_manifest(path).tasks}
    except ManifestError:
        return {}


def write_run_manifest(ws_root: Path, store: Any, demoted: dict[str, Demotion]) -> dict[str, str]:
    """The manifest as `slmify manifest` writes it, with demoted tasks kept on the LLM."""
    from slmify.manifest import build_manifest, savings, write_exports, write_manifest

    manifest = build_manifest(ws_root, store)
    for entry in manifest.tasks:
        if entry.id in demoted and entry.status == "promoted":
            entry.status = "llm"
            entry.reason = f"demoted by slmify run: {demoted[entry.id].reason}"
    manifest.savings = savings(Workspace.at(ws_root).tasks(), manifest.tasks)
    manifest.exports = write_exports(manifest, ws_root / "exports")
    write_manifest(manifest, ws_root / "manifest.yaml")
    return {t.id: f"{t.status}: {t.reason}" for t in manifest.tasks}
