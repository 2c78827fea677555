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
from conftest import DEMO, TINY_TRAIN, sets
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
    # The router was fitted on none of them (cluster holds out the recipe's test and
    # calibration sessions).
    assert e2e.router_fitted_on == 0
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


def test_eval_counts_the_replayed_calls_a_router_was_fitted_on() -> None:
    import numpy as np

    from slmify.datasets import hash_unit
    from slmify.evaluate import router_fitted_on
    from slmify.router import Router
    from slmify.schema import CallRecord, ChatRequest, RouterMeta

    calls = [
        CallRecord(id=f"c{i}", session_id=f"s{i}", request=ChatRequest(messages=[]), source="t")
        for i in range(40)
    ]
    above = sum(hash_unit(f"s{i}") >= 0.35 for i in range(40))
    assert 0 < above < 40

    def router(share: float | None) -> Router:
        meta = RouterMeta(
            embedding_model="all-MiniLM-L6-v2",
            max_seq_length=128,
            min_confidence=0.5,
            shared_lines={},
            identities=[],
            previous_actions=[],
            holdout={},
            classes=["LLM"],
            held_out_share=share,
        )
        return Router(meta, None, None, np.zeros((1, 0)), np.zeros(1))

    assert router_fitted_on(router(0.35), calls) == above
    # A router from before held-out fitting saw every call; no router, none.
    assert router_fitted_on(router(None), calls) == 40
    assert router_fitted_on(None, calls) == 0


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


def test_the_sample_is_drawn_by_seed_whatever_order_the_calls_come_in() -> None:
    import gzip
    import itertools

    from slmify.collect import detect_format, from_openai_log
    from slmify.decision import Decision
    from slmify.endtoend import Replay
    from slmify.gate import EvalConfig
    from slmify.schema import PromptPruning
    from slmify.specialists import SpecialistPool, TaskRuntime

    with gzip.open(DEMO, "rt") as f:
        objs = [json.loads(line) for line in itertools.islice(f, 40)]
    assert {detect_format(o) for o in objs} == {"openai-log"}
    calls = [c for o in objs for c in from_openai_log(o, "demo")]
    pool = SpecialistPool([])  # nothing loaded: sampling reads only the tasks' shapes
    text = TaskRuntime("t09", "text", "lora", None, None, None, PromptPruning(), 8)
    pool.tasks["t09"] = text
    replay = Replay(None, pool, {"t09": EvalConfig(undecidable_sample=7, seed=3)}, None, None, {})
    routed = Decision("t09", "routed: confidence 0.90 >= 0.50", "t09", 0.9)
    low = Decision(None, "low-confidence: t09 at 0.20 < 0.50", "t09", 0.2)
    decisions = [low if i % 4 == 0 else routed for i in range(len(calls))]
    out = replay.sampled(calls, decisions)
    asked = {c.id for c, d in zip(calls, out, strict=True) if d.task_id}
    assert len(asked) == 7 and replay.samples == {"t09": (7, 30)}
    assert [d for d in out if d is low] == [d for d in decisions if d is low]
    skipped = [d for d in out if d.task_id is None and d is not low]
    assert len(skipped) == 23 and {d.picked for d in skipped} == {"t09"}
    # The same calls however the store orders them; another seed draws others.
    back = replay.sampled(calls[::-1], decisions[::-1])
    assert {c.id for c, d in zip(calls[::-1], back, strict=True) if d.task_id} == asked
    replay.cfgs["t09"] = EvalConfig(undecidable_sample=7, seed=4)
    other = replay.sampled(calls, decisions)
    assert {c.id for c, d in zip(calls, other, strict=True) if d.task_id} != asked
    # Decidable (a similarity threshold set): every routed call is answered.
    replay.cfgs["t09"] = EvalConfig(undecidable_sample=7, text_similarity=0.8)
    assert replay.sampled(calls, decisions) == decisions and replay.samples == {}


def _set_eval(ws: Path, key: str, value: object) -> None:
    """Every task's resolved recipe, the one eval reads, with eval.KEY = value."""
    import yaml

    for recipe in (ws / "specialists").glob("*/recipe.yaml"):
        data = yaml.safe_load(recipe.read_text())
        data["eval"][key] = value
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))


def _rows(ws: Path) -> list[ReplayedCall]:
    path = ws / "eval" / "endtoend" / "test.jsonl"
    return [ReplayedCall.model_validate_json(line) for line in path.open()]


