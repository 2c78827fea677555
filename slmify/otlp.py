"""OpenTelemetry GenAI spans (OTLP JSON) to `CallRecord`s, for `slmify collect import`.

Reads the spans of an OTLP export (`resourceSpans` / `scopeSpans` / `spans`, as the
collector's file exporter writes them, one export per line) by the GenAI semantic
conventions: `gen_ai.operation.name` picks the inference spans (chat, text_completion,
generate_content); `gen_ai.input.messages`, `gen_ai.system_instructions` and
`gen_ai.output.messages` (role + typed `parts`, as a JSON string or structured) become the
chat-completions request and answer; `gen_ai.tool.definitions` (flat: type, name,
description, parameters) become OpenAI `tools`; `gen_ai.usage.input_tokens` /
`output_tokens`, `gen_ai.request.*` parameters, `gen_ai.response.*`, `gen_ai.conversation.id`
and `gen_ai.agent.name` fill the rest. Writes nothing; the import loop stores the records.
"""

from __future__ import annotations

import json
import re
from typing import Any

from slmify.callparse import Reject, as_reject, parse_timestamp
from slmify.schema import CallRecord, content_hash

# The semantic conventions' inference operations; agent, tool and embedding spans in the
# same export are not LLM calls and are passed over.
OTLP_INFERENCE = {"chat", "text_completion", "generate_content"}
# gen_ai.request.* attributes whose chat-completions parameter has another name.
OTLP_PARAMS = {"stop_sequences": "stop", "choice.count": "n"}
NO_CONTENT = " (instrumentations record message content only when asked, e.g. with "
NO_CONTENT += "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true)"


def calls_from_otlp(obj: dict[str, Any], source: str) -> list[CallRecord | Reject]:
    """Every LLM call span of an OTLP export; a span that cannot be used is rejected alone."""
    results: list[CallRecord | Reject] = []
    for rs in obj.get("resourceSpans") or []:
        resource = _attributes((rs.get("resource") or {}).get("attributes"))
        for ss in rs.get("scopeSpans") or []:
            for span in ss.get("spans") or []:
                try:
                    attrs = _attributes(span.get("attributes"))
                    op = attrs.get("gen_ai.operation.name")
                    if op not in OTLP_INFERENCE and (op or "gen_ai.input.messages" not in attrs):
                        continue
                    results.append(_otlp_call(span, attrs, resource, source))
                except Exception as e:  # noqa: BLE001 - one span's failure is its reject alone
                    span_id = str(span.get("spanId"))[:64] if isinstance(span, dict) else "?"
                    results.append(Reject(f"span {span_id}: {as_reject(e)}"))
    if not results:
        raise Reject("OTLP export holds no GenAI inference span (chat, generate_content...)")
    return results


def _otlp_call(span: dict, attrs: dict, resource: dict, source: str) -> CallRecord:
    if "gen_ai.input.messages" not in attrs:
        raise Reject("no gen_ai.input.messages" + NO_CONTENT)
    messages = _genai_messages(attrs["gen_ai.input.messages"])
    system = _structured(attrs.get("gen_ai.system_instructions"))
    if system:
        parts = system if isinstance(system, list) else [{"type": "text", "content": system}]
        messages.insert(0, {"role": "system", "content": _genai_text(parts)})
    outputs = _structured(attrs.get("gen_ai.output.messages")) or []
    status = span.get("status") or {}
    error = None
    if status.get("code") in (2, "STATUS_CODE_ERROR"):
        error = status.get("message") or attrs.get("error.type") or "error"
    if not outputs and not error:
        raise Reject("no gen_ai.output.messages" + NO_CONTENT)
    tools = _structured(attrs.get("gen_ai.tool.definitions"))
    start, end = span.get("startTimeUnixNano"), span.get("endTimeUnixNano")
    provider = attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system")
    record = {
        "id": str(attrs.get("gen_ai.response.id") or span.get("spanId") or content_hash(span)),
        "source": source,
        "timestamp": parse_timestamp(start),
        "session_id": attrs.get("gen_ai.conversation.id") or span.get("traceId"),
        "agent": attrs.get("gen_ai.agent.name") or resource.get("service.name"),
        "request": {
            "model": attrs.get("gen_ai.request.model"),
            "messages": messages,
            "tools": [_openai_tool(t) for t in tools] if tools else None,
            "params": _otlp_params(attrs),
        },
        "response": _otlp_answer(outputs[0], attrs) if outputs else None,
        "usage": _otlp_usage(attrs),
        "latency_ms": (int(end) - int(start)) / 1e6 if start and end else None,
        "status": "error" if error else "ok",
        "error": error,
        "metadata": {"provider": provider} if provider else {},
    }
    return CallRecord.model_validate(record)


