"""The quality gate (S6): when a specialist is good enough to replace the LLM on a task.

`EvalConfig` is the recipe's `eval:` section; the decision functions live beside it. A
specialist is promoted only when the one-sided lower confidence bound of its agreement
with the LLM clears the threshold for the task's output shape, over at least
`min_test_calls` test calls. Agreement on exact shapes is a proportion (Wilson score
bound); on free text it is a mean similarity (percentile bootstrap bound).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmify.schema import Agreement, GateDecision, OutputShape

DEFAULT_THRESHOLDS = {"tool_call": 0.9, "json": 0.9, "label": 0.9, "text": 0.7}


class EvalConfig(BaseModel):
    """Thresholds a cautious user would accept: agreement with the LLM, as a lower
    confidence bound, per output shape."""

    model_config = ConfigDict(extra="forbid")

    min_test_calls: int = Field(
        20, ge=1, description="Fewer test calls than this: stays on the LLM."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_THRESHOLDS),
        description="Per output shape; shapes left out keep their default.",
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="More: a steadier bound on text similarity, slower."
    )
    max_new_tokens: int = Field(
        256, ge=1, description="Generation cap per test call; too low truncates long answers."
    )
    compare_base: bool = Field(
        True,
        description="Also answer each test call with the base model alone, for comparison; "
        "false halves eval time. The gate never reads the base model's figures.",
    )
    text_similarity: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Free text without a judge agrees when its similarity reaches this; "
        "unset, free-text tasks stay on the LLM unless an LLM judge is given.",
    )
    undecidable_sample: int = Field(
        24,
        ge=0,
        description="A task whose agreement cannot be decided (free text without a judge or "
        "text_similarity) can never be promoted: it answers at most this many of the test "
        "calls routed to it (a sample by `seed`), for its report's similarity figures.",
    )
    design: Literal["auto", "tasks", "agent"] = Field(
        "auto",
        description="For an agent with an agent-level specialist: auto keeps the design "
        "that serves more of the calibration sessions' calls; tasks or agent forces one "
        "(to measure both on the test sessions).",
    )
    seed: int = 0

    @field_validator("thresholds")
    @classmethod
    def _known_shapes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(DEFAULT_THRESHOLDS))
        if unknown:
            raise ValueError(
                f"unknown output shape(s) {unknown}; thresholds take {sorted(DEFAULT_THRESHOLDS)}"
            )
        bad = {k: v for k, v in value.items() if not 0.0 < v <= 1.0}
        if bad:
            raise ValueError(f"thresholds must be in (0, 1]: {bad}")
        return {**DEFAULT_THRESHOLDS, **value}


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def wilson_bounds(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds of a proportion, each at `confidence`."""
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - spread) / denom), min(1.0, (centre + spread) / denom)


def bootstrap_bounds(
    scores: list[float], confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """One-sided percentile-bootstrap bounds of a mean, each at `confidence`."""
    if not scores:
        return 0.0, 1.0
    values = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.quantile(means, 1 - confidence)), float(np.quantile(means, confidence))


def agreement(
    scores: list[float],
    cfg: EvalConfig,
    metrics: dict[str, float] | None = None,
    by_shape: dict[str, int] | None = None,
) -> Agreement:
    """Mean per-call agreement with its bound: Wilson when every score is 0 or 1."""
    n = len(scores)
    binary = all(s in (0.0, 1.0) for s in scores)
    if binary:
        lower, upper = wilson_bounds(int(sum(scores)), n, cfg.confidence)
    else:
        lower, upper = bootstrap_bounds(scores, cfg.confidence, cfg.bootstrap_resamples, cfg.seed)
    return Agreement(
        n=n,
        mean=sum(scores) / n if n else 0.0,
        lower=lower,
        upper=upper,
        confidence=cfg.confidence,
        method="wilson" if binary else "bootstrap",
        metrics=metrics or {},
        by_shape=by_shape or {},
    )


