"""S6 eval: the specialists against the LLM, end to end, as the deployment would serve.

Reads WORKSPACE/cluster/tasks.json and cluster/router/ (the tasks and the router),
WORKSPACE/specialists/<task id>/ (result.json: adapter or label head and base model;
splits.json: the frozen test and calibration calls; pruning.json and the resolved recipe:
what training saw) and the calls from the store.

1. Calibration: every call of the calibration sessions goes through the decision path of
   `slmify serve` (slmify.endtoend) with every trained specialist answering; per task, the
   confidence threshold is fitted on the answers routed to it.
2. Test: every call of the held-out test sessions, unassigned calls included, goes the
   same way with those thresholds. Per task, the gate reads what its specialist served
   (routed to it, valid, confident enough): promoted when the lower bound of agreement on
   those clears the task's threshold with at least `min_test_calls` of them. A task that
   can never be promoted (free text without a judge or eval.text_similarity) answers only
   a sample of its routed calls (eval.undecidable_sample), which its report says.
3. The headline: of all held-out calls, the share the promoted specialists answer and
   their agreement with the LLM's logged answers, with and without deferral.

Writes WORKSPACE/eval/endtoend/{calibration,test}.jsonl (one `ReplayedCall` per call),
eval/endtoend/summary.json (`EndToEnd`), and per task eval/<task id>/report.json
(`EvalReport`) and calls.jsonl (its routed test calls).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmify.errors import SlmifyError
from slmify.gate import EvalConfig, agreement, decide_served
from slmify.recipes import DatasetConfig, read_recipe_sections
from slmify.schema import (
    CallRecord,
    EvalReport,
    ModelAnswer,
    ModelEval,
    PromptPruning,
    ReplayedCall,
    SpecialistResult,
    TaskCluster,
    message_text,
)
from slmify.schema_eval import AnswerSample  # not (yet) gathered in slmify.schema
from slmify.specialists import TaskRuntime
from slmify.workspace import Workspace, read_pruning_file, router_meta_file

HELD_OUT = ("test", "calibration")

JUDGE_KEY_ENVS = ("SLMIFY_JUDGE_API_KEY", "OPENAI_API_KEY")
JUDGE_PROMPT = (
    "You compare two answers to the same request. Reply with exactly YES if the candidate "
    "answer is as correct and as complete as the reference answer, otherwise NO."
)


class EvalError(SlmifyError, RuntimeError):
    """A task that cannot be evaluated; the message names the file."""


# -- the optional LLM judge ---------------------------------------------------------------


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible chat endpoint that says YES/NO to a text answer."""

    url: str
    model: str
    api_key: str | None

    @classmethod
    def from_env(cls, url: str, model: str) -> Judge:
        key = next((os.environ[k] for k in JUDGE_KEY_ENVS if os.environ.get(k)), None)
        return cls(url=url.rstrip("/"), model=model, api_key=key)

    def verdict(self, request: str, reference: str, candidate: str) -> float | None:
        """1.0 (YES), 0.0 (NO), or None when the judge's answer is neither."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": JUDGE_PROMPT},
                {
                    "role": "user",
                    "content": f"Request:\n{request}\n\nReference answer:\n{reference}\n\n"
                    f"Candidate answer:\n{candidate}",
                },
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            f"{self.url}/chat/completions", json.dumps(body).encode(), headers
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())["choices"][0]["message"].get("content") or ""
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise EvalError(f"judge {self.url}: {e}") from None
        word = answer.strip().split()[0].strip(".!").upper() if answer.strip() else ""
        return {"YES": 1.0, "NO": 0.0}.get(word)


# -- what the train stage left ------------------------------------------------------------


@dataclass(frozen=True)
class TrainedTask:
    task: TaskCluster
    folder: Path
    result: SpecialistResult
    pruning: PromptPruning
    held_out: dict[str, list[str]]  # frozen call ids of the test and calibration splits
    cfg: EvalConfig
    dataset: DatasetConfig

    def runtime(self) -> TaskRuntime:
        """The specialist as serving will run it (its threshold is fitted later)."""
        from slmify.models import resolve_base

        r = self.result
        return TaskRuntime(
            id=self.task.id,
            output_shape=self.task.output_shape,
            kind=r.kind,
            base_path=str(resolve_base(r.base_model)) if r.kind == "lora" else None,
            adapter=Path(r.adapter) if r.adapter else None,
            head=Path(r.head) if r.head else None,
            pruning=self.pruning,
            max_new_tokens=self.cfg.max_new_tokens,
        )


def trained_task(ws_root: Path, task: TaskCluster) -> TrainedTask | str:
    """The task's specialist files, or why there is no specialist to evaluate."""
    ws = Workspace.at(ws_root)
    result = ws.trained(task.id)
    if isinstance(result, str):
        return result
    folder = ws.specialist_dir(task.id)
    cfg, dataset = read_recipe_sections(ws.recipe_file(task.id))
    splits = ws.splits(task.id)
    pruning = read_pruning_file(folder)
    return TrainedTask(
        task=task,
        folder=folder,
        result=result,
        pruning=pruning,
        held_out={s: list(getattr(splits, s)) for s in HELD_OUT},
        cfg=cfg,
        dataset=dataset,
    )


