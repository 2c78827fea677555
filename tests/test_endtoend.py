"""The real seams, cluster -> train -> eval -> manifest -> serve, on the demo agent's logs
with a tiny random base model (and the real MiniLM label head), and the end-to-end
figures: held-out sessions replayed through the serving decision path.

Every stage file here is written by the stage itself, through the CLI; nothing is forged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, sets
from conftest import run_cli as _cli

from slmify.schema import EndToEnd, EvalReport, ReplayedCall


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_trained: Path) -> Path:
    """This module's copy of the trained demo workspace (its tests evaluate into it)."""
    ws = tmp_path_factory.mktemp("e2e") / "ws"
    shutil.copytree(demo_trained, ws)
    return ws


def test_the_stages_meet_through_their_own_files(trained: Path, tiny_base: Path) -> None:
    from slmify.manifest import read_manifest
    from slmify.specialists import SpecialistPool, task_runtimes

    out = _cli("eval", "-w", str(trained))
    e2e = EndToEnd.model_validate_json((trained / "eval" / "endtoend" / "summary.json").read_text())
    rows = [
        ReplayedCall.model_validate_json(line)
        for line in (trained / "eval" / "endtoend" / "test.jsonl").open()
    ]
    # Every held-out call is replayed once, assigned or not, and the figures add up.
    assert e2e.calls == len(rows) == len({r.call_id for r in rows}) > 100
    assert sum(e2e.reasons.values()) == e2e.calls
    promoted = {t["id"] for t in out["tasks"] if t["status"] == "promoted"}
    assert e2e.served == sum(r.answered_by in promoted for r in rows)
    assert out["headline"] == e2e.headline()
    reports = {
        p.parent.name: EvalReport.model_validate_json(p.read_text())
        for p in (trained / "eval").glob("t*/report.json")
    }
    heads = [t for t, r in reports.items() if r.output_shape == "label"]
    assert len(heads) == 1, "the demo's ticket classifier trains a label head"
    [label] = heads
    head = reports[label]
    # The head answers from its label set, and its threshold was fitted on calibration
    # sessions: it serves what clears the threshold, or nothing without one.
    assert head.deferral is not None and head.deferral.calibration_calls >= 30
    assert head.served.routed >= 30 and head.served.served_without_deferral == head.served.routed
    if head.deferral.threshold is None:
        assert head.served.served == 0 and head.decision.status == "llm"
    # The gate reads what was served on the test sessions, through the router.
    for report in reports.values():
        s = report.served
        promoted_ok = s.served >= 20 and (s.agreement_lower or 0) >= report.decision.threshold
        assert (report.decision.status == "promoted") == promoted_ok
    # A random 2-layer LoRA never writes the LLM's JSON or tool call: those stay on the LLM.
    for report in reports.values():
        if report.output_shape in ("json", "tool_call"):
            assert report.decision.status == "llm"
            assert report.served.agreement_without_deferral in (0.0, None)
    # The manifest carries everything serving needs, and serve reads only what it names.
    _cli("manifest", "-w", str(trained))
    manifest = read_manifest(trained / "manifest.yaml")
    assert manifest.end_to_end == e2e
    entry = next(t for t in manifest.tasks if t.id == label)
    assert entry.specialist.kind == "label-head" and entry.specialist.labels
    assert entry.deferral == head.deferral
    runtimes = task_runtimes(manifest, unpromoted=True)
    assert all(rt.pruning is not None for rt in runtimes)
    # Served answers are eval's answers, with eval's confidence.
    pool = SpecialistPool(runtimes)
    from slmify.store import open_store

    with open_store(str(trained / "calls.db")) as st:
        for row in [r for r in rows if r.picked == label][:5]:
            answer = pool.answer(label, st.get_call(row.call_id).record.request)
            assert answer.text == row.answer.text
            assert answer.confidence == pytest.approx(row.answer.confidence, abs=1e-5)


