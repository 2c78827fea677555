"""What changed since the last `slmify run`: each stage's inputs, and the traffic.

The run state (WORKSPACE/run/state.json, `RunState`, which `slmify run` reads and writes
through slmify.workspace) keeps the content hashes each stage last ran on; the functions
under "what each stage reads" compute them now, so a stage whose hash is unchanged is
skipped.

Drift, each a `DriftFinding` with the work it calls for:
- new task type: many new calls the router cannot place (no task, or confidence under
  its threshold) -> re-cluster;
- share moved: a task's share of all calls moved more than `share_change` -> re-cluster
  (the clustering and the tasks' value were fit to another mix);
- router confidence dropped: its mean on the new calls fell more than `confidence_drop`
  below its mean on the calls it was fit on -> re-cluster;
- specialist agreement dropped: a promoted specialist's agreement with the LLM on the
  calls recorded since its promotion (shadow answers and answers that failed validation,
  from `metadata.route` written by `slmify serve`) fell below its gate -> demote to the LLM;
- gate regressed: a task promoted by the previous manifest is not any more -> demote.

When no drift calls for re-clustering, `assign_to_tasks` places the new calls in the
existing tasks (assignments.jsonl, cluster/tasks.json), so the other tasks' calls, and
their specialists, stay as they are.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmify.schema import CallRecord, DriftFinding, RunState, ServedRoute, content_hash
from slmify.workspace import Workspace, router_meta_file


class DriftConfig(BaseModel):
    """`drift:` in slmify.yaml: when a change between runs is worth acting on."""

    model_config = ConfigDict(extra="forbid")

    min_new_calls: int = Field(
        20, ge=1, description="Fewer new calls: routing statistics are too noisy to judge."
    )
    unassigned_fraction: float = Field(
        0.25, gt=0, le=1, description="Share of new calls left unassigned that means a new task."
    )
    share_change: float = Field(
        0.10, gt=0, le=1, description="Absolute change of a task's share of calls."
    )
    confidence_drop: float = Field(
        0.10, gt=0, le=1, description="Drop of the router's mean confidence on new calls."
    )
    min_live_calls: int = Field(
        20, ge=1, description="Scored live calls needed before a specialist can be demoted."
    )


@dataclass(frozen=True)
class Routed:
    """Where the router puts one new call."""

    call_id: str
    task_id: str | None
    confidence: float


# -- hashing what a stage reads -----------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """One hash over files' names and bytes; a missing file counts as empty."""
    return content_hash([[p.name, file_sha256(p) if p.exists() else ""] for p in paths])


# -- what each stage reads ----------------------------------------------------------------


def training_calls(store: Any) -> dict[str, str]:
    """Call id -> content hash (masked by curation) of every call that may train."""
    rows = store.execute(
        "SELECT id, content_hash FROM calls WHERE curation IS NOT NULL"
        " AND excluded IS NULL AND duplicate_of IS NULL ORDER BY seq"
    ).fetchall()
    return {call_id: h for call_id, h in rows}


def task_call_hashes(calls: dict[str, str], assignment: dict[str, str]) -> dict[str, str]:
    """Task id -> one hash over its training calls: equal hashes, same training data."""
    by_task: dict[str, list[list[str]]] = {}
    for call_id, h in calls.items():
        if call_id in assignment:
            by_task.setdefault(assignment[call_id], []).append([call_id, h])
    return {t: content_hash(sorted(items)) for t, items in by_task.items()}


def adapter_digest(ws: Workspace, task_id: str) -> str:
    """The trained specialist's bytes: its LoRA adapter or its label head."""
    folder = ws.specialist_dir(task_id)
    adapter, head = folder / "adapter", folder / "head"
    return files_digest(
        [
            adapter / "adapter_config.json",
            adapter / "adapter_model.safetensors",
            head / "head.json",
            head / "head.npz",
        ]
    )


def eval_inputs(ws: Workspace, task_id: str, limit: int | None) -> str | None:
    """Hash of what an evaluation reads: the specialist, the held-out splits, the limit;
    None when the task has no trained specialist."""
    if isinstance(ws.trained(task_id), str):
        return None
    splits = ws.splits(task_id)
    held_out = [sorted(splits.test), sorted(splits.calibration)]
    return content_hash([adapter_digest(ws, task_id), held_out, limit])