def sample_ids(ids: list[str], limit: int | None) -> list[str]:
    """All ids, or a deterministic `limit` of them (by hash, so any prefix is unbiased)."""
    if limit is None or len(ids) <= limit:
        return list(ids)
    return sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:limit]


# -- the held-out calls -------------------------------------------------------------------


def held_out_calls(
    store: Any, trained: list[TrainedTask], limit: int | None
) -> dict[str, list[CallRecord]]:
    """The calls of the calibration and test sessions, every call of them whether a task
    claimed it or not: frozen ids stay where they were recorded, any other call goes by its
    session's split (`datasets.split_of`, the same hash training used)."""
    from slmify.datasets import split_of
    from slmify.endtoend import held_out

    frozen = {s: {i for t in trained for i in t.held_out[s]} for s in HELD_OUT}
    dataset = trained[0].dataset
    sessions: dict[str, set[str]] = {s: set() for s in HELD_OUT}
    for stored in store.iter_calls():
        rec = stored.record
        key = rec.session_id or rec.id
        split = next((s for s in HELD_OUT if rec.id in frozen[s]), None) or split_of(rec, dataset)
        if split in sessions:
            sessions[split].add(key)
    out = {}
    for split in HELD_OUT:
        calls = held_out(store, sessions[split], frozen[split])
        keep = set(sample_ids([c.id for c in calls], limit))
        out[split] = [c for c in calls if c.id in keep]
    return out


# -- every task ---------------------------------------------------------------------------


