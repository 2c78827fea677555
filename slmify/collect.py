"""S1 collect: import existing LLM call logs into the store.

Reads files line by line (`.gz` transparently, never the whole file in memory, except a
pretty-printed OTLP document, which has no line structure), detects each file's format
from its first record, converts every record to a `CallRecord` and inserts them in
batches. A line that cannot be used is written to the rejects file with its file, line
number and reason, and the import goes on. Every line read is counted exactly once:
read = imported + duplicates + rejected.

Formats:
- `openai-log`: `{"request": {...}, "response": {...}}`, chat-completions shape, including
  the legacy `functions` / `function_call` API;
- `openai-finetune`: `{"messages": [...]}`, the last assistant turn is the response;
- `otlp`: OpenTelemetry GenAI spans exported as OTLP JSON (`resourceSpans`);
- `flywheel`: NVIDIA data-flywheel log documents (`workload_id`, `client_id`, `timestamp`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmify.schema import CallRecord, ChatRequest, ChatResponse, Usage, content_hash
from slmify.store import Store

BATCH = 1000
REQUEST_KEYS = {"model", "messages", "tools", "functions"}


class Reject(ValueError):
    """A record that cannot be imported; the message is the reason written to rejects."""


# -- reading --------------------------------------------------------------------------


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; raises Reject on a truncated gzip."""
    opener = gzip.open if _is_gzip(path) else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 - used after the loop
                if line.strip():
                    yield lineno, line
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise Reject(f"corrupt or truncated gzip after line {lineno}: {e}") from e
    except UnicodeDecodeError as e:
        raise Reject(f"not UTF-8 text after line {lineno}: {e}") from e


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def detect_format(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise Reject("not a JSON object")
    if "resourceSpans" in obj:
        return "otlp"
    if "request" in obj and ("workload_id" in obj or "client_id" in obj):
        return "flywheel"
    if "request" in obj:
        return "openai-log"
    if "messages" in obj:
        return "openai-finetune"
    raise Reject(
        "unknown format: expected an OpenAI log ({request, response}), fine-tuning "
        "({messages}), OTLP JSON ({resourceSpans}) or data-flywheel record"
    )


# -- converters: one parsed record -> CallRecord(s) -----------------------------------


def _request(req: Any) -> ChatRequest:
    if not isinstance(req, dict):
        raise Reject("`request` is not an object")
    messages = req.get("messages")
    # An empty list is a real (if useless) call and is kept; curation excludes it.
    if not isinstance(messages, list):
        raise Reject("request has no `messages` list")
    if not all(isinstance(m, dict) and "role" in m for m in messages):
        raise Reject("a request message is not an object with a `role`")
    return ChatRequest(
        model=req.get("model"),
        messages=messages,
        tools=req.get("tools"),
        functions=req.get("functions"),
        params={k: v for k, v in req.items() if k not in REQUEST_KEYS},
    )


def _response(resp: Any) -> tuple[ChatResponse | None, Usage, str | None]:
    """(response, usage, error message) from an OpenAI chat.completion object."""
    if not isinstance(resp, dict):
        raise Reject("record has no `response` object")
    usage = Usage(**{k: v for k, v in (resp.get("usage") or {}).items() if k in Usage.model_fields})
    if "error" in resp and not resp.get("choices"):
        err = resp["error"]
        return None, usage, err.get("message") if isinstance(err, dict) else str(err)
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Reject("response has no `choices`")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise Reject("response choice has no `message`")
    return (
        ChatResponse(
            model=resp.get("model"),
            message=message,
            finish_reason=choices[0].get("finish_reason"),
            response_id=resp.get("id"),
        ),
        usage,
        None,
    )


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        # Epoch seconds, or nanoseconds as OTLP writes them.
        return datetime.fromtimestamp(value / 1e9 if value > 1e12 else value, tz=timezone.utc)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as e:
        raise Reject(f"unreadable timestamp {value!r}") from e


def from_openai_log(obj: dict[str, Any], source: str) -> list[CallRecord]:
    meta = dict(obj.get("metadata") or {})
    response, usage, error = _response(obj.get("response"))
    return [
        CallRecord(
            id=str(obj.get("id") or content_hash(obj)),
            source=source,
            timestamp=_timestamp(obj.get("timestamp") or meta.pop("timestamp", None)),
            session_id=meta.pop("session_id", None),
            agent=meta.pop("agent", None),
            request=_request(obj.get("request")),
            response=response,
            usage=usage,
            latency_ms=obj.get("latency_ms"),
            status="error" if error else "ok",
            error=error,
            metadata=meta,
        )
    ]


def from_flywheel(obj: dict[str, Any], source: str) -> list[CallRecord]:
    response, usage, error = _response(obj.get("response"))
    return [
        CallRecord(
            id=str(obj.get("_id") or obj.get("id") or content_hash(obj)),
            source=source,
            timestamp=_timestamp(obj.get("timestamp")),
            # The flywheel has no session; its workload is the agent's task-level unit.
            session_id=obj.get("session_id"),
            agent=obj.get("client_id"),
            request=_request(obj.get("request")),
            response=response,
            usage=usage,
            status="error" if error else "ok",
            error=error,
            metadata={"workload_id": obj.get("workload_id")},
        )
    ]


def from_finetune(obj: dict[str, Any], source: str) -> list[CallRecord]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise Reject("`messages` is not a list of objects")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise Reject("no assistant turn after a prompt: nothing to use as the response")
    request = {"messages": messages[:last], "tools": obj.get("tools"),
               "functions": obj.get("functions")}
    answer = {k: v for k, v in messages[last].items() if k != "weight"}
    finish = "tool_calls" if answer.get("tool_calls") else (
        "function_call" if answer.get("function_call") else "stop")
    return [
        CallRecord(
            id=str(obj.get("id") or content_hash(obj)),
            source=source,
            request=_request(request),
            response=ChatResponse(message=answer, finish_reason=finish),
            metadata=dict(obj.get("metadata") or {}),
        )
    ]


OTLP_SKIP = object()


def _otlp_value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return v["doubleValue"]
    if "boolValue" in v:
        return v["boolValue"]
    if "arrayValue" in v:
        return [_otlp_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: _otlp_value(kv["value"]) for kv in v["kvlistValue"].get("values", [])}
    return None


def _otlp_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _genai_messages(items: Any) -> list[dict[str, Any]]:
    """OTel GenAI messages (`parts`) to OpenAI messages (`content`, `tool_calls`)."""
    out = []
    for m in _otlp_json(items) or []:
        if "parts" not in m:
            out.append(m)
            continue
        msg: dict[str, Any] = {"role": m.get("role", "user")}
        texts, calls = [], []
        for p in m["parts"]:
            if p.get("type") == "text":
                texts.append(p.get("content", ""))
            elif p.get("type") == "tool_call":
                calls.append({"id": p.get("id"), "type": "function", "function": {
                    "name": p.get("name"), "arguments": json.dumps(p.get("arguments") or {})}})
            elif p.get("type") == "tool_call_response":
                msg["role"] = "tool"
                msg["tool_call_id"] = p.get("id")
                r = p.get("response")
                texts.append(r if isinstance(r, str) else json.dumps(r))
        msg["content"] = "\n".join(texts) if texts else None
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def from_otlp(obj: dict[str, Any], source: str) -> list[CallRecord]:
    """Every chat span (`gen_ai.operation.name` = chat) in an OTLP export."""
    records = []
    for rs in obj.get("resourceSpans") or []:
        resource = {a["key"]: _otlp_value(a["value"]) for a in
                    (rs.get("resource") or {}).get("attributes", [])}
        for ss in rs.get("scopeSpans") or []:
            for span in ss.get("spans") or []:
                attrs = {a["key"]: _otlp_value(a["value"]) for a in span.get("attributes", [])}
                if attrs.get("gen_ai.operation.name", "chat") != "chat" or not any(
                    k.startswith("gen_ai.") for k in attrs
                ):
                    continue
                records.append(_otlp_span(span, attrs, resource, source))
    if not records:
        raise Reject("OTLP export holds no gen_ai chat span")
    return records


def _otlp_span(span: dict, attrs: dict, resource: dict, source: str) -> CallRecord:
    messages = _genai_messages(attrs.get("gen_ai.input.messages"))
    system = attrs.get("gen_ai.system_instructions")
    if system:
        parts = _otlp_json(system)
        text = "\n".join(p.get("content", "") for p in parts) if isinstance(parts, list) else parts
        messages.insert(0, {"role": "system", "content": text})
    outputs = _genai_messages(attrs.get("gen_ai.output.messages"))
    raw_out = _otlp_json(attrs.get("gen_ai.output.messages")) or [{}]
    tools = _otlp_json(attrs.get("gen_ai.tool.definitions"))
    error = (span.get("status") or {}).get("message") if (span.get("status") or {}).get(
        "code") in (2, "STATUS_CODE_ERROR") else None
    if not outputs and not error:
        raise Reject(f"span {span.get('spanId')} has no gen_ai.output.messages")
    start, end = span.get("startTimeUnixNano"), span.get("endTimeUnixNano")
    params = {k.removeprefix("gen_ai.request."): v for k, v in attrs.items()
              if k.startswith("gen_ai.request.") and k != "gen_ai.request.model"}
    return CallRecord(
        id=str(attrs.get("gen_ai.response.id") or span.get("spanId") or content_hash(span)),
        source=source,
        timestamp=_timestamp(int(start)) if start else None,
        session_id=attrs.get("gen_ai.conversation.id") or span.get("traceId"),
        agent=attrs.get("gen_ai.agent.name") or resource.get("service.name"),
        request=ChatRequest(
            model=attrs.get("gen_ai.request.model"),
            messages=messages or [{"role": "user", "content": ""}],
            tools=[t if "function" in t else {"type": "function", "function": t}
                   for t in tools] if tools else None,
            params=params,
        ),
        response=ChatResponse(
            model=attrs.get("gen_ai.response.model"),
            message={**outputs[0], "role": "assistant"},
            finish_reason=raw_out[0].get("finish_reason") or (
                (attrs.get("gen_ai.response.finish_reasons") or [None])[0]),
            response_id=attrs.get("gen_ai.response.id"),
        ) if outputs else None,
        usage=Usage(prompt_tokens=attrs.get("gen_ai.usage.input_tokens"),
                    completion_tokens=attrs.get("gen_ai.usage.output_tokens")),
        latency_ms=(int(end) - int(start)) / 1e6 if start and end else None,
        status="error" if error else "ok",
        error=error,
    )


CONVERTERS: dict[str, Callable[[dict[str, Any], str], list[CallRecord]]] = {
    "openai-log": from_openai_log,
    "openai-finetune": from_finetune,
    "otlp": from_otlp,
    "flywheel": from_flywheel,
}


# -- the import loop ------------------------------------------------------------------


def import_files(
    store: Store, paths: list[Path], rejects_path: Path, progress: bool = False
) -> dict[str, Any]:
    """Import every record of `paths` into `store`; returns the summary counts."""
    totals = {"read": 0, "imported": 0, "duplicates": 0, "rejected": 0}
    formats: dict[str, str] = {}
    bar = _progress(paths) if progress else None
    with rejects_path.open("a", encoding="utf-8") as rejects:

        def reject(path: Path, lineno: int | None, reason: str) -> None:
            totals["rejected"] += 1
            rejects.write(json.dumps({"file": str(path), "line": lineno, "reason": reason}) + "\n")

        for path in paths:
            batch: list[CallRecord] = []

            def flush() -> None:
                imported, dups = store.add_calls(batch)
                totals["imported"] += imported
                totals["duplicates"] += len(dups)
                batch.clear()

            for lineno, obj, error in _records(path):
                totals["read"] += 1
                if bar is not None:
                    bar.advance(bar.task_ids[0])
                if error:
                    reject(path, lineno, error)
                    continue
                try:
                    fmt = detect_format(obj)
                    expected = formats.setdefault(str(path), fmt)
                    if fmt != expected:
                        raise Reject(f"a {fmt} record in a file of {expected} records")
                    batch.extend(CONVERTERS[fmt](obj, f"{path}:{lineno}"))
                except Reject as e:
                    reject(path, lineno, str(e))
                except (ValueError, TypeError, KeyError, AttributeError) as e:
                    reject(path, lineno, f"invalid record: {_short(e)}")
                if len(batch) >= BATCH:
                    flush()
            flush()
    if bar is not None:
        bar.stop()
    return {**totals, "formats": formats, "rejects": str(rejects_path), "store": store.location}


def _records(path: Path) -> Iterator[tuple[int | None, Any, str | None]]:
    """(line number, parsed object, error) for each record of a file."""
    lines = read_lines(path)
    try:
        for lineno, text in lines:
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as e:
                if lineno == 1 and text.lstrip().startswith(("{", "[")):
                    # One pretty-printed JSON document (an OTLP export, say).
                    yield from _whole_document(path)
                    return
                yield lineno, None, f"malformed JSON: {e}"
    except Reject as e:
        yield None, None, str(e)


def _whole_document(path: Path) -> Iterator[tuple[int | None, Any, str | None]]:
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"malformed JSON: {e}"
            return
    for i, obj in enumerate(doc if isinstance(doc, list) else [doc], 1):
        yield (i if isinstance(doc, list) else 1), obj, None


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _progress(paths: list[Path]):  # noqa: ANN202
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task(f"importing {len(paths)} file(s)", total=None)
    bar.start()
    return bar