def decide(
    specialist: Agreement, shape: OutputShape, cfg: EvalConfig, calls: str = "test calls"
) -> GateDecision:
    """Promote, or keep on the LLM with the reason and its numbers (`calls`: what the
    agreement was measured on, as the reason names it)."""
    threshold = cfg.thresholds[shape]
    if specialist.n < cfg.min_test_calls:
        return GateDecision(
            status="llm",
            threshold=threshold,
            reason=f"too few {calls}: {specialist.n} < min_test_calls {cfg.min_test_calls}",
        )
    what = "agreement" if specialist.method == "wilson" else "mean similarity"
    figures = (
        f"{what} {specialist.mean:.3f} over {specialist.n} {calls}, "
        f"{specialist.confidence:.0%} lower bound {specialist.lower:.3f} ({specialist.method})"
    )
    if specialist.lower >= threshold:
        return GateDecision(
            status="promoted",
            threshold=threshold,
            reason=f"{figures} >= {shape} threshold {threshold:.2f}",
        )
    return GateDecision(
        status="llm",
        threshold=threshold,
        reason=f"{figures} < {shape} threshold {threshold:.2f}",
    )


# -- calibrated deferral and the end-to-end gate ------------------------------------------


def fit_threshold(
    scored: list[tuple[float, bool]], target: float, confidence: float
) -> tuple[float | None, int, int]:
    """The lowest confidence threshold at which the one-sided lower bound (Wilson) of
    agreement over the answers at or above it clears `target`, thresholds tried from the
    most confident down and the search stopped at the first that fails once one cleared
    (fixed-sequence testing): taking the lowest of every threshold that clears, past
    ones that do not, would pick the luckiest of many looks and overstate the bound.

    `scored` holds (confidence, agreed) per answer. Returns the threshold (None when no
    threshold clears the target), and how many answers are at or above it and agree.
    """
    ranked = sorted(scored, key=lambda s: -s[0])
    best: tuple[float | None, int, int] = (None, 0, 0)
    agreed = 0
    for i, (conf, ok) in enumerate(ranked):
        agreed += ok
        # Ties: a threshold keeps every answer of equal confidence, so only the last of
        # a run of equal confidences is a candidate.
        if i + 1 < len(ranked) and ranked[i + 1][0] == conf:
            continue
        if wilson_bounds(agreed, i + 1, confidence)[0] >= target:
            best = (conf, i + 1, agreed)
        elif best[0] is not None:
            break
    return best


def choose_threshold(
    scored: list[tuple[float, bool]], target: float, confidence: float
) -> tuple[float | None, int, int, str]:
    """The deferral threshold calibration picks, with how many answers it serves and how
    many of those agree, and why.

    `fit_threshold`'s when one clears the target. When none does, the calibration answers
    either show the task below its target (the upper bound of their agreement is under it:
    None, the task serves nothing) or are too few to show anything (a small task, or one
    the router seldom picks): then no deferral (threshold 0), and the gate on the test
    sessions decides all or nothing, as it did before deferral. Calibration only chooses;
    the test sessions, never looked at here, certify.
    """
    threshold, served, agreed = fit_threshold(scored, target, confidence)
    n, ok = len(scored), sum(a for _, a in scored)
    if threshold is not None:
        lower = wilson_bounds(agreed, served, confidence)[0]
        why = (
            f"{served} of {n} calibration answers at confidence >= {threshold:.3f}: "
            f"{agreed} agree, lower bound {lower:.3f} >= {target:.2f}"
        )
        return threshold, served, agreed, why
    upper = wilson_bounds(ok, n, confidence)[1]
    figures = f"{n} calibration answers ({ok} agree, {confidence:.0%} upper bound {upper:.3f})"
    if upper < target:
        why = f"no threshold reaches a {confidence:.0%} lower bound of {target:.2f}; {figures}"
        return None, 0, 0, why + f" < {target:.2f}: below target"
    why = (
        f"too few to fit a threshold: {figures} >= {target:.2f}; no deferral, the test "
        "sessions decide all or nothing"
    )
    return 0.0, n, ok, why


def decide_served(
    served: Agreement | None, shape: OutputShape, cfg: EvalConfig, why_not: str | None
) -> GateDecision:
    """The gate on what the task's specialist served of the held-out test sessions."""
    if why_not is not None:
        return GateDecision(status="llm", threshold=cfg.thresholds[shape], reason=why_not)
    return decide(served or agreement([], cfg), shape, cfg, "served held-out calls")
