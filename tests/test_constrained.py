"""Constrained decoding (slmify.constrained) through the specialist pool eval and serve
share: a tiny random model with a random LoRA, which left alone writes noise, answers real
tau-airline requests with a parseable call of an offered tool whose arguments pass its JSON
schema, and JSON tasks with JSON; a schema xgrammar cannot compile is generated
unconstrained with the reason recorded; `generate.constrained: false` turns it off."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import dataset

from slmify.constrained import GrammarError, Grammars, output_grammar
from slmify.metrics import schema_valid
from slmify.schema import ChatRequest, PromptPruning, message_tool_calls
from slmify.shapes import parse_json
from slmify.specialists import SpecialistPool, TaskRuntime, answer_problem, offered_specs

CAP = 160  # room for a random model's argument strings; a trained one needs ~40
LOOKBEHIND = {"type": "string", "pattern": "(?<=AC-)[0-9]+"}  # valid JSON Schema, no grammar


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA on the tiny base, in a specialist folder of its own (no recipe)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    folder = tmp_path_factory.mktemp("specialist") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


def _task(
    tiny_base: Path, adapter: Path, shape: str = "tool_call", pruning: PromptPruning | None = None
) -> TaskRuntime:
    return TaskRuntime(
        id="t01-task",
        output_shape=shape,
        kind="lora",
        base_path=str(tiny_base),
        adapter=adapter,
        head=None,
        pruning=pruning or PromptPruning(),
        max_new_tokens=CAP,
    )


def bounded(schema: object) -> object:
    """`schema` with every free value bounded (strings to 12 characters, numbers to 0-99,
    arrays to 2 items): a random model never writes the closing quote or digit it was not
    taught, so unbounded it would always end at the token cap, inside the grammar."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) for k, v in schema.items()}
    kind = schema.get("type")
    if kind == "string" and "enum" not in schema:
        out["maxLength"] = 12
    elif kind in ("integer", "number"):
        out |= {"minimum": 0, "maximum": 99}
    elif kind == "array":
        out["maxItems"] = 2
    return out


def _tau_requests(n: int) -> tuple[list[ChatRequest], PromptPruning]:
    """The first `n` tau-airline requests (their 14 tools' schemas `bounded`), and the
    pruning training would give them (the shared policy dropped, the tools compacted):
    1-2k tokens of prompt, not 4-5k."""
    out = []
    with gzip.open(dataset("tau-airline"), "rt") as f:
        for line in f:
            raw = json.loads(line)["request"]
            out.append(ChatRequest(messages=raw["messages"], tools=bounded(raw["tools"])))
            if len(out) == n:
                break
    system = out[0].messages[0]["content"]
    pruning = PromptPruning(system=system, tools_action="compact", tools=offered_specs(out[0]))
    assert all(offered_specs(r) == pruning.tools for r in out)
    return out, pruning


def test_constrained_random_model_calls_an_offered_tool_with_valid_arguments(
    tiny_base: Path, adapter: Path
) -> None:
    requests, pruning = _tau_requests(3)
    pool = SpecialistPool([_task(tiny_base, adapter, pruning=pruning)])
    assert pool.constrained == {"t01-task": True}
    for request in requests:
        answer = pool.answer("t01-task", request)
        offered = {s["name"]: s for s in offered_specs(request)}
        calls = message_tool_calls(answer.message)
        assert calls, answer.text
        assert all(c["name"] in offered and schema_valid(c, offered) for c in calls)
        task = pool.tasks["t01-task"]
        assert answer_problem(task, request, answer.text, answer.message) is None
        assert 0 < answer.confidence <= 1 and answer.finish_reason == "tool_calls"
    assert pool.unconstrained == {}
    # Free, the same model writes no valid call at all: the grammar did the work.
    pool.constrained["t01-task"] = False
    free = [pool.answer("t01-task", r) for r in requests]
    assert not any(message_tool_calls(a.message) for a in free)