def manifest_inputs(ws: Workspace, state: RunState) -> str:
    """Hash of what the manifest reads: tasks, router, results, eval reports, demotions."""
    files = [ws.tasks_file(), router_meta_file(ws.router_dir())]
    for folder in sorted(ws.specialists_dir().glob("*/")):
        files.append(ws.result_file(folder.name))
        files.append(ws.eval_report_file(folder.name))
    demoted = {k: v.model_dump() for k, v in state.demoted.items()}
    return content_hash(
        [[str(f.relative_to(ws.root)) for f in files], files_digest(files), demoted]
    )


# -- new calls and the existing tasks ------------------------------------------------------


def route_calls(router: Any, store: Any, call_ids: list[str]) -> list[Routed]:
    """Where the router (slmify.router) puts each call, from its request only.

    What `router.route` does one request at a time, done in one batch: the texts are
    embedded together through the store's embedding cache, where clustering left the
    vectors of every call it saw, so routing those costs no embedding at all.
    """
    from slmify.embed import Embedder, embed_cached

    views, ids, routed = [], [], []
    for call_id in call_ids:
        view = router.prepare(store.get_call(call_id).record.request)
        if view is None:
            routed.append(Routed(call_id, None, 1.0))
            continue
        views.append(view)
        ids.append(call_id)
    if views:
        embedder = Embedder(router.meta.embedding_model, router.meta.max_seq_length)
        texts = [v.task_text for v in views] + [v.turn_text for v in views]
        vecs, _ = embed_cached(store, embedder, texts)
        labels, conf = router.predict(
            router.features(views, vecs[: len(views)], vecs[len(views) :])
        )
        routed += [Routed(i, t, float(c)) for i, t, c in zip(ids, labels, conf, strict=True)]
    return routed


def router_confidence(router: Any, store: Any, call_ids: list[str]) -> float | None:
    """The router's mean confidence on the calls it was fit on: the baseline new calls
    are compared with. In-sample, so a little optimistic; `confidence_drop` leaves room."""
    routed = route_calls(router, store, call_ids)
    return round(sum(r.confidence for r in routed) / len(routed), 4) if routed else None


def assign_to_tasks(ws: Workspace, routed: list[Routed], unrouted: list[str]) -> dict[str, int]:
    """Add new calls to the existing tasks without re-clustering: assignments.jsonl gains
    a line per call (`unrouted` ones, and those the router does not place, get null), and
    each task in cluster/tasks.json its new size and share, both written by the cluster
    stage's writers (`Workspace.write_assignments`, `Workspace.write_tasks`).

    Tokens, LLM cost and value grow by the task's mean per call: the label, terms,
    representatives and output diversity stay as clustering found them until the next
    re-cluster recomputes everything.
    """
    assigned = ws.assignments()
    assigned.update({r.call_id: r.task_id for r in routed})
    assigned.update({call_id: None for call_id in unrouted})
    tasks = ws.tasks()
    added = Counter(r.task_id for r in routed if r.task_id is not None)
    total = len(assigned)
    for task in tasks:
        grow = (task.calls + added[task.id]) / task.calls if task.calls else 1.0
        task.calls += added[task.id]
        task.share = round(task.calls / total, 4)
        task.input_tokens = round(task.input_tokens * grow)
        task.output_tokens = round(task.output_tokens * grow)
        task.llm_cost_usd = round(task.llm_cost_usd * grow, 4)
        task.value_score = round(task.value_score * grow, 4)
    ws.write_assignments(assigned)
    ws.write_tasks(tasks)
    return dict(added)


# -- traffic drift ------------------------------------------------------------------------


