"""`slmify report`: one page a user decides from, and the same content as JSON.

Gathers what the stages left in the workspace: the tasks (cluster/tasks.json) named and
described from their calls (slmify.task_names, examples scrubbed once curated), the map of
the calls (cluster/map.json), per specialist its learning curve (specialists/<id>/
metrics.json), its label set (head/head.json), its gate and deferral (eval/<id>/
report.json) and the coverage/agreement curve of its confidence on the calibration
sessions (eval/endtoend/calibration.jsonl), and the headline (eval/endtoend/summary.json).
A stage not run yet leaves its section saying which command fills it.

Writes WORKSPACE/report.html (slmify.report_html renders it) unless told another path;
returns the JSON document.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from slmify.errors import SlmifyError
from slmify.schema import (
    SCHEMA_VERSION,
    CallRecord,
    EndToEnd,
    ReplayedCall,
    TaskCluster,
)
from slmify.task_names import example, name_tasks
from slmify.workspace import Workspace

M = TypeVar("M", bound=BaseModel)
CALLS_PER_TASK = 300  # enough to describe a task; the store may hold millions
EXAMPLES = 3
# What each reason code (slmify.decision) means for a call that stays on the LLM.
REASONS = {
    "routed": "answered by a specialist",
    "pinned": "answered by the specialist the request named",
    "no-router": "no router in the deployment",
    "no-match": "no task fits the call",
    "low-confidence": "the router was not sure which task it is",
    "not-promoted": "its task's specialist did not pass the gate",
    "out-of-scope": "the request differs from what the specialist was trained on",
    "invalid-output": "the specialist's answer failed validation",
    "deferred": "the specialist's confidence was below its threshold",
    "specialist-error": "the specialist failed",
    "router-error": "the router failed",
    "shadow": "the LLM answered, the specialist in the background",
    "unreadable": "the request could not be read",
}


class ReportError(SlmifyError, RuntimeError):
    """A workspace without the stage the report starts from."""


def build_report(ws_root: Path, store: Any) -> dict[str, Any]:
    """The report's content: headline, tasks (named, with examples and specialists), map."""
    ws = Workspace.at(ws_root)
    tasks = ws.tasks()
    # 1. The calls behind each task, its representatives first.
    calls = _task_calls(store, tasks, ws.assigned())
    labels = {t.id: _labels(ws.specialist_dir(t.id)) for t in tasks}
    names = name_tasks(tasks, {k: [c for c, _ in v] for k, v in calls.items()}, labels)
    # 2. What calibration and the test sessions said.
    calibration = _rows(ws.endtoend_dir() / "calibration.jsonl")
    e2e = ws.end_to_end()
    out_tasks = []
    for t in tasks:
        mine = calls.get(t.id, [])
        out_tasks.append(
            {
                "id": t.id,
                **names[t.id],
                "output_shape": t.output_shape,
                "tools": t.tools,
                "labels": labels[t.id],
                "calls": t.calls,
                "share": t.share,
                "input_tokens": t.input_tokens,
                "output_tokens": t.output_tokens,
                "llm_cost_usd": t.llm_cost_usd,
                "examples": [example(c) | {"scrubbed": s} for c, s in mine[:EXAMPLES]],
                "specialist": specialist(ws_root, t.id, calibration.get(t.id, [])),
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "workspace": str(ws_root),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "headline": headline(e2e, {t["id"]: t["name"] for t in out_tasks}),
        "tasks": out_tasks,
        "map": _map(ws),
    }


def _task_calls(
    store: Any, tasks: list[TaskCluster], assignment: dict[str, str]
) -> dict[str, list[tuple[CallRecord, bool]]]:
    """Up to CALLS_PER_TASK answered calls per task with whether they were scrubbed
    (curated), representatives first; calls excluded from training are left out."""
    wanted = {i for t in tasks for i in t.representatives}
    out: dict[str, list[tuple[CallRecord, bool]]] = {t.id: [] for t in tasks}
    for stored in store.iter_calls():
        rec, task_id = stored.record, assignment.get(stored.record.id)
        if task_id not in out or rec.response is None or not rec.request.messages:
            continue
        cur = stored.curation
        if cur is not None and (cur.excluded or cur.duplicate_of):
            continue
        if len(out[task_id]) < CALLS_PER_TASK or rec.id in wanted:
            out[task_id].append((rec, cur is not None))
    for t in tasks:
        rank = {i: n for n, i in enumerate(t.representatives)}
        out[t.id].sort(key=lambda pair: rank.get(pair[0].id, len(rank)))
    return out


def _read(model: type[M], path: Path, text: str | None = None) -> M:
    """A stage's file as its model; one written by another slmify version is named."""
    try:
        return model.model_validate_json(text or path.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ReportError(
            f"{path}: {where}: {first['msg']} (written by another slmify version? run the "
            "stage that writes it again)"
        ) from None


def _labels(folder: Path) -> list[str] | None:
    head = folder / "head" / "head.json"
    if not head.exists():
        return None
    return list(json.loads(head.read_text(encoding="utf-8")).get("labels") or []) or None


def _rows(path: Path) -> dict[str, list[ReplayedCall]]:
    """Replayed calls by the task the router picked."""
    out: dict[str, list[ReplayedCall]] = {}
    if not path.exists():
        return out
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = _read(ReplayedCall, path, line)
            if row.picked is not None:
                out.setdefault(row.picked, []).append(row)
    return out


def coverage_curve(rows: list[ReplayedCall]) -> list[list[float]]:
    """[threshold, share served, agreement of the served] for each confidence among the
    answered calibration calls, highest first: what each threshold would have served."""
    scored = sorted(
        ((r.confidence or 0.0, bool(r.agree)) for r in rows if r.answer is not None),
        key=lambda p: -p[0],
    )
    out, agreed = [], 0
    for n, (conf, ok) in enumerate(scored, 1):
        agreed += ok
        # Ties serve together: only the last of equal confidences is a threshold.
        if n == len(scored) or scored[n][0] != conf:
            out.append([round(conf, 6), round(n / len(scored), 4), round(agreed / n, 4)])
    return out


def specialist(ws_root: Path, task_id: str, calibration: list[ReplayedCall]) -> dict[str, Any]:
    """A task's specialist: training, the gate, its threshold and what it served."""
    result = Workspace.at(ws_root).result(task_id)
    if result is None:
        return {"status": "untrained", "reason": "no specialist: run `slmify train`"}
    m = result.metrics
    out: dict[str, Any] = {
        "status": result.status,
        "reason": result.reason,
        "kind": result.kind,
        "base_model": result.base_model,
        "curve": m.get("curve"),
        "stopped": m.get("stopped"),
        "validation_loss": m.get("validation_loss"),
        "base_validation_loss": m.get("base_validation_loss"),
        "cv_accuracy": m.get("cv_accuracy"),
        "evaluation": None,
    }
    report = Workspace.at(ws_root).eval_report(task_id)
    if report is None:
        return out
    a, d = report.specialist.agreement, report.deferral
    curve = coverage_curve(calibration)
    chosen = None
    if d is not None and d.threshold is not None and curve:
        above = [p for p in curve if p[0] >= d.threshold]
        chosen = above[-1] if above else [d.threshold, 0.0, None]
    out["evaluation"] = {
        "decision": report.decision.model_dump(),
        "agreement": {"n": a.n, "mean": a.mean, "lower": a.lower, "upper": a.upper},
        "confidence": a.confidence,
        "served": report.served.model_dump() if report.served else None,
        "deferral": d.model_dump() if d else None,
        "coverage": curve,
        "chosen": chosen,
        "latency_ms_p50": report.specialist.latency_ms_p50,
        "llm_latency_ms_p50": report.llm_latency_ms_p50,
    }
    return out


def headline(e2e: EndToEnd | None, names: dict[str, str]) -> dict[str, Any] | None:
    """The end-to-end figures, and what stays on the LLM and why, largest first."""
    if e2e is None:
        return None
    stays = [
        {"reason": code, "calls": n, "meaning": REASONS.get(code, code)}
        for code, n in sorted(e2e.reasons.items(), key=lambda kv: -kv[1])
        if code not in ("routed", "pinned")
    ]
    return {
        **e2e.model_dump(mode="json", exclude={"by_task"}),
        "text": e2e.headline(),
        "stays_on_llm": stays,
        "by_task": {k: v.model_dump() | {"name": names.get(k, k)} for k, v in e2e.by_task.items()},
    }


def _map(ws: Workspace) -> dict[str, Any] | None:
    """The map's points and tasks (cluster/map.json without its version)."""
    found = ws.call_map()
    return None if found is None else found.model_dump(mode="json", exclude={"schema_version"})


def write_workspace_report(ws_root: Path, store: Any, out: Path | None = None) -> dict[str, Any]:
    """Build the report and write the HTML page; returns the document and where it went."""
    from slmify.report_html import render_page

    doc = build_report(ws_root, store)
    path = out or ws_root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render_page(doc), encoding="utf-8")
    tmp.replace(path)
    return doc | {"html": str(path)}
