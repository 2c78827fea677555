"""S1 importers: every format, the real logs kept intact, bad input, and the CLI.

Hand-written fixture files in tmp_path cover the formats the shared sets lack
(fine-tuning JSONL, OTLP GenAI spans, data-flywheel documents) and each bad input;
the three real sets are compared field by field against their raw files.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import dataset
from typer.testing import CliRunner

from slmify import collect
from slmify.callparse import REQUEST_KEYS
from slmify.cli import app
from slmify.collect import import_files
from slmify.schema import CallRecord
from slmify.store import open_store

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def run_import(tmp_path: Path, *files: Path) -> tuple[dict, list[CallRecord], list[dict]]:
    """Import into a fresh store: (summary, stored records in order, rejects)."""
    rejects = tmp_path / "rejects.jsonl"
    with open_store(str(tmp_path / "calls.db")) as store:
        summary = import_files(store, list(files), rejects)
        records = [c.record for c in store.iter_calls()]
    assert summary["read"] == (
        summary["imported"] + summary["duplicates"] + summary["conflicts"] + summary["rejected"]
    )
    lines = rejects.read_text().splitlines() if rejects.exists() else []
    return summary, records, [json.loads(line) for line in lines]


def openai_log(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"call-{i}",
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"q{i}"}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": f"a{i}"}}]},
        **extra,
    }


# -- the real logs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "calls"), [("tau-airline", 2454), ("fireact", 4323), ("toolbench-legacy", 52)]
)
def test_real_sets_import_intact_and_once(tmp_path: Path, name: str, calls: int) -> None:
    path = dataset(name)
    summary, records, rejects = run_import(tmp_path, path)
    assert (summary["read"], summary["imported"], summary["rejected"]) == (calls, calls, 0)
    assert summary["formats"] == {str(path): "openai-log"}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(records) == len(raw) == calls
    for lineno, (rec, src) in enumerate(zip(records, raw, strict=True), 1):
        assert rec.id == src["id"]
        assert rec.source == f"{path}:{lineno}"
        assert rec.request.model == src["request"]["model"]
        assert rec.request.messages == src["request"]["messages"]
        assert rec.request.tools == src["request"].get("tools")
        assert rec.request.functions == src["request"].get("functions")
        assert rec.request.params == {
            k: v for k, v in src["request"].items() if k not in REQUEST_KEYS
        }
        choice = src["response"]["choices"][0]
        assert rec.response.message == choice["message"]
        assert rec.response.finish_reason == choice.get("finish_reason")
        assert rec.response.response_id == src["response"]["id"]
        assert (rec.session_id, rec.agent) == (
            src["metadata"]["session_id"],
            src["metadata"]["agent"],
        )
    # A second import of the same file adds nothing.
    with open_store(str(tmp_path / "calls.db")) as store:
        again = import_files(store, [path], tmp_path / "rejects.jsonl")
        assert store.count_calls() == calls
    assert (again["read"], again["imported"], again["duplicates"]) == (calls, 0, calls)


def test_legacy_functions_api_kept_as_sent(tmp_path: Path) -> None:
    _, records, _ = run_import(tmp_path, dataset("toolbench-legacy"))
    rec = records[0]
    assert rec.request.tools is None and rec.request.functions
    assert rec.response.message["function_call"]["name"]
    assert rec.tool_calls() == [
        {
            "name": rec.response.message["function_call"]["name"],
            "arguments": rec.response.message["function_call"]["arguments"],
        }
    ]


# -- the other formats -----------------------------------------------------------------


def test_openai_finetune_jsonl(tmp_path: Path) -> None:
    tool_call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [tool_call]},
            ],
            "tools": [WEATHER_TOOL],
            "parallel_tool_calls": False,
        },
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "weight": 0},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "goodbye", "weight": 1},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "function_call": {"name": "w", "arguments": "{}"}},
            ],
            "functions": [WEATHER_TOOL["function"]],
        },
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    summary, records, rejects = run_import(tmp_path, write_jsonl(tmp_path / "ft.jsonl", rows))
    assert summary["formats"] == {str(tmp_path / "ft.jsonl"): "openai-finetune"}
    assert (summary["read"], summary["imported"], summary["rejected"]) == (4, 3, 1)
    tools, chat, legacy = records
    assert tools.request.messages == rows[0]["messages"][:2]
    assert tools.request.tools == [WEATHER_TOOL]
    assert tools.request.params == {"parallel_tool_calls": False}
    assert tools.response.message == rows[0]["messages"][2]
    assert tools.response.finish_reason == "tool_calls"
    assert chat.request.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert chat.response.message == {"role": "assistant", "content": "goodbye"}
    assert legacy.request.functions == [WEATHER_TOOL["function"]]
    assert legacy.response.finish_reason == "function_call"
    assert rejects == [
        {
            "file": str(tmp_path / "ft.jsonl"),
            "line": 4,
            "reason": "no assistant turn after a prompt: nothing to use as the response",
        }
    ]


def attr(key: str, value: Any) -> dict[str, Any]:
    """One OTLP JSON attribute; dicts and lists go in structured form."""
    return {"key": key, "value": otlp_value(value)}


def otlp_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # int64 is a string in OTLP JSON
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [otlp_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [attr(k, v) for k, v in value.items()]}}
    return {"stringValue": value}


def span(span_id: str, attrs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": span_id,
        "name": f"{attrs.get('gen_ai.operation.name')} gpt-4o",
        "startTimeUnixNano": "1732000000000000000",
        "endTimeUnixNano": "1732000001500000000",
        "attributes": [attr(k, v) for k, v in attrs.items()],
        **extra,
    }


def otlp_export() -> dict[str, Any]:
    """A collector export: a tool-calling chat span (JSON-string attributes), its tool span,
    the follow-up chat span (structured attributes), and one without captured content."""
    tool_call = {"type": "tool_call", "id": "call_1", "name": "get_weather"}
    first = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.stop_sequences": ["END"],
        "gen_ai.conversation.id": "conv-7",
        "gen_ai.system_instructions": json.dumps([{"type": "text", "content": "Be brief."}]),
        "gen_ai.input.messages": json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]}]
        ),
        "gen_ai.output.messages": json.dumps(
            [
                {
                    "role": "assistant",
                    "parts": [{**tool_call, "arguments": {"city": "Paris"}}],
                    "finish_reason": "tool_call",
                }
            ]
        ),
        "gen_ai.tool.definitions": json.dumps([{"type": "function", **WEATHER_TOOL["function"]}]),
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 50,
        "gen_ai.usage.output_tokens": 12,
    }
    second = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.input.messages": [
            {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
            {"role": "assistant", "parts": [{**tool_call, "arguments": '{"city": "Paris"}'}]},
            {
                "role": "tool",
                "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy"}],
            },
        ],
        "gen_ai.output.messages": [
            {
                "role": "assistant",
                "parts": [
                    {"type": "reasoning", "content": "The tool said rainy."},
                    {"type": "text", "content": "Rainy, 57°F."},
                ],
                "finish_reason": "stop",
            }
        ],
    }
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_weather"}
    no_content = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    spans = [span("a1", first), span("a2", tool), span("a3", second), span("a4", no_content)]
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [attr("service.name", "weather-agent")]},
                "scopeSpans": [{"scope": {"name": "openai-v2"}, "spans": spans}],
            }
        ]
    }


def check_otlp(summary: dict, records: list[CallRecord], rejects: list[dict]) -> None:
    # Three chat spans; the tool span is not an LLM call and is not counted.
    assert (summary["read"], summary["imported"], summary["rejected"]) == (3, 2, 1)
    first, second = records
    assert first.id == "chatcmpl-1" and second.id == "a3"
    assert first.request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    assert first.request.tools == [WEATHER_TOOL]
    assert first.request.params == {"temperature": 0.2, "stop": ["END"]}
    assert first.response.message["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert first.response.finish_reason == "tool_call"
    assert first.response.model == "gpt-4o-2024-08-06"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (50, 12)
    assert first.session_id == "conv-7" and first.agent == "weather-agent"
    assert first.metadata == {"provider": "openai"}
    assert first.latency_ms == 1500.0
    assert first.timestamp.isoformat() == "2024-11-19T07:06:40+00:00"
    assert second.request.messages[1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy"},
    ]
    assert second.response.message == {"role": "assistant", "content": "Rainy, 57°F."}
    assert second.session_id == "5b8efff798038103d269b633813fc60c"  # the trace
    assert len(rejects) == 1 and rejects[0]["reason"].startswith(
        "span a4: no gen_ai.input.messages (instrumentations record message content only"
    )


def test_otlp_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "spans.jsonl", [otlp_export()])
    summary, records, rejects = run_import(tmp_path, path)
    assert summary["formats"] == {str(path): "otlp"}
    check_otlp(summary, records, rejects)
    assert rejects[0]["line"] == 1


def test_otlp_pretty_printed_document(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(otlp_export(), indent=2, ensure_ascii=False))
    check_otlp(*run_import(tmp_path, path))


def test_otlp_failed_call_is_kept_as_an_error(tmp_path: Path) -> None:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}],
        "error.type": "RateLimitError",
    }
    failed = span("e1", attrs, status={"code": 2, "message": "429 Too Many Requests"})
    export = {"resourceSpans": [{"scopeSpans": [{"spans": [failed]}]}]}
    summary, (rec,), _ = run_import(tmp_path, write_jsonl(tmp_path / "e.jsonl", [export]))
    assert (rec.status, rec.error, rec.response) == ("error", "429 Too Many Requests", None)
    assert rec.request.messages == [{"role": "user", "content": "hi"}]


def flywheel_doc(content: str, **extra: Any) -> dict[str, Any]:
    """A log document as the data-flywheel blueprint's apps write it to Elasticsearch."""
    return {
        "timestamp": 1715854074,
        "workload_id": "tool_router",
        "client_id": "aiva-1",
        "request": {
            "model": "meta/llama-3.1-70b-instruct",
            "messages": [{"role": "user", "content": content}],
            "tools": [WEATHER_TOOL],
            "temperature": 0.7,
            "max_tokens": 1000,
        },
        "response": {
            "id": "chatcmpl-1715854074",  # the blueprint's loader: not unique
            "object": "chat.completion",
            "created": 1715854074,
            "model": "meta/llama-3.1-70b-instruct",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"re: {content}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        },
        **extra,
    }


def test_flywheel_documents_bare_and_as_elasticsearch_hits(tmp_path: Path) -> None:
    hit = {"_index": "flywheel", "_id": "es-42", "_source": flywheel_doc("third")}
    rows = [flywheel_doc("first"), flywheel_doc("second"), hit, flywheel_doc("first")]
    path = write_jsonl(tmp_path / "flywheel.jsonl", rows)
    summary, records, _ = run_import(tmp_path, path)
    assert summary["formats"] == {str(path): "flywheel"}
    # Same response id, different calls: both kept; the repeated document is a duplicate.
    assert (summary["read"], summary["imported"], summary["duplicates"]) == (4, 3, 1)
    first, second, third = records
    assert first.id != second.id and third.id == "es-42"
    assert first.agent == "aiva-1" and first.metadata == {
        "workload_id": "tool_router",
        "client_id": "aiva-1",
    }
    assert first.timestamp.isoformat() == "2024-05-16T10:07:54+00:00"
    assert first.request.tools == [WEATHER_TOOL]
    assert first.request.params == {"temperature": 0.7, "max_tokens": 1000}
    assert first.response.message == {"role": "assistant", "content": "re: first"}
    assert (first.usage.prompt_tokens, first.usage.total_tokens) == (9, 12)


# -- bad input -------------------------------------------------------------------------


def test_bad_lines_are_rejected_and_the_import_goes_on(tmp_path: Path) -> None:
    no_response = openai_log(4)
    del no_response["response"]
    rows = [
        openai_log(1),
        '{"id": "call-2", "request": {"messages": [\n',
        {"foo": 1},
        no_response,
        "\n",
        b"\xff\xfe not utf-8\n".decode("latin-1"),
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        openai_log(8, response={"choices": []}),
        openai_log(9, request={"messages": "not a list"}),
        openai_log(10, metadata={"session_id": 7}),
        openai_log(11),
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    summary, records, rejects = run_import(tmp_path, path)
    assert (summary["read"], summary["imported"], summary["rejected"]) == (10, 2, 8)
    assert [r.id for r in records] == ["call-1", "call-11"]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert all(r["file"] == str(path) for r in rejects)
    assert set(reasons) == {2, 3, 4, 6, 7, 8, 9, 10}  # line 5 is blank
    assert reasons[2].startswith("malformed JSON: ")
    assert reasons[3].startswith("unknown format: expected an OpenAI log")
    assert reasons[4] == "record has no `response` object"
    assert reasons[6].startswith("malformed JSON: ")
    assert reasons[7] == "a openai-finetune record in a file of openai-log records"
    assert reasons[8] == "response has no `choices`"
    assert reasons[9] == "request has no `messages` list"
    assert reasons[10] == (
        "invalid record: 1 validation error for CallRecord: session_id: Input should be a valid"
        " string"
    )


def test_truncated_gzip_keeps_the_lines_before_the_break(tmp_path: Path) -> None:
    rows = [json.dumps(openai_log(i, pad=os.urandom(500).hex())) + "\n" for i in range(200)]
    blob = gzip.compress("".join(rows).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    summary, records, rejects = run_import(tmp_path, path)
    assert 0 < summary["imported"] < 200 and summary["rejected"] == 1
    assert [r.id for r in records] == [f"call-{i}" for i in range(len(records))]
    (reject,) = rejects
    assert reject["reason"].startswith(f"corrupt or truncated gzip after line {len(records)}")
    assert reject["line"] == len(records) + 1


def test_gz_is_detected_by_content_and_reimport_adds_nothing(tmp_path: Path) -> None:
    rows = [openai_log(i) for i in range(3)]
    plain = write_jsonl(tmp_path / "calls.jsonl", rows)
    packed = tmp_path / "calls.log"  # gzip without the .gz suffix
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    summary, records, _ = run_import(tmp_path, packed, plain)
    assert (summary["read"], summary["imported"], summary["duplicates"]) == (6, 3, 3)


def test_json_array_document_and_byte_order_mark(tmp_path: Path) -> None:
    doc = tmp_path / "calls.json"
    doc.write_text(json.dumps([openai_log(1), openai_log(2), {"foo": 1}], indent=2))
    crlf = tmp_path / "windows.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + json.dumps(openai_log(3)).encode() + b"\r\n")
    summary, records, rejects = run_import(tmp_path, doc, crlf)
    assert (summary["read"], summary["imported"], summary["rejected"]) == (4, 3, 1)
    assert [r.id for r in records] == ["call-1", "call-2", "call-3"]
    assert rejects[0]["file"] == str(doc) and rejects[0]["reason"].startswith("unknown format")


def test_a_failing_batch_leaves_the_store_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch is one transaction: an exception inside one leaves no part of it."""
    path = write_jsonl(tmp_path / "calls.jsonl", [openai_log(i) for i in range(25)])
    monkeypatch.setattr(collect, "BATCH", 10)
    real_row = collect.call_row

    def row_then_crash(record: CallRecord) -> tuple:
        if record.id == "call-15":
            raise KeyboardInterrupt  # mid-batch: the second batch holds call-10..call-14
        return real_row(record)

    monkeypatch.setattr(collect, "call_row", row_then_crash)
    with open_store(str(tmp_path / "calls.db")) as store:
        with pytest.raises(KeyboardInterrupt):
            import_files(store, [path], tmp_path / "rejects.jsonl")
        assert store.count_calls() == 10  # the first batch, committed, and nothing else
    monkeypatch.setattr(collect, "call_row", real_row)
    summary, records, _ = run_import(tmp_path, path)  # re-running completes it
    assert (summary["imported"], summary["duplicates"], len(records)) == (15, 10, 25)


# -- hostile input: every record imported or rejected, never fatal -------------------------


def nested_line(i: int, depth: int) -> str:
    """An OpenAI log line whose metadata holds a list nested `depth` levels (JSON counts
    the record's own object as one more)."""
    base = json.dumps(openai_log(i, metadata={"blob": "X"}))
    return base.replace('"X"', "[" * depth + '"deep"' + "]" * depth) + "\n"


def test_deep_nesting_is_rejected_alone(tmp_path: Path) -> None:
    """Lines nested 256-1,023 levels parse (orjson stops at 1,024) but cannot be hashed or
    stored; 1,100 levels do not parse. Each is rejected, and the good lines around them land."""
    depths = [100, 256, 300, 1023, 1100]
    rows: list[Any] = []
    for i, depth in enumerate(depths):
        rows.append(openai_log(2 * i))
        rows.append(nested_line(2 * i + 1, depth))
    rows.append(openai_log(99))
    path = write_jsonl(tmp_path / "deep.jsonl", rows)
    summary, records, rejects = run_import(tmp_path, path)
    good = [f"call-{2 * i}" for i in range(len(depths))] + ["call-1", "call-99"]
    assert sorted(r.id for r in records) == sorted(good)  # depth 100 is fine
    assert (summary["read"], summary["imported"], summary["rejected"]) == (11, 7, 4)
    assert [r["line"] for r in rejects] == [4, 6, 8, 10]
    assert rejects[0]["reason"] == "invalid record: nested too deeply to serialize"
    assert rejects[3]["reason"].startswith("malformed JSON: depth limit exceeded")


@pytest.mark.parametrize(
    "stamp", [-1e300, -99999999999999999999999, 1e300, "99999999999999999999999"]
)
def test_hostile_timestamps_are_rejected_alone(tmp_path: Path, stamp: Any) -> None:
    rows = [openai_log(1), openai_log(2, timestamp=stamp), openai_log(3)]
    summary, records, rejects = run_import(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows))
    assert [r.id for r in records] == ["call-1", "call-3"]
    assert rejects == [
        {"file": str(tmp_path / "t.jsonl"), "line": 2, "reason": "timestamp out of range"}
    ]


def test_pre_1970_and_fine_unit_epochs_still_read(tmp_path: Path) -> None:
    rows = [openai_log(1, timestamp=-86400), openai_log(2, timestamp=1715854074123456789)]
    _, records, _ = run_import(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows))
    assert records[0].timestamp.isoformat() == "1969-12-31T00:00:00+00:00"
    assert records[1].timestamp.year == 2024


def test_deeply_nested_pretty_printed_document_is_one_reject(tmp_path: Path) -> None:
    doc = tmp_path / "deep.json"
    doc.write_text('{\n"a": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "\n}\n")
    good = write_jsonl(tmp_path / "good.jsonl", [openai_log(1)])
    summary, records, rejects = run_import(tmp_path, doc, good)
    assert (summary["read"], summary["imported"], summary["rejected"]) == (2, 1, 1)
    assert rejects[0]["reason"] == "malformed JSON document: nested too deeply"


def test_deeply_nested_otlp_attribute_rejects_its_span_only() -> None:
    export = otlp_export()
    value: dict[str, Any] = {"stringValue": "x"}
    for _ in range(1200):  # 2 Python frames a level: past the interpreter's 1,000
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    spans = export["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["attributes"].append({"key": "app.blob", "value": value})
    from slmify.otlp import calls_from_otlp

    # As the stdlib parser hands a pretty-printed export over (orjson stops at 1,024 levels).
    results = calls_from_otlp(export, "trace.json")
    reasons = [str(r) for r in results if isinstance(r, collect.Reject)]
    assert [r.id for r in results if isinstance(r, CallRecord)] == ["a3"]
    assert reasons[0] == "span a1: invalid record: nested too deeply"


def test_rejects_quote_no_values_and_do_not_grow_on_reimport(tmp_path: Path) -> None:
    secret = "mia.li@example.com"
    rows = [
        openai_log(1, metadata={"session_id": {"email": secret}}),
        openai_log(2, latency_ms=secret),
        openai_log(3, timestamp=f"born {secret}"),
        openai_log(4, request={"messages": [{"role": "user", "content": secret}], "model": 5}),
        openai_log(5),
    ]
    path = write_jsonl(tmp_path / "calls.jsonl", rows)
    summary, _, rejects = run_import(tmp_path, path)
    assert (summary["imported"], summary["rejected"]) == (1, 4)
    text = (tmp_path / "rejects.jsonl").read_text()
    assert secret not in text and "mia" not in text and "input_value" not in text
    again, _, rejects_again = run_import(tmp_path, path)
    assert (again["duplicates"], again["rejected"]) == (1, 4)
    assert rejects_again == rejects  # the same four lines, not eight


def test_same_id_with_other_content_is_a_conflict(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [openai_log(1), openai_log(2)])
    changed = openai_log(2)
    changed["response"]["choices"][0]["message"]["content"] = "another answer"
    second = write_jsonl(tmp_path / "b.jsonl", [openai_log(1), changed, changed])
    summary, records, rejects = run_import(tmp_path, first, second)
    assert summary["read"] == (
        summary["imported"] + summary["duplicates"] + summary["conflicts"] + summary["rejected"]
    )
    assert (summary["imported"], summary["duplicates"], summary["conflicts"]) == (2, 1, 2)
    assert records[1].output_text() == "a2"  # the first one stays
    assert [(r["file"], r["line"], r.get("kind")) for r in rejects] == [
        (str(second), 2, "conflict"),
        (str(second), 3, "conflict"),
    ]


def test_rejects_keep_line_order_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are written by a second thread while the next is read; rejects still come
    as a one-thread import wrote them: a batch's unreadable lines, then its conflicts."""
    monkeypatch.setattr(collect, "BATCH", 2)
    first = write_jsonl(tmp_path / "a.jsonl", [openai_log(i) for i in range(6)])
    changed = [
        openai_log(i, request={"messages": [{"role": "user", "content": "x"}]}) for i in range(6)
    ]
    rows = [changed[0], "{bad\n", changed[1], openai_log(2), "[]\n", changed[3], changed[4]]
    rows += ["{bad\n", openai_log(10), changed[5], "{bad\n"]
    second = write_jsonl(tmp_path / "b.jsonl", rows)
    summary, records, rejects = run_import(tmp_path, first, second)
    assert (summary["imported"], summary["duplicates"], summary["conflicts"]) == (7, 1, 5)
    assert summary["rejected"] == 4
    assert [r["line"] for r in rejects] == [2, 1, 3, 5, 6, 8, 7, 11, 10]
    assert [r.id for r in records] == [f"call-{i}" for i in [0, 1, 2, 3, 4, 5, 10]]


def gz_lines(n: int) -> bytes:
    return "".join(json.dumps(openai_log(i)) + "\n" for i in range(n)).encode()


def test_gzip_members_and_zero_padding_are_read_like_gzip(tmp_path: Path) -> None:
    """`cat a.gz b.gz` and zero padding between members, as gzip itself reads them."""
    text = gz_lines(40)
    cut = text.index(b"\n", len(text) // 2) + 1
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(
        gzip.compress(text[:cut]) + b"\0" * 5000 + gzip.compress(text[cut:]) + b"\0" * 7
    )
    summary, records, rejects = run_import(tmp_path, path)
    assert (summary["imported"], rejects) == (40, [])
    assert [r.id for r in records] == [f"call-{i}" for i in range(40)]


def test_gzip_bad_checksum_keeps_every_line_before_it(tmp_path: Path) -> None:
    blob = bytearray(gzip.compress(gz_lines(40)))
    blob[-6] ^= 0xFF  # the CRC-32 in the trailer: found after all the data
    path = tmp_path / "calls.jsonl.gz"
    path.write_bytes(bytes(blob))
    summary, records, rejects = run_import(tmp_path, path)
    assert (summary["imported"], summary["rejected"]) == (40, 1)
    assert rejects[0]["line"] == 41
    assert rejects[0]["reason"].startswith("corrupt or truncated gzip after line 40")


def test_conflict_found_against_a_curated_call(tmp_path: Path) -> None:
    from slmify.curate import curate_store

    rows = [openai_log(1, request={"messages": [{"role": "user", "content": "mail a@b.io"}]})]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    changed = json.loads(json.dumps(rows[0]))
    changed["response"]["choices"][0]["message"]["content"] = "other"
    other = write_jsonl(tmp_path / "b.jsonl", [changed])
    with open_store(str(tmp_path / "calls.db")) as store:
        import_files(store, [path], tmp_path / "rejects.jsonl")
        curate_store(store, tmp_path / "report.json")
        again = import_files(store, [path, other], tmp_path / "rejects.jsonl")
    assert (again["duplicates"], again["conflicts"]) == (1, 1)


# -- the command line ------------------------------------------------------------------

runner = CliRunner()


def test_cli_json_summary_and_strict_exit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "calls.jsonl", [openai_log(1), "{oops\n", openai_log(2)])
    ws = str(tmp_path / "ws")
    result = runner.invoke(app, ["collect", "import", str(path), "-w", ws, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("read", "imported", "duplicates", "rejected")} == {
        "read": 3,
        "imported": 2,
        "duplicates": 0,
        "rejected": 1,
    }
    assert summary["rejects"] == str(tmp_path / "ws" / "rejects.jsonl")
    result = runner.invoke(app, ["collect", "import", str(path), "-w", ws, "--json", "--strict"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["duplicates"] == 2
    assert f"error: 1 line(s) rejected, see {tmp_path / 'ws' / 'rejects.jsonl'}" in result.stderr


def test_cli_strict_passes_on_clean_input(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "calls.jsonl", [openai_log(1)])
    result = runner.invoke(app, ["collect", "import", str(path), "--strict", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["imported"] == 1


def test_cli_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = runner.invoke(app, ["collect", "import", str(missing), "--json"])
    assert result.exit_code == 1
    assert f"error: no such file: {missing}" in result.stderr
