"""S6 eval, end to end: held-out sessions replayed through the serving decision path.

The figure slmify exists for is the share of an agent's real calls that specialists
answer at the LLM's quality. It is measured here the way a deployment would see it:
every call of the held-out sessions (the test split's sessions, unassigned calls
included) goes through the router, the scope checks, the specialist, the answer's
validation and the confidence threshold (slmify.decision, as `slmify serve` runs them),
and only then is its answer compared with the LLM's logged answer. A call the router sends
to the wrong task counts against the task that got it.

Calibration (`fit_deferrals`) replays the calibration sessions (neither train nor test) the
same way with every trained specialist answering, and fits per task the lowest confidence
threshold at which the lower bound of agreement on the answers above it clears the task's
target (slmify.gate.choose_threshold: no deferral when the answers are too few to fit one).

A task whose agreement cannot be decided (free text without a judge or
eval.text_similarity) can never be promoted: calibration does not ask it, and the test
replay asks it only a sample of the calls routed to it (eval.undecidable_sample, drawn by
the recipe's seed), for its report's similarity figures; the rest are recorded as staying
on the LLM, as they would be served.

Reads the calls from the store and each task's splits (which sessions are held out);
writes nothing itself: slmify.evaluate writes what these functions return.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from slmify.datasets import hash_unit
from slmify.decision import Decision, answer_decision, combined_confidence, route_decision
from slmify.gate import EvalConfig, agreement, choose_threshold, wilson_bounds
from slmify.metrics import Encoder, score_answer
from slmify.router import MAX_ROUTE_BATCH
from slmify.schema import (
    AnswerScore,
    CallRecord,
    Deferral,
    EndToEnd,
    ModelAnswer,
    OutputShape,
    ReplayedCall,
    TaskServed,
)
from slmify.specialists import Answer, OutOfScope, SpecialistPool

LLM = "llm"
UNDECIDABLE = "not-promoted: free text without a judge or eval.text_similarity"


def held_out(store: Any, sessions: set[str], ids: set[str]) -> list[CallRecord]:
    """The calls a deployment would have seen in `sessions` (a call without a session is
    its own) or named in `ids`: answered calls the agent made, not specialists' answers."""
    out = []
    for stored in store.iter_calls():
        rec = stored.record
        if rec.id not in ids and (rec.session_id or rec.id) not in sessions:
            continue
        if rec.status != "ok" or rec.response is None or not rec.request.messages:
            continue
        if rec.source.startswith("specialist:"):
            continue
        out.append(rec)
    return out


def agrees(score: AnswerScore, judge: float | None, cfg: EvalConfig) -> bool | None:
    """Whether an answer counts as the LLM's: exact shapes by their metric; free text by a
    judge's verdict, else by the similarity threshold the user set (None: no way to tell)."""
    if score.shape != "text":
        return score.agree
    if judge is not None:
        return judge >= 0.5
    if cfg.text_similarity is not None:
        return score.score >= cfg.text_similarity
    return None


def decidable(shape: OutputShape, judged: bool, cfg: EvalConfig) -> bool:
    """Whether agreement with the LLM can be decided for answers of `shape`: free text
    needs a judge (`judged`) or a similarity threshold the user set."""
    return shape != "text" or judged or cfg.text_similarity is not None