def test_field_heads_learn_the_structured_steps_and_serve_as_evaluated(
    trained: Path, tmp_path: Path, tiny_base: Path
) -> None:
    """The demo's JSON extractor and lookup tool call as field heads (the default): their
    ids are copied from the email and their codes chosen, so they agree with the LLM on
    most held-out calls where a tiny LoRA agrees on none; serve answers exactly as eval."""
    from slmify.manifest import read_manifest
    from slmify.specialists import SpecialistPool, task_runtimes
    from slmify.store import open_store

    ws = tmp_path / "ws"
    shutil.copytree(trained, ws, ignore=shutil.ignore_patterns("eval", "manifest.yaml"))
    tasks = json.loads((ws / "cluster" / "tasks.json").read_text())["tasks"]
    structured = [t["id"] for t in tasks if t["output_shape"] in ("json", "tool_call")]
    overrides = [o for o in TINY_TRAIN if not o.startswith("structured.")]
    for task_id in structured:
        out = _cli(
            "train",
            "-w",
            str(ws),
            "--task",
            task_id,
            *sets([f"model.base={tiny_base}", *overrides]),
        )
        assert out["tasks"][0]["kind"] == "field-head", out
    out = _cli("eval", "-w", str(ws))
    for task_id in structured:
        report = EvalReport.model_validate_json((ws / "eval" / task_id / "report.json").read_text())
        assert report.served.agreement_without_deferral >= 0.8, task_id
    exported = _cli("manifest", "-w", str(ws))
    manifest = read_manifest(ws / "manifest.yaml")
    kinds = {t.id: t.specialist.kind for t in manifest.tasks if t.specialist}
    assert {kinds[t] for t in structured} == {"field-head"}
    vllm = Path(exported["vllm"]).read_text() if exported.get("vllm") else ""
    assert not any(t in vllm for t in structured), "a head has no adapter to host"
    rows = [
        ReplayedCall.model_validate_json(line)
        for line in (ws / "eval" / "endtoend" / "test.jsonl").open()
    ]
    pool = SpecialistPool(
        [r for r in task_runtimes(manifest, unpromoted=True) if r.id in structured]
    )
    with open_store(str(ws / "calls.db")) as st:
        for row in [r for r in rows if r.picked in structured][:6]:
            answer = pool.answer(row.picked, st.get_call(row.call_id).record.request)
            assert answer.message == row.answer.message
            assert answer.confidence == pytest.approx(row.answer.confidence, abs=1e-5)


def test_a_misrouted_call_counts_against_the_task_that_got_it() -> None:
    from slmify.endtoend import end_to_end, task_served
    from slmify.gate import EvalConfig
    from slmify.schema import AnswerScore, ModelAnswer

    def row(call: str, picked: str | None, answered: str, agree: bool | None) -> ReplayedCall:
        answer = None
        if picked is not None:
            score = AnswerScore(shape="label", agree=bool(agree), score=float(bool(agree)))
            answer = ModelAnswer(text="x", message={}, score=score, latency_ms=1.0, output_tokens=1)
        reason = "routed: confidence 0.90 >= 0.50" if answered != "llm" else "no-match: x"
        if picked is not None and answered == "llm":
            reason = "deferred: low-confidence 0.41 < 0.63"
        return ReplayedCall(
            call_id=call,
            session_id="s",
            cluster_task="t01" if call.startswith("a") else "t02",
            picked=picked,
            router_confidence=0.9,
            answered_by=answered,
            reason=reason,
            answer=answer,
            confidence=0.5,
            agree=agree,
        )

    rows = [
        row("a1", "t01", "t01", True),
        row("a2", "t01", "t01", True),
        row("b1", "t01", "t01", False),  # a t02 call the router sent to t01
        row("a3", "t01", "llm", True),  # deferred
        row("c1", None, "llm", None),
    ]
    cfg = EvalConfig()
    served = task_served(rows, "t01", cfg)
    assert (served.routed, served.served, served.served_without_deferral) == (4, 3, 4)
    assert served.routed_as_clustered == 3  # b1 was clustered in t02
    assert served.agreement == pytest.approx(2 / 3, abs=1e-4)
    e2e = end_to_end(rows, {"t01"}, {"t01": served}, cfg, {"t01": 0.01})
    assert (e2e.calls, e2e.served) == (5, 3) and e2e.served_share == 0.6
    assert e2e.reasons == {"routed": 3, "deferred": 1, "no-match": 1}
    assert e2e.llm_cost_usd_moved == pytest.approx(0.03)
    assert e2e.routed_share == 0.8 and e2e.routing_accuracy == 0.75
    # Not promoted: the same replay serves nothing.
    nothing = end_to_end(rows, set(), {"t01": served}, cfg, {})
    assert nothing.served == 0 and nothing.reasons["not-promoted"] == 4