def routing_findings(
    routed: list[Routed],
    assigned: dict[str, str | None],
    baseline_confidence: float | None,
    cfg: DriftConfig,
) -> list[DriftFinding]:
    """Drift seen by routing the new calls with the existing router.

    `assigned` is every call clustered before (task id, or None). A new call the router
    does not place (no task, or under its confidence threshold) counts as unassigned.
    """
    if len(routed) < cfg.min_new_calls:
        return []
    findings = []
    unassigned = sum(r.task_id is None for r in routed)
    if unassigned / len(routed) >= cfg.unassigned_fraction:
        findings.append(
            DriftFinding(
                kind="new-task-type",
                action="re-cluster",
                detail=f"{unassigned} of {len(routed)} new calls fit no task "
                f"(limit {cfg.unassigned_fraction:.0%})",
            )
        )
    before = Counter(t for t in assigned.values() if t is not None)
    after = before + Counter(r.task_id for r in routed if r.task_id is not None)
    total_before, total_after = len(assigned), len(assigned) + len(routed)
    for task_id in sorted(after):
        old = before[task_id] / total_before if total_before else 0.0
        new = after[task_id] / total_after
        if abs(new - old) > cfg.share_change:
            findings.append(
                DriftFinding(
                    kind="share-moved",
                    task_id=task_id,
                    action="re-cluster",
                    detail=f"share of calls {old:.1%} -> {new:.1%} "
                    f"(moved more than {cfg.share_change:.0%})",
                )
            )
    mean = sum(r.confidence for r in routed) / len(routed)
    if baseline_confidence is not None and baseline_confidence - mean > cfg.confidence_drop:
        findings.append(
            DriftFinding(
                kind="router-confidence-dropped",
                action="re-cluster",
                detail=f"mean router confidence {mean:.3f} on {len(routed)} new calls, "
                f"{baseline_confidence:.3f} on the calls it was fit on "
                f"(drop > {cfg.confidence_drop:.2f})",
            )
        )
    return findings


def live_scores(store: Any, since: dict[str, datetime]) -> dict[str, list[float]]:
    """Per task, its specialist's agreement with the LLM on the calls served since
    `since[task]` (its promotion), in one pass over the calls `slmify serve` recorded.

    A shadow answer counts its score; an answer that failed validation (or a shadow that
    failed) counts 0, since the LLM had to answer instead.
    """
    scores: dict[str, list[float]] = {task_id: [] for task_id in since}
    # Only served calls carry a route: a text filter spares parsing every other record.
    rows = store.execute("SELECT record FROM calls WHERE record LIKE ?", ('%"route":{%',))
    for (raw,) in rows.fetchall():
        rec = CallRecord.model_validate_json(raw)
        route = rec.metadata.get("route")
        if not route or rec.timestamp is None:
            continue
        attempt = ServedRoute.model_validate(route).specialist
        if attempt is None or attempt.task_id not in since:
            continue
        if _utc(rec.timestamp) >= since[attempt.task_id]:
            ok = attempt.problem is None and attempt.score is not None
            scores[attempt.task_id].append(attempt.score.score if ok else 0.0)
    return scores


def agreement_finding(
    task_id: str, scores: list[float], threshold: float, cfg: DriftConfig
) -> DriftFinding | None:
    """Demote when enough live calls were scored and their mean agreement is under the gate.

    The mean, not the gate's lower bound: on a live sample of 20 calls the one-sided 95%
    Wilson bound of a perfect 20/20 is 0.88, so the bound would demote a flawless specialist.
    """
    if len(scores) < cfg.min_live_calls:
        return None
    mean = sum(scores) / len(scores)
    if mean >= threshold:
        return None
    return DriftFinding(
        kind="specialist-agreement-dropped",
        task_id=task_id,
        action="demote",
        detail=f"agreement {mean:.3f} with the LLM on {len(scores)} calls served since its "
        f"promotion < gate threshold {threshold:.2f}",
    )


def gate_regressions(before: dict[str, str], after: dict[str, str]) -> list[DriftFinding]:
    """Tasks the previous manifest promoted that the new one keeps on the LLM."""
    return [
        DriftFinding(
            kind="gate-regressed",
            task_id=task_id,
            action="demote",
            detail="promoted by the previous manifest, now on the LLM: " + after[task_id],
        )
        for task_id, status in sorted(before.items())
        if status.startswith("promoted") and task_id in after and after[task_id].startswith("llm")
    ]


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)
