"""The two checks that send a request to the LLM instead of a specialist, shared by serve
and eval (which answer through the same pool):

- `out_of_scope`, before generating: the request asks for what training never showed
  (other tools than the task's, n>1, logprobs, a response_format on a task that does not
  answer JSON, no tools for a tool-calling task);
- `answer_problem`, after: the answer is not valid (a tool call that is not JSON, a tool
  that was not offered, arguments failing the tool's JSON schema, a tool_choice ignored, no
  JSON where JSON is expected or JSON failing the response_format schema, an empty answer).

Reads and writes nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from slmify.datasets import TOOL_CALL_RE
from slmify.metrics import parse_json, schema_valid
from slmify.schema import ChatRequest, message_text, message_tool_calls

if TYPE_CHECKING:
    from slmify.specialists import TaskRuntime


def offered_specs(request: ChatRequest) -> list[dict[str, Any]]:
    """The function specs a request offers, `tools` or legacy `functions`."""
    specs = [t["function"] for t in request.tools or [] if isinstance(t, dict) and "function" in t]
    return specs + list(request.functions or [])


def response_format(request: ChatRequest) -> dict[str, Any]:
    """The request's `response_format`, `{"type": "text"}` when it gives none."""
    fmt = request.params.get("response_format")
    return fmt if isinstance(fmt, dict) else {"type": "text"}


def out_of_scope(task: TaskRuntime, request: ChatRequest) -> str | None:
    """Why `task`'s specialist was not trained for this request; None when it was."""
    p = request.params
    if isinstance(p.get("n"), int) and p["n"] > 1:
        return f"n={p['n']}: a specialist gives one answer"
    if p.get("logprobs") or p.get("top_logprobs"):
        return "logprobs requested"
    fmt = response_format(request)["type"]
    if fmt != "text" and task.output_shape != "json":
        return f"response_format {fmt} asked of a task answered as {task.output_shape}"
    specs = offered_specs(request)
    # Other schemas than training's also mean another prompt: pruning applies to those only.
    if task.pruning.tools is not None and specs != task.pruning.tools:
        return "the request offers other tools than the task was trained with"
    if task.output_shape == "tool_call" and not specs:
        return "no tools offered to a tool-calling task"
    forbidden = "none" in (p.get("tool_choice"), p.get("function_call"))
    if task.output_shape == "tool_call" and forbidden:
        return "tool calls forbidden (tool_choice none) on a tool-calling task"
    return None


def forced_tool(request: ChatRequest) -> str | None:
    """`required`, or the function name the request forces, if it forces one."""
    for choice in (request.params.get("tool_choice"), request.params.get("function_call")):
        if choice == "required":
            return choice
        if isinstance(choice, dict):
            return (choice.get("function") or choice).get("name")
    return None


def _tool_call_problem(text: str, calls: list[dict[str, Any]], request: ChatRequest) -> str | None:
    offered = {s.get("name"): s for s in offered_specs(request)}
    # parse_output leaves a bad block in the content; each block is read again to say why.
    for raw in TOOL_CALL_RE.findall(text):
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            return f"a tool call is not JSON: {raw[:60]!r}"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return "a tool call has no name"
        if call["name"] not in offered:
            return f"tool {call['name']!r} was not offered"
    for call in calls:
        if not schema_valid(call, offered):
            return f"the arguments of {call['name']} fail its JSON schema"
    forced = forced_tool(request)
    if forced and not calls:
        return "tool_choice forces a tool call and none was made"
    if forced not in (None, "required") and any(c["name"] != forced for c in calls):
        return f"tool_choice forces {forced} and another tool was called"
    return None


def answer_problem(
    task: TaskRuntime, request: ChatRequest, text: str, message: dict[str, Any]
) -> str | None:
    """Why an answer must not reach the client; None when it is valid."""
    calls = message_tool_calls(message)
    if problem := _tool_call_problem(text, calls, request):
        return problem
    if task.output_shape == "tool_call" and not calls:
        return "a tool-calling task answered without a tool call"
    content = message_text(message.get("content")).strip()
    fmt = response_format(request)
    if not calls and (task.output_shape == "json" or fmt["type"] != "text"):
        value = parse_json(content)
        if value is None:
            return "the answer is not JSON"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if fmt["type"] == "json_schema" and schema:
            from jsonschema import validators

            error = next(validators.validator_for(schema)(schema).iter_errors(value), None)
            if error is not None:
                return f"the JSON fails the response_format schema: {error.message}"
    if not calls and not content:
        return "empty answer"
    return None