def _otlp_answer(output: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    """The first output message (one per choice) as a `ChatResponse`."""
    finish = output.get("finish_reason") or next(
        iter(attrs.get("gen_ai.response.finish_reasons") or []), None
    )
    return {
        "model": attrs.get("gen_ai.response.model"),
        "message": {**_genai_messages([output])[0], "role": "assistant"},
        "finish_reason": finish,
        "response_id": attrs.get("gen_ai.response.id"),
    }


def _otlp_params(attrs: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for key, value in attrs.items():
        if key.startswith("gen_ai.request.") and key != "gen_ai.request.model":
            name = key.removeprefix("gen_ai.request.")
            params[OTLP_PARAMS.get(name, name)] = value
    return params


def _otlp_usage(attrs: dict[str, Any]) -> dict[str, int | None]:
    given = attrs.get("gen_ai.usage.input_tokens"), attrs.get("gen_ai.usage.output_tokens")
    total = sum(given) if None not in given else None
    return {"prompt_tokens": given[0], "completion_tokens": given[1], "total_tokens": total}


def _otlp_value(v: dict[str, Any]) -> Any:
    """An OTLP JSON AnyValue as Python (int64 travels as a string in OTLP JSON)."""
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return v["boolValue"]
    if "arrayValue" in v:
        return [_otlp_value(x) for x in v["arrayValue"].get("values") or []]
    if "kvlistValue" in v:
        return _attributes(v["kvlistValue"].get("values"))
    return v.get("bytesValue")


def _attributes(items: Any) -> dict[str, Any]:
    return {a["key"]: _otlp_value(a.get("value") or {}) for a in items or []}


def _structured(value: Any) -> Any:
    """A GenAI attribute recorded in structured form, or as a JSON string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise Reject(f"a gen_ai attribute is neither structured nor JSON: {e}") from e


def _genai_text(parts: list[Any]) -> str:
    return "\n".join(p.get("content") or "" for p in parts if isinstance(p, dict))


def _genai_messages(value: Any) -> list[dict[str, Any]]:
    """GenAI messages (`role`, `parts`) as chat-completions messages."""
    items = _structured(value)
    if not isinstance(items, list):
        raise Reject("gen_ai messages are not a list")
    out: list[dict[str, Any]] = []
    for m in items:
        if not isinstance(m, dict) or "role" not in m:
            raise Reject("a gen_ai message is not an object with a `role`")
        if "parts" not in m:  # already in chat-completions shape
            out.append(m)
            continue
        msg: dict[str, Any] = {"role": m["role"]}
        if m.get("name"):
            msg["name"] = m["name"]
        texts, calls, results = [], [], []
        for p in m["parts"] or []:
            kind = p.get("type")
            if kind == "text":
                texts.append(p.get("content") or "")
            elif kind == "tool_call":
                args = p.get("arguments")
                if not isinstance(args, str):  # chat-completions carries arguments as JSON text
                    args = json.dumps({} if args is None else args, ensure_ascii=False)
                call = {"name": p.get("name"), "arguments": args}
                calls.append({"id": p.get("id"), "type": "function", "function": call})
            elif kind == "tool_call_response":
                # Chat-completions has one `tool` message per result.
                r = p.get("response")
                text = r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)
                results.append({"role": "tool", "tool_call_id": p.get("id"), "content": text})
            elif kind != "reasoning":
                # Reasoning has no chat-completions field, and the answer is what is learnt;
                # images, audio and files have no text to learn from either.
                # The type is named only when it looks like one: a reject quotes no content.
                shown = repr(kind) if re.fullmatch(r"[a-z_]{1,32}", str(kind)) else "(unnamed)"
                raise Reject(f"unsupported gen_ai message part {shown}")
        if texts or calls or not results:
            msg["content"] = "\n".join(texts) if texts else None
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        out.extend(results)
    return out


def _openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A GenAI tool definition (flat: type, name, description, parameters) as an OpenAI tool."""
    if "function" in tool or tool.get("type", "function") != "function":
        return tool
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