@dataclass
class Replay:
    """The deployment as serve would run it, every specialist of `pool` a candidate, and
    what scoring an answer needs."""

    router: Any
    pool: SpecialistPool
    cfgs: dict[str, EvalConfig]
    encoder: Encoder
    judge: Callable[[CallRecord, str], float | None] | None
    cluster_task: dict[str, str]
    # Per undecidable task, (calls asked, calls routed to it) of the last test replay.
    samples: dict[str, tuple[int, int]] = field(default_factory=dict)

    def decidable(self, task_id: str) -> bool:
        """Whether agreement with the LLM can be decided for this task's answers."""
        shape = self.pool.tasks[task_id].output_shape
        return decidable(shape, self.judge is not None, self.cfgs[task_id])

    def run(
        self,
        calls: list[CallRecord],
        calibrating: bool = False,
        tick: Callable[[], None] = lambda: None,
    ) -> list[ReplayedCall]:
        """Each call through the decision path. Calibrating, a task whose agreement cannot
        be decided is not asked (nothing to fit); testing, it is asked a sample of its calls
        (`sampled`), and the base model of a LoRA specialist answers too where its recipe's
        eval.compare_base says so."""
        # A router that generates (an agent-level specialist answers while routing) spends
        # the time there: progress follows routing then, else the answers.
        generates = getattr(self.router, "generates", False)
        decisions = self.route(calls, tick if generates else lambda: None)
        if calibrating:
            decisions = [
                replace(d, task_id=None, reason=UNDECIDABLE)
                if d.task_id and not self.decidable(d.task_id)
                else d
                for d in decisions
            ]
        else:
            decisions = self.sampled(calls, decisions)
        out = []
        for call, decision in zip(calls, decisions, strict=True):
            out.append(self.answer(call, decision, compare_base=not calibrating))
            if not generates:
                tick()
        return out

    def route(
        self, calls: list[CallRecord], tick: Callable[[], None] = lambda: None
    ) -> list[Decision]:
        """Where each call goes before any specialist answers (router, scope checks)."""
        threshold = self.router.meta.min_confidence if self.router is not None else 1.0
        tasks = self.pool.tasks
        out = []
        for start in range(0, len(calls), MAX_ROUTE_BATCH):
            batch = calls[start : start + MAX_ROUTE_BATCH]
            if self.router is None:
                routes = [(None, 1.0)] * len(batch)
            else:
                routes = self.router.route_many([c.request for c in batch])
            for call, (picked, conf) in zip(batch, routes, strict=True):
                out.append(route_decision(call.request, picked, conf, threshold, tasks, tasks))
                tick()
        return out

    def sampled(self, calls: list[CallRecord], decisions: list[Decision]) -> list[Decision]:
        """`decisions` with each undecidable task asked at most its eval.undecidable_sample
        of the calls routed to it, the first by a hash of the recipe's seed and the call id
        (reruns ask the same calls); the others go to the LLM, as serve would send them."""
        routed: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(decisions):
            if d.task_id and not self.decidable(d.task_id):
                routed[d.task_id].append(i)
        self.samples = {}
        out = list(decisions)
        for task_id, rows in routed.items():
            cfg = self.cfgs[task_id]
            # A call's place is the same on every rerun with the seed, whatever order the
            # store gives the calls in.
            ranked = sorted(rows, key=lambda i: (hash_unit(f"{cfg.seed}:{calls[i].id}"), i))
            asked = ranked[: cfg.undecidable_sample]
            self.samples[task_id] = (len(asked), len(rows))
            reason = f"{UNDECIDABLE} (answered a sample of {len(asked)} of {len(rows)})"
            for i in ranked[cfg.undecidable_sample :]:
                out[i] = replace(decisions[i], task_id=None, reason=reason)
        return out

    def answer(self, call: CallRecord, decision: Decision, compare_base: bool) -> ReplayedCall:
        row = ReplayedCall(
            call_id=call.id,
            session_id=call.session_id,
            cluster_task=self.cluster_task.get(call.id),
            picked=decision.picked,
            router_confidence=decision.confidence,
            answered_by=LLM,
            reason=decision.reason,
            answer=None,
            confidence=None,
            agree=None,
            llm_latency_ms=call.latency_ms,
        )
        if decision.task_id is None:
            return row
        task = self.pool.tasks[decision.task_id]
        try:
            answer = self.pool.answer(task.id, call.request)
        except OutOfScope as e:
            return row.model_copy(update={"reason": f"out-of-scope: {e}"})
        scored = self.scored(call, answer)
        settled = answer_decision(decision, answer, task)
        base = None
        # An agent-level specialist's base would answer every call of its agent: not asked.
        own = task.answered_by is None
        if compare_base and own and task.kind == "lora" and self.cfgs[task.id].compare_base:
            base = self.scored(call, self.pool.answer(task.id, call.request, use_adapter=False))
        ok = agrees(scored.score, scored.judge, self.cfgs[task.id])
        return row.model_copy(
            update={
                "answered_by": task.id if settled.task_id else LLM,
                "reason": settled.reason,
                "answer": scored,
                "base": base,
                "confidence": round(combined_confidence(answer, decision), 6),
                # An answer that failed validation never reaches the client: it cannot agree.
                "agree": False if answer.problem is not None else ok,
            }
        )

    def scored(self, call: CallRecord, answer: Answer) -> ModelAnswer:
        """`answer` with its agreement with the LLM's (and the judge's verdict on text)."""
        offered = call.offered_tools()
        score = score_answer(call.response.message, answer.message, offered, self.encoder)
        judged = self.judge is not None and score.shape == "text"
        return ModelAnswer(
            text=answer.text,
            message=answer.message,
            score=score,
            latency_ms=answer.latency_ms,
            output_tokens=answer.output_tokens,
            judge=self.judge(call, answer.text) if judged else None,
            confidence=round(answer.confidence, 6),
            unconstrained=answer.unconstrained,
        )


# -- calibration --------------------------------------------------------------------------