def evaluate_workspace(
    ws_root: Path,
    store: Any,
    task_ids: list[str] | None = None,
    limit: int | None = None,
    judge: Judge | None = None,
    progress: bool = True,
    announce: Callable[[str], None] = lambda line: None,
    design: str | None = None,
) -> dict[str, Any]:
    """Calibrate and evaluate every trained task (or `task_ids`) end to end; returns the
    summary `slmify eval` prints, headed by the share of held-out calls served. `design`
    overrides the recipe's eval.design (slmify.agent)."""
    from slmify.agent import agent_calls, choose_designs
    from slmify.endtoend import Replay, end_to_end, fit_deferrals, task_served
    from slmify.runtime import TextEncoder
    from slmify.specialists import SpecialistPool, serving_threshold

    ws = Workspace.at(ws_root)
    tasks = ws.tasks()
    unknown = sorted(set(task_ids or []) - {t.id for t in tasks})
    if unknown:
        raise EvalError(f"no task {', '.join(unknown)} in {ws.tasks_file()}")
    trained: list[TrainedTask] = []
    summary: dict[str, Any] = {"evaluated": 0, "promoted": 0, "tasks": []}
    for task in tasks:
        if task_ids and task.id not in task_ids:
            continue
        found = trained_task(ws_root, task)
        if isinstance(found, str):
            summary["tasks"].append({"id": task.id, "status": "llm", "reason": found})
            announce(f"{task.id}: -> llm: {found}")
        else:
            trained.append(found)
    if not trained:
        return summary
    # 1. The deployment as serve would load it, every trained specialist a candidate, and
    # the agent-level specialists of agents whose calls some task could serve.
    design = design or trained[0].cfg.design
    agents = [] if design == "tasks" else trained_agents(ws_root, trained, judge)
    pool = SpecialistPool([t.runtime() for t in trained] + [a.runtime for a in agents])
    deployment = Replay(
        router=_load_router(ws_root),
        pool=pool,
        cfgs={t.task.id: t.cfg for t in trained},
        encoder=TextEncoder(),
        judge=_judge_call(judge) if judge else None,
        cluster_task=ws.assigned(),
    )
    calls = held_out_calls(store, trained, limit)
    out = ws.endtoend_dir()
    out.mkdir(parents=True, exist_ok=True)
    again = agent_calls(agents, calls["calibration"])
    with _progress(sum(len(c) for c in calls.values()) + len(again), progress) as tick:
        # 2. Calibration: fit each task's confidence threshold; where an agent has an
        # agent-level specialist, replay its calls with it too and keep the better design.
        rows = deployment.run(calls["calibration"], calibrating=True, tick=tick)
        _write_rows(out / "calibration.jsonl", rows)
        deferrals = fit_deferrals(rows, deployment)
        designs = []
        if agents:
            deferrals, designs = choose_designs(
                deployment, agents, again, deferrals, fit_deferrals, design, tick
            )
        for task_id, deferral in deferrals.items():
            threshold = serving_threshold(deferral)
            pool.tasks[task_id] = replace(pool.tasks[task_id], threshold=threshold)
        # 3. Test: the held-out sessions with those thresholds.
        rows = deployment.run(calls["test"], tick=tick)
    _write_rows(out / "test.jsonl", rows)
    by_task = {t.task.id: task_served(rows, t.task.id, t.cfg) for t in trained}
    promoted = set()
    for t in trained:
        sampled = deployment.samples.get(t.task.id)
        served, deferral = by_task[t.task.id], deferrals[t.task.id]
        report = _task_report(t, rows, served, deferral, judge, ws_root, sampled)
        announce(describe(report))
        summary["evaluated"] += 1
        if report.decision.status == "promoted":
            promoted.add(t.task.id)
        summary["tasks"].append(_task_summary(report, ws.eval_report_file(t.task.id)))
    # 4. The headline: only promoted specialists answer.
    cost = {t.id: t.llm_cost_usd / t.calls for t in tasks if t.calls}
    headline = end_to_end(rows, promoted, by_task, trained[0].cfg, cost)
    replayed = calls["calibration"] + calls["test"]
    seen = router_fitted_on(deployment.router, replayed)
    if seen:
        announce(
            f"warning: the router was fitted on {seen} of the {len(replayed)} replayed calls "
            "(cluster holdout_share below the recipe's test + calibration fractions, or a "
            "router from before held-out fitting): routing figures are optimistic; re-run "
            "`slmify cluster` or `slmify run`"
        )
    headline = headline.model_copy(update={"router_fitted_on": seen, "designs": designs})
    for choice in designs:
        announce(f"{choice.agent}: design {choice.design}: {choice.why}")
    ws.write_end_to_end(headline)
    announce(headline.headline())
    summary["promoted"] = len(promoted)
    summary["end_to_end"] = headline.model_dump(mode="json", exclude={"by_task"})
    summary["headline"] = headline.headline()
    summary["reports"] = str(ws.evals_dir())
    return summary


def trained_agents(ws_root: Path, trained: list[TrainedTask], judge: Judge | None) -> list:
    """The agent-level specialists (slmify.agent) whose agent has a task whose agreement
    can be decided: an agent whose every task is free text without a judge or
    eval.text_similarity could serve nothing either way."""
    from slmify.agent import trained_agents as found
    from slmify.endtoend import decidable

    known = {t.task.id for t in trained if decidable(t.task.output_shape, judge is not None, t.cfg)}
    agents = found(ws_root, {t.task.id for t in trained}, trained[0].cfg.max_new_tokens)
    return [a for a in agents if known & set(a.plan.actions.values())]