def test_forced_tool_is_the_only_one_the_grammar_allows(tiny_base: Path, adapter: Path) -> None:
    [request], pruning = _tau_requests(1)
    names = [s["name"] for s in offered_specs(request)]
    forced = request.model_copy(
        update={"params": {"tool_choice": {"type": "function", "function": {"name": names[-1]}}}}
    )
    pool = SpecialistPool([_task(tiny_base, adapter, pruning=pruning)])
    calls = message_tool_calls(pool.answer("t01-task", forced).message)
    assert calls and {c["name"] for c in calls} == {names[-1]}


def test_json_task_answers_json_valid_against_the_response_format(
    tiny_base: Path, adapter: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {"issue": {"enum": ["damaged", "late"]}, "quantity": {"type": "integer"}},
        "required": ["issue", "quantity"],
        "additionalProperties": False,
    }
    pool = SpecialistPool([_task(tiny_base, adapter, shape="json")])
    # Bounded (see `bounded`): without a response_format the grammar is any JSON object or
    # array, whose strings a random model never closes.
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": bounded(schema)}}
    request = ChatRequest(
        messages=[{"role": "user", "content": "Extract the order."}],
        params={"response_format": fmt},
    )
    answer = pool.answer("t01-task", request)
    assert parse_json(answer.text) is not None, answer.text
    assert set(parse_json(answer.text)) == {"issue", "quantity"}
    assert answer_problem(pool.tasks["t01-task"], request, answer.text, answer.message) is None


def test_schema_that_does_not_compile_falls_back_with_the_reason(
    tiny_base: Path, adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tool = {
        "name": "lookup_order",
        "parameters": {"type": "object", "properties": {"order_id": LOOKBEHIND}},
    }
    request = ChatRequest(
        messages=[{"role": "user", "content": "Where is AC-342703?"}],
        tools=[{"type": "function", "function": tool}],
        params={"max_tokens": 8},
    )
    pool = SpecialistPool([_task(tiny_base, adapter)])
    answer = pool.answer("t01-task", request)  # generated, not raised
    assert answer.output_tokens > 0
    reason = (
        "grammar not compiled: Regex parsing error at position 3: Lookbehind is not supported yet."
    )
    assert pool.unconstrained == {"t01-task": reason}
    assert caplog.messages == [f"task t01-task generates unconstrained: {reason}"]
    pool.answer("t01-task", request)
    assert len(caplog.messages) == 1  # once per task and reason, not per call


def test_recipe_turns_it_off(tiny_base: Path, adapter: Path) -> None:
    (adapter.parent / "recipe.yaml").write_text("generate:\n  constrained: false\n")
    try:
        assert SpecialistPool([_task(tiny_base, adapter)]).constrained == {"t01-task": False}
    finally:
        (adapter.parent / "recipe.yaml").unlink()


def test_grammar_shapes() -> None:
    spec = {"name": "get_user_details", "parameters": {"type": "object"}}
    tag = output_grammar("tool_call", [spec], None, {"type": "text"})
    body = tag["format"]
    assert body["type"] == "tags_with_separator" and body["at_least_one"]
    assert body["tags"][0]["begin"] == '<tool_call>{"name": "get_user_details", "arguments": '
    assert output_grammar("label", [spec], None, {"type": "text"}) is None
    assert output_grammar("text", [], None, {"type": "text"}) is None
    assert output_grammar("tool_call", [], None, {"type": "text"}) is None  # nothing offered
    ended = output_grammar("json", [], None, {"type": "text"}, end="<end>")
    assert ended["format"]["elements"][1] == {"type": "const_string", "value": "<end>"}


def test_compiled_grammar_accepts_the_trained_format_only(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    from slmify.datasets import render_tool_call

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    spec = {
        "name": "lookup_order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    }
    tag = output_grammar("tool_call", [spec], None, {"type": "text"})
    good = render_tool_call("lookup_order", '{"order_id": "AC-1"}')
    for text, accepted in [(good, True), (good + "\n" + good, True), ("Sure! " + good, False)]:
        mask = grammars.matcher(tag)
        assert mask.matcher.accept_string(text) is accepted
    with pytest.raises(GrammarError, match="Lookbehind is not supported"):
        grammars.compile(output_grammar("json", [], None, _format(LOOKBEHIND)))


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