def fit_deferrals(rows: list[ReplayedCall], replay: Replay) -> dict[str, Deferral]:
    """Per task, the threshold fitted on the calibration calls routed to it."""
    out = {}
    for task_id, cfg in replay.cfgs.items():
        target = cfg.thresholds[replay.pool.tasks[task_id].output_shape]
        mine = [r for r in rows if r.picked == task_id and r.answer is not None]
        # An answer that fails validation goes to the LLM whatever its confidence, so it
        # says nothing about the threshold. A call whose LLM answer is free text on a task
        # of another shape is decided (the specialist did not answer in words).
        scored = [(r.confidence or 0.0, bool(r.agree)) for r in mine if _valid(r)]
        if not replay.decidable(task_id):
            out[task_id] = Deferral(
                threshold=None,
                target=target,
                calibration_calls=len(mine),
                calibration_served=0,
                reason="free text without an LLM judge or eval.text_similarity: "
                "agreement cannot be decided",
            )
            continue
        threshold, served, agreed, reason = choose_threshold(scored, target, cfg.confidence)
        lower = wilson_bounds(agreed, served, cfg.confidence)[0] if served else None
        out[task_id] = Deferral(
            threshold=threshold,
            target=target,
            calibration_calls=len(mine),
            calibration_served=served,
            calibration_agreement=round(agreed / served, 4) if served else None,
            calibration_agreement_lower=round(lower, 4) if lower is not None else None,
            reason=reason,
        )
    return out


# -- the figures --------------------------------------------------------------------------


def _bounds(flags: list[bool], cfg: EvalConfig) -> tuple[float | None, float | None]:
    if not flags:
        return None, None
    a = agreement([float(f) for f in flags], cfg)
    return round(a.mean, 4), round(a.lower, 4)


def _valid(row: ReplayedCall) -> bool:
    return row.answer is not None and not row.reason.startswith("invalid-output")


def task_served(rows: list[ReplayedCall], task_id: str, cfg: EvalConfig) -> TaskServed:
    """What `task_id` answered of the held-out calls routed to it, with and without its
    threshold; every valid answer counts in `without deferral`."""
    routed = [r for r in rows if r.picked == task_id]
    served = [bool(r.agree) for r in routed if r.answered_by == task_id]
    valid = [bool(r.agree) for r in routed if _valid(r)]
    mean, lower = _bounds(served, cfg)
    mean_all, lower_all = _bounds(valid, cfg)
    return TaskServed(
        routed=len(routed),
        routed_as_clustered=sum(r.cluster_task == task_id for r in routed),
        served=len(served),
        agreement=mean,
        agreement_lower=lower,
        served_without_deferral=len(valid),
        agreement_without_deferral=mean_all,
        agreement_lower_without_deferral=lower_all,
    )


def end_to_end(
    rows: list[ReplayedCall],
    promoted: set[str],
    by_task: dict[str, TaskServed],
    cfg: EvalConfig,
    cost_per_call: dict[str, float],
) -> EndToEnd:
    """The headline over the held-out calls: only promoted tasks answer."""
    served = [r for r in rows if r.answered_by in promoted]
    flags = [bool(r.agree) for r in served]
    valid_all = [bool(r.agree) for r in rows if r.picked in promoted and _valid(r)]
    mean, lower = _bounds(flags, cfg)
    mean_all, lower_all = _bounds(valid_all, cfg)
    latencies = [r.llm_latency_ms for r in served]
    routed = [r for r in rows if r.picked in by_task]
    return EndToEnd(
        split="test",
        sessions=len({r.session_id or r.call_id for r in rows}),
        calls=len(rows),
        served=len(served),
        served_share=round(len(served) / len(rows), 4) if rows else 0.0,
        agreement=mean,
        agreement_lower=lower,
        confidence=cfg.confidence,
        method="wilson" if flags else None,
        served_without_deferral=len(valid_all),
        agreement_without_deferral=mean_all,
        agreement_lower_without_deferral=lower_all,
        reasons=dict(Counter(_code(r, promoted) for r in rows)),
        routed_share=round(len(routed) / len(rows), 4) if rows else 0.0,
        routing_accuracy=round(sum(r.picked == r.cluster_task for r in routed) / len(routed), 4)
        if routed
        else None,
        llm_cost_usd_moved=round(sum(cost_per_call.get(r.answered_by, 0.0) for r in served), 6),
        llm_latency_s_moved=round(sum(latencies) / 1000, 2)
        if served and all(x is not None for x in latencies)
        else None,
        by_task={t: by_task[t] for t in sorted(by_task)},
    )


def _code(row: ReplayedCall, promoted: set[str]) -> str:
    """The reason code the deployment would give: a task that is not promoted answers
    nothing, whatever its specialist did in the replay."""
    if row.picked is not None and row.picked not in promoted and row.answer is not None:
        return "not-promoted"
    return row.reason.split(":", 1)[0]
