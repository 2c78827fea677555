"""Where one call goes: the serving decision path, shared by `slmify serve` and by the
end-to-end evaluation that replays held-out sessions through it.

Two steps, pure functions of what is known at each point:
- `route_decision`, before any specialist answers: the router's pick and confidence, the
  task's status, and the scope checks (`specialists.out_of_scope`);
- `answer_decision`, once it has answered: an answer that fails validation, or whose
  confidence (the specialist's own times the router's) is below the task's calibrated
  threshold, goes to the LLM.

A reason starts with a code that serve sends in `x-slmify-reason` and eval counts: routed,
pinned, no-router, no-match, low-confidence, not-promoted, out-of-scope, invalid-output,
deferred, specialist-error, router-error, shadow, unreadable.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from slmify.schema import ChatRequest
from slmify.specialists import Answer, TaskRuntime, out_of_scope


@dataclass(frozen=True)
class Decision:
    """Where one call goes: `task_id` answers it, or the LLM when None."""

    task_id: str | None
    reason: str
    picked: str | None = None  # the task the router (or the request's model) chose
    confidence: float | None = None  # the router's
    shadow: bool = False


def route_decision(
    request: ChatRequest,
    picked: str | None,
    confidence: float,
    router_threshold: float,
    tasks: Mapping[str, TaskRuntime],
    promoted: Collection[str],
    sampled_at: float | None = None,
) -> Decision:
    """The route of a request the router placed at `picked` (None: no task fits).

    `sampled_at`: serve's shadow mode picked this call at that rate, so the specialist
    (promoted or not) answers in the background and the LLM answers the client."""
    if picked is None:
        return Decision(None, f"no-match: no task fits ({confidence:.2f})", None, confidence)
    if confidence < router_threshold:
        reason = f"low-confidence: {picked} at {confidence:.2f} < {router_threshold:.2f}"
        return Decision(None, reason, picked, confidence)
    routed = f"routed: confidence {confidence:.2f} >= {router_threshold:.2f}"
    return task_decision(request, picked, confidence, routed, tasks, promoted, sampled_at)


def task_decision(
    request: ChatRequest,
    picked: str,
    confidence: float | None,
    routed: str,
    tasks: Mapping[str, TaskRuntime],
    promoted: Collection[str],
    sampled_at: float | None = None,
) -> Decision:
    """The route of a request that belongs to `picked`: its specialist, unless it is not
    promoted or the request is out of its scope."""
    if picked not in tasks or (picked not in promoted and sampled_at is None):
        return Decision(None, f"not-promoted: {picked} stays on the LLM", picked, confidence)
    if why := out_of_scope(tasks[picked], request):
        return Decision(None, f"out-of-scope: {why}", picked, confidence)
    if sampled_at is not None:
        status = "promoted" if picked in promoted else "not promoted"
        reason = f"shadow: sampled at {sampled_at:g}, {picked} ({status}) answers in the background"
        return Decision(None, reason, picked, confidence, shadow=True)
    return Decision(picked, routed, picked, confidence)


def combined_confidence(answer: Answer, decision: Decision) -> float:
    """What deferral compares with the threshold: the specialist's confidence times the
    router's (1 for a call pinned to its task)."""
    router = decision.confidence if decision.confidence is not None else 1.0
    return answer.confidence * router


def answer_decision(decision: Decision, answer: Answer, task: TaskRuntime) -> Decision:
    """`decision` once the specialist answered: kept, or sent to the LLM because the answer
    is not valid or its confidence is below the task's threshold."""
    if answer.problem is not None:
        return replace(decision, task_id=None, reason=f"invalid-output: {answer.problem}")
    score = combined_confidence(answer, decision)
    if task.threshold is not None and score < task.threshold:
        if task.threshold == math.inf:
            reason = "deferred: calibration found no confidence at which it agrees enough"
        else:
            reason = f"deferred: low-confidence {score:.2f} < {task.threshold:.2f}"
        return replace(decision, task_id=None, reason=reason)
    return decision