def router_fitted_on(router: Any, calls: list[CallRecord]) -> int:
    """How many of `calls` the router was fitted on (`Router.fitted_on`)."""
    if router is None:
        return 0
    return sum(router.fitted_on(c.session_id or c.id) for c in calls)


def _load_router(ws_root: Path) -> Any:
    ws = Workspace.at(ws_root)
    if not router_meta_file(ws.router_dir()).exists():
        return None
    from slmify.router import load_router

    return load_router(ws.router_dir())


def _judge_call(judge: Judge) -> Callable[[CallRecord, str], float | None]:
    def ask(call: CallRecord, candidate: str) -> float | None:
        msgs = call.request.messages
        request = message_text(msgs[-1].get("content")) if msgs else ""
        reference = message_text(call.response.message.get("content"))
        return judge.verdict(request, reference, candidate)

    return ask


def _write_rows(path: Path, rows: list[ReplayedCall]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(r.model_dump_json() + "\n" for r in rows)
    tmp.replace(path)


def _task_report(t, rows, served, deferral, judge, ws_root, sampled=None) -> EvalReport:  # noqa: ANN001
    """One task's report: what it answered of the test calls routed to it, and the gate;
    `sampled`: (asked, routed) when it was asked only a sample of them."""
    mine = [r for r in rows if r.picked == t.task.id]
    specialist = summarize([r.answer for r in mine if r.answer is not None], t.cfg)
    based = [r.base for r in mine if r.base is not None]
    why_not = (
        None if deferral.threshold is not None else f"no confidence threshold: {deferral.reason}"
    )
    served_agreement = None
    if served.served:
        served_agreement = agreement(
            [float(bool(r.agree)) for r in mine if r.answered_by == t.task.id], t.cfg
        )
    decision = decide_served(served_agreement, t.task.output_shape, t.cfg, why_not)
    ws = Workspace.at(ws_root)
    folder = ws.eval_dir(t.task.id)
    folder.mkdir(parents=True, exist_ok=True)
    _write_rows(folder / "calls.jsonl", mine)
    llm = [r.llm_latency_ms for r in mine if r.llm_latency_ms is not None]
    report = EvalReport(
        task_id=t.task.id,
        output_shape=t.task.output_shape,
        specialist=specialist,
        base=summarize(based, t.cfg) if based else None,
        llm_latency_ms_p50=statistics.median(llm) if llm else None,
        judge_model=judge.model if judge else None,
        decision=decision,
        deferral=deferral,
        served=served,
        sample=_sample(sampled),
        unconstrained=_unconstrained(mine),
        adapter=t.result.adapter or t.result.head,
        calls_file=str(folder / "calls.jsonl"),
        created_at=datetime.now(timezone.utc),
    )
    ws.write_eval_report(report)
    return report


def _sample(sampled: tuple[int, int] | None) -> AnswerSample | None:
    """What the report says of a task asked fewer calls than were routed to it."""
    if sampled is None or sampled[0] == sampled[1]:
        return None
    asked, routed = sampled
    return AnswerSample(
        asked=asked,
        routed=routed,
        reason=f"free text without an LLM judge or eval.text_similarity can never be "
        f"promoted: its figures are over a sample of {asked} of the {routed} calls routed "
        f"to it (eval.undecidable_sample)",
    )


def _unconstrained(rows: list[ReplayedCall]) -> dict[str, list[str]]:
    """Why the specialist's answers were generated without their grammar: reason -> calls."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r.answer is not None and r.answer.unconstrained:
            out.setdefault(r.answer.unconstrained, []).append(r.call_id)
    return out


def gate_score(answer: ModelAnswer) -> float:
    """What an answer scores: the judge's verdict on text when there is one."""
    return answer.judge if answer.judge is not None else answer.score.score


def summarize(answers: list[ModelAnswer], cfg: EvalConfig) -> ModelEval:
    """Agreement with its bound, each metric averaged, latency and throughput."""
    sums: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for a in answers:
        for key, value in a.score.metrics.items():
            if value is not None:
                sums[key] += float(value)
                counts[key] += 1
    metrics = {k: round(sums[k] / counts[k], 4) for k in sorted(counts)}
    judged = [a.judge for a in answers if a.judge is not None]
    if judged:
        metrics["judge_yes"] = round(sum(judged) / len(judged), 4)
    by_shape = dict(Counter(a.score.shape for a in answers))
    seconds = sum(a.latency_ms for a in answers) / 1000
    tokens = sum(a.output_tokens for a in answers)
    return ModelEval(
        agreement=agreement([gate_score(a) for a in answers], cfg, metrics, by_shape),
        latency_ms_p50=statistics.median(a.latency_ms for a in answers) if answers else None,
        tokens_per_s=round(tokens / seconds, 2) if seconds else None,
    )


def describe(report: EvalReport) -> str:
    """One line per task: what it served of the held-out calls routed to it, and why."""
    s = report.served
    a = report.specialist.agreement
    served = (
        f"served {s.served} of {s.routed} routed"
        + (f", agreement {s.agreement:.3f} (lower {s.agreement_lower:.3f})" if s.served else "")
        if s
        else ""
    )
    b = report.base.agreement if report.base else None
    base = f", base model {b.mean:.3f} [{b.lower:.3f}, {b.upper:.3f}]" if b else ""
    sample = f" (a sample of {report.sample.routed} routed)" if report.sample else ""
    return (
        f"{report.task_id}: n={a.n}{sample} answered {a.mean:.3f} [{a.lower:.3f}, "
        f"{a.upper:.3f}]{base}; "
        f"{served} -> {report.decision.status}: {report.decision.reason}"
    )


def _task_summary(report: EvalReport, report_file: Path) -> dict[str, Any]:
    a = report.specialist.agreement
    return {
        "id": report.task_id,
        "status": report.decision.status,
        "reason": report.decision.reason,
        "test_calls": a.n,
        "specialist": {
            "mean": round(a.mean, 4),
            "lower": round(a.lower, 4),
            "upper": round(a.upper, 4),
        },
        "base": {"mean": round(b.mean, 4), "lower": round(b.lower, 4)}
        if (b := report.base and report.base.agreement)
        else None,
        "threshold": report.deferral.threshold if report.deferral else None,
        "served": report.served.model_dump() if report.served else None,
        "sample": report.sample.model_dump() if report.sample else None,
        "specialist_latency_ms_p50": report.specialist.latency_ms_p50,
        "specialist_tokens_per_s": report.specialist.tokens_per_s,
        "llm_latency_ms_p50": report.llm_latency_ms_p50,
        "report": str(report_file),
    }


class _progress:
    """Progress over the held-out calls (or nothing): a rich bar on a terminal; else (a piped
    log, CI) a plain line every $SLMIFY_PROGRESS_SECONDS (30) seconds and at the end: calls
    done of all, rate, time left. Yields the function that advances it."""

    def __init__(self, total: int, enabled: bool):
        import sys

        self.total, self.enabled, self.bar = total, enabled and total > 0, None
        self.plain = self.enabled and not sys.stdout.isatty()
        self.every = float(os.environ.get("SLMIFY_PROGRESS_SECONDS") or 30)

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        if self.plain:
            import time

            self.done, self.clock = 0, time.perf_counter
            self.started = self.last = self.clock()
            print(f"eval: replaying {self.total} held-out calls", flush=True)
            return self.tick
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("evaluating test calls", total=self.total)
        return lambda: self.bar.advance(task)

    def tick(self) -> None:
        self.done += 1
        now = self.clock()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate
            print(
                f"eval: {self.done}/{self.total} calls, {rate:.1f} calls/s, "
                f"{int(left // 60)}m{int(left % 60):02d}s left",
                flush=True,
            )

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