def _oracle(monkeypatch: pytest.MonkeyPatch, ws: Path) -> None:
    """Every LoRA specialist answers exactly what the LLM did, at confidence 0.99; the base
    model without its adapter answers in words. Pruning drops each task's system prompt, so
    two tasks can read the same prompt: the answer is looked up by prompt and shape."""
    from slmify import runtime
    from slmify.datasets import build_prompt, render_assistant
    from slmify.schema import PromptPruning
    from slmify.shapes import answer_shape
    from slmify.store import open_store

    answers: dict[tuple[str, str], str] = {}
    prunings = [
        PromptPruning.model_validate_json(p.read_text())
        for p in (ws / "specialists").glob("*/pruning.json")
    ]

    def answer(self, prompt, use_adapter, max_new_tokens=None, shape="tool_call", grammar=None):  # noqa: ANN001, ANN202, E501
        if not answers:
            with open_store(str(ws / "calls.db")) as st:
                for stored in st.iter_calls():
                    rec = stored.record
                    if rec.response is None or not rec.request.messages:
                        continue
                    message = rec.response.message
                    for pruning in prunings:
                        key = (
                            build_prompt(self.tokenizer, rec.request, pruning),
                            answer_shape(message),
                        )
                        answers[key] = render_assistant(message)
        text = answers.get((prompt, shape), "") if use_adapter else "Let me check that for you."
        return runtime.Generation(text=text, latency_ms=12.5, output_tokens=10, confidence=0.99)

    monkeypatch.setattr(runtime.Specialist, "answer", answer)


def test_specialists_that_match_the_llm_are_promoted_and_serve_from_the_manifest(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import time

    from slmify.manifest import build_manifest, read_manifest
    from slmify.store import open_store

    _oracle(monkeypatch, trained)
    out = _cli("eval", "-w", str(trained))
    tasks = {t["id"]: t for t in out["tasks"]}
    shapes = {
        p.parent.name: EvalReport.model_validate_json(p.read_text()).output_shape
        for p in (trained / "eval").glob("t*/report.json")
    }
    lora = [t for t, shape in shapes.items() if shape in ("json", "tool_call")]
    assert len(lora) == 2
    for task_id in lora:
        t = tasks[task_id]
        assert t["status"] == "promoted", t["reason"]
        # The only disagreements are calls where the LLM itself broke the task's format
        # (an empty or free-text answer to the JSON step), routed here all the same.
        assert t["specialist"]["mean"] >= 0.95
        assert t["base"]["mean"] < 0.05  # the base model alone answered in words
        # Every test call the router sent it was answered: 0.99 x the router's confidence
        # clears a threshold fitted at the lowest such product on calibration sessions.
        assert t["threshold"] <= 0.99
    e2e = out["end_to_end"]
    assert e2e["served"] >= sum(tasks[t]["served"]["served"] for t in lora)
    assert e2e["agreement_lower"] >= 0.9 and e2e["served_share"] >= 0.4
    assert out["headline"].startswith(f"{e2e['served_share']:.1%} of {e2e['calls']} held-out")
    # Deferral declines what it is unsure of: served with it <= served without it.
    assert e2e["served"] <= e2e["served_without_deferral"]
    manifest_out = _cli("manifest", "-w", str(trained))
    assert manifest_out["headline"] == out["headline"]
    manifest = read_manifest(trained / "manifest.yaml")
    for task_id in lora:
        entry = next(t for t in manifest.tasks if t.id == task_id)
        assert (
            entry.status == "promoted" and entry.deferral.threshold == tasks[task_id]["threshold"]
        )
        assert entry.specialist.pruning is not None and entry.specialist.max_new_tokens == 3
        assert (
            f"{task_id}={entry.specialist.adapter_path}" in Path(manifest_out["vllm"]).read_text()
        )
    # An adapter retrained after its evaluation is not served on the old figures.
    adapter_config = trained / "specialists" / lora[0] / "adapter" / "adapter_config.json"
    later = time.time() + 60
    os.utime(adapter_config, (later, later))
    with open_store(str(trained / "calls.db")) as st:
        entry = next(t for t in build_manifest(trained, st).tasks if t.id == lora[0])
    assert entry.status == "llm"
    assert (
        entry.reason == "the evaluation predates the adapter, retrained since (run `slmify eval`)"
    )