def test_a_task_that_can_never_be_promoted_answers_a_sample_of_its_calls(
    trained: Path, tmp_path: Path
) -> None:
    """Free text without a judge or eval.text_similarity answers eval.undecidable_sample of
    the calls routed to it; the others stay on the LLM as serve would keep them, and every
    figure of the headline is what answering all of them gave."""
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws, ignore=shutil.ignore_patterns("eval", "manifest.yaml"))
    _set_eval(ws, "undecidable_sample", 100_000)
    whole = _cli("eval", "-w", str(ws))
    all_rows = _rows(ws)
    _set_eval(ws, "undecidable_sample", 5)
    sampled = _cli("eval", "-w", str(ws))
    rows = _rows(ws)
    reports = {
        p.parent.name: EvalReport.model_validate_json(p.read_text())
        for p in (ws / "eval").glob("t*/report.json")
    }
    [text] = [t for t, r in reports.items() if r.output_shape == "text"]
    # Routed to it past the router and the scope checks: answered, or too long for its model.
    routed = [
        r
        for r in all_rows
        if r.picked == text
        and (r.answer is not None or r.reason.startswith("out-of-scope: prompt"))
    ]
    assert len(routed) > 5
    report = EvalReport.model_validate_json((ws / "eval" / text / "report.json").read_text())
    assert (report.sample.asked, report.sample.routed) == (5, len(routed))
    assert report.specialist.agreement.n == 5
    assert f"sample of 5 of the {len(routed)} calls routed" in report.sample.reason
    mine = [r for r in rows if r.picked == text]
    skipped = [r for r in mine if r.answer is None and "answered a sample" in r.reason]
    assert len(skipped) == len(routed) - 5
    assert {r.reason for r in skipped} == {
        "not-promoted: free text without a judge or eval.text_similarity "
        f"(answered a sample of 5 of {len(routed)})"
    }
    assert all(r.answered_by == "llm" for r in skipped)
    # The headline, the reasons and each task's routed calls are unchanged.
    assert sampled["headline"] == whole["headline"]
    assert sampled["end_to_end"] == whole["end_to_end"]
    by_task = {t["id"]: t["served"] for t in whole["tasks"]}
    for t in sampled["tasks"]:
        assert t["served"]["routed"] == by_task[t["id"]]["routed"]
        assert t["served"]["served"] == by_task[t["id"]]["served"]
    # The same calls on a rerun: the sample is drawn by the recipe's seed.
    _cli("eval", "-w", str(ws), "--task", text)
    again = {r.call_id for r in _rows(ws) if r.picked == text and r.answer is not None}
    assert again == {r.call_id for r in mine if r.answer is not None}


def test_answers_generated_without_their_grammar_are_in_the_report(
    trained: Path, tmp_path: Path
) -> None:
    """A tool schema xgrammar cannot compile: the call is generated unconstrained, and the
    task's report names it with the reason."""
    from slmify.decision import task_decision
    from slmify.endtoend import Replay, task_served
    from slmify.evaluate import _task_report, trained_task
    from slmify.gate import EvalConfig
    from slmify.runtime import TextEncoder
    from slmify.schema import Deferral
    from slmify.specialists import SpecialistPool
    from slmify.store import open_store
    from slmify.workspace import Workspace

    ws = tmp_path / "ws"
    shutil.copytree(trained, ws, ignore=shutil.ignore_patterns("eval", "manifest.yaml"))
    task = next(t for t in Workspace.at(ws).tasks() if t.output_shape == "tool_call")
    with open_store(str(ws / "calls.db")) as st:
        ids = Workspace.at(ws).splits(task.id).test[:2]
        calls = [st.get_call(i).record for i in ids]
    # As if the agent's tool had a pattern xgrammar cannot compile (valid JSON Schema), in
    # training too: the scope check passes only the tools the task was trained with.
    tools = [dict(t) for t in calls[0].request.tools]
    tools[0]["function"] = {
        **tools[0]["function"],
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "pattern": "(?<=AC-)[0-9]+"}},
        },
    }
    calls = [
        c.model_copy(update={"request": c.request.model_copy(update={"tools": tools})})
        for c in calls
    ]
    pruning_file = ws / "specialists" / task.id / "pruning.json"
    pruning = json.loads(pruning_file.read_text())
    if pruning.get("tools") is not None:
        pruning["tools"] = [t["function"] for t in tools]
        pruning_file.write_text(json.dumps(pruning))
    t = trained_task(ws, task)
    assert t.result.kind == "lora"
    pool = SpecialistPool([t.runtime()])
    replay = Replay(None, pool, {task.id: t.cfg}, TextEncoder(), None, {})
    rows = []
    for call in calls:
        decision = task_decision(call.request, task.id, 1.0, "routed: x", pool.tasks, pool.tasks)
        assert decision.task_id == task.id, decision.reason
        rows.append(replay.answer(call, decision, compare_base=False))
    reason = (
        "grammar not compiled: Regex parsing error at position 3: Lookbehind is not supported yet."
    )
    assert [r.answer.unconstrained for r in rows] == [reason, reason]
    deferral = Deferral(
        threshold=None, target=0.9, calibration_calls=0, calibration_served=0, reason="none"
    )
    served = task_served(rows, task.id, EvalConfig())
    _task_report(t, rows, served, deferral, None, ws)
    report = EvalReport.model_validate_json((ws / "eval" / task.id / "report.json").read_text())
    assert report.unconstrained == {reason: ids}
    assert report.sample is None
