"""The quality gate: confidence bounds, and decisions at their boundaries."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmify.gate import EvalConfig, agreement, bootstrap_bounds, decide, wilson_bounds


def test_wilson_bounds_hand_checked() -> None:
    # 45/50 at one-sided 95%: z = 1.644854, z^2 = 2.705543; centre 0.9 + z^2/100 = 0.927055;
    # spread z * sqrt(0.09/50 + z^2/10000) = 0.074847; denominator 1 + z^2/50 = 1.054111.
    lower, upper = wilson_bounds(45, 50, 0.95)
    assert lower == pytest.approx((0.927055 - 0.074847) / 1.054111, abs=1e-5)  # 0.80846
    assert upper == pytest.approx((0.927055 + 0.074847) / 1.054111, abs=1e-5)  # 0.95047
    # All correct: lower = n / (n + z^2), upper = 1.
    lower, upper = wilson_bounds(20, 20, 0.95)
    assert lower == pytest.approx(20 / (20 + 1.6448536**2))
    assert upper == pytest.approx(1.0)
    assert wilson_bounds(0, 10, 0.95)[0] == 0.0
    assert wilson_bounds(0, 0, 0.95) == (0.0, 1.0)


def test_bootstrap_bounds_bracket_the_mean_and_are_seeded() -> None:
    scores = [0.6, 0.7, 0.8, 0.9, 0.75] * 10
    lower, upper = bootstrap_bounds(scores, 0.95, 2000, seed=0)
    assert lower < 0.75 < upper
    assert (lower, upper) == bootstrap_bounds(scores, 0.95, 2000, seed=0)
    # Constant scores have no spread.
    assert bootstrap_bounds([0.8] * 30, 0.95, 500, seed=1) == pytest.approx((0.8, 0.8))


def test_agreement_picks_the_method() -> None:
    cfg = EvalConfig()
    binary = agreement([1.0] * 9 + [0.0], cfg)
    assert binary.method == "wilson" and binary.mean == 0.9 and binary.n == 10
    continuous = agreement([0.9, 0.5, 1.0, 0.0], cfg)
    assert continuous.method == "bootstrap"
    assert continuous.mean == pytest.approx(0.6)


def test_promoted_exactly_at_threshold() -> None:
    agr = agreement([1.0] * 48 + [0.0] * 2, EvalConfig())
    at = EvalConfig(thresholds={"tool_call": agr.lower})
    d = decide(agr, "tool_call", at)
    assert d.status == "promoted"
    assert d.reason.startswith("agreement 0.960 over 50 test calls, 95% lower bound")
    assert d.threshold == agr.lower
    above = EvalConfig(thresholds={"tool_call": agr.lower + 1e-9})
    d = decide(agr, "tool_call", above)
    assert d.status == "llm"
    assert "< tool_call threshold" in d.reason


def test_too_few_calls_stays_on_the_llm_even_when_perfect() -> None:
    cfg = EvalConfig(min_test_calls=20, thresholds={"label": 0.5})
    d = decide(agreement([1.0] * 19, cfg), "label", cfg)
    assert d.status == "llm"
    assert d.reason == "too few test calls: 19 < min_test_calls 20"
    assert decide(agreement([1.0] * 20, cfg), "label", cfg).status == "promoted"


def test_default_thresholds_are_cautious() -> None:
    cfg = EvalConfig()
    # 90% observed agreement on 50 calls is not enough evidence for a 0.9 threshold...
    assert decide(agreement([1.0] * 45 + [0.0] * 5, cfg), "tool_call", cfg).status == "llm"
    # ...99/100 is.
    assert decide(agreement([1.0] * 99 + [0.0], cfg), "tool_call", cfg).status == "promoted"


def test_text_gate_uses_the_bootstrap_bound() -> None:
    cfg = EvalConfig()
    good = agreement([0.85, 0.9, 0.8, 0.95] * 10, cfg)
    d = decide(good, "text", cfg)
    assert d.status == "promoted" and "mean similarity" in d.reason and "bootstrap" in d.reason
    weak = agreement([0.85, 0.3, 0.8, 0.6] * 10, cfg)
    assert decide(weak, "text", cfg).status == "llm"


def test_thresholds_merge_with_defaults_and_reject_unknown_shapes() -> None:
    assert EvalConfig(thresholds={"text": 0.8}).thresholds == {
        "tool_call": 0.9,
        "json": 0.9,
        "label": 0.9,
        "text": 0.8,
    }
    with pytest.raises(ValidationError, match=r"unknown output shape\(s\) \['txet'\]"):
        EvalConfig(thresholds={"txet": 0.8})
    with pytest.raises(ValidationError, match="thresholds must be in"):
        EvalConfig(thresholds={"text": 1.5})
    with pytest.raises(ValidationError, match="min_tests_calls"):
        EvalConfig(min_tests_calls=5)


def _answer(shape: str, score: float, judge: float | None = None, **metrics: float):
    from slmify.schema import AnswerScore, ModelAnswer

    return ModelAnswer(
        text="x",
        message={"role": "assistant", "content": "x"},
        score=AnswerScore(shape=shape, agree=score == 1.0, score=score, metrics=metrics),
        latency_ms=100.0,
        output_tokens=20,
        judge=judge,
    )


def test_summary_counts_the_judge_verdict_on_text_and_averages_metrics() -> None:
    from slmify.evaluate import summarize

    answers = [
        _answer("text", 0.6, judge=1.0, cosine=0.8, rouge_l=0.4),
        _answer("text", 0.9, judge=0.0, cosine=1.0, rouge_l=0.8),
        _answer("tool_call", 1.0, tool_name=True, arguments_exact=True),
    ]
    s = summarize(answers, EvalConfig())
    # The gate counts verdicts 1, 0 and the exact tool call: 2/3, all binary -> Wilson.
    assert s.agreement.mean == pytest.approx(2 / 3) and s.agreement.method == "wilson"
    assert s.agreement.metrics == {
        "arguments_exact": 1.0,
        "cosine": 0.9,
        "judge_yes": 0.5,
        "rouge_l": 0.6,
        "tool_name": 1.0,
    }
    assert s.agreement.by_shape == {"text": 2, "tool_call": 1}
    assert s.latency_ms_p50 == 100.0 and s.tokens_per_s == 200.0
    without_judge = summarize([_answer("text", 0.6), _answer("text", 0.9)], EvalConfig())
    assert without_judge.agreement.method == "bootstrap"
    assert without_judge.agreement.mean == pytest.approx(0.75)


def test_a_recipe_eval_typo_names_the_file_and_key(tmp_path) -> None:  # noqa: ANN001
    from slmify.recipes import RecipeError, read_recipe_sections

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {base: x}\neval: {min_tests_calls: 5}\n")
    with pytest.raises(RecipeError) as e:
        read_recipe_sections(recipe)
    assert str(e.value) == (
        f"{recipe}: eval: min_tests_calls: unknown key (misspelled? see the recipe's comments)"
    )
    # Only eval: is read, so a GPU recipe (4-bit) can be evaluated on a CPU.
    recipe.write_text("quantization: {load_in_4bit: true}\neval: {min_test_calls: 7}\n")
    assert read_recipe_sections(recipe)[0].min_test_calls == 7


def test_threshold_search_returns_the_threshold_computed_by_hand() -> None:
    from slmify.gate import fit_threshold

    # 30 confident right answers, then a wrong one at 0.6 and right ones below it.
    scored = [(0.99 - i * 0.01, True) for i in range(30)] + [(0.6, False)]
    scored += [(0.5, True), (0.4, True), (0.3, False)]
    # Wilson one-sided 95%: 30/30 -> 0.917 >= 0.9; 30/31 -> 0.868; 31/32 -> 0.871;
    # 32/33 -> 0.875; 32/34 -> 0.837. Only the top 30 clear 0.9: the threshold is the
    # 30th confidence.
    threshold, served, agreed = fit_threshold(scored, 0.9, 0.95)
    assert threshold == pytest.approx(0.70) and (served, agreed) == (30, 30)
    assert wilson_bounds(30, 30, 0.95)[0] >= 0.9 > wilson_bounds(30, 31, 0.95)[0]
    # A lower target admits the lowest threshold whose bound still clears it.
    assert fit_threshold(scored, 0.86, 0.95) == (0.4, 33, 32)
    assert fit_threshold(scored, 0.83, 0.95) == (0.3, 34, 32)
    # At 0.87 the top 30 clear (0.917), 30/31 fails (0.868), then 31/32 and 32/33 clear
    # again (0.871, 0.875): the search stops at the first failure, so the bound it
    # reports is not the best of several looks past a failing one.
    assert fit_threshold(scored, 0.87, 0.95) == (pytest.approx(0.70), 30, 30)
    # Too few answers for any bound to clear the target: no threshold.
    assert fit_threshold([(0.9, True)] * 5, 0.9, 0.95) == (None, 0, 0)
    # Equal confidences are kept or deferred together.
    tied = [(0.8, True)] * 30 + [(0.8, False)] * 2
    assert fit_threshold(tied, 0.9, 0.95) == (None, 0, 0)


def test_calibration_chooses_and_the_test_sessions_certify() -> None:
    from slmify.gate import choose_threshold, wilson_bounds

    # Enough answers: the fitted threshold, as fit_threshold finds it.
    scored = [(0.99 - i * 0.01, True) for i in range(30)] + [(0.6, False)]
    threshold, served, agreed, why = choose_threshold(scored, 0.9, 0.95)
    assert (threshold, served, agreed) == (pytest.approx(0.70), 30, 30)
    assert why == (
        "30 of 31 calibration answers at confidence >= 0.700: 30 agree, lower bound 0.917 >= 0.90"
    )
    # Five right answers can bound nothing at 0.9 (5/5: 0.649): no deferral, and the test
    # sessions' gate decides.
    assert wilson_bounds(5, 5, 0.95)[0] < 0.9
    few = choose_threshold([(0.9, True)] * 5, 0.9, 0.95)
    assert few == (
        0.0,
        5,
        5,
        "too few to fit a threshold: 5 calibration answers (5 agree, 95% upper bound 1.000) "
        ">= 0.90; no deferral, the test sessions decide all or nothing",
    )
    # Nothing routed on calibration sessions: the same.
    assert choose_threshold([], 0.9, 0.95)[:3] == (0.0, 0, 0)
    # 25 of 35: the upper bound (0.821, by hand: (0.753 + 0.131) / 1.077) shows the task
    # below 0.9: it serves nothing.
    bad = [(0.5, True)] * 25 + [(0.5, False)] * 10
    assert choose_threshold(bad, 0.9, 0.95) == (
        None,
        0,
        0,
        "no threshold reaches a 95% lower bound of 0.90; 35 calibration answers (25 agree, "
        "95% upper bound 0.821) < 0.90: below target",
    )
