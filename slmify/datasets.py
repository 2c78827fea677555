"""Per-task datasets: calls rendered as (prompt, completion) text in the base model's format.

Reads a task's calls (CallRecords from the store) and writes, under
WORKSPACE/specialists/<task id>/:
- `pruning.json`: the prompt text removed because every call of the task repeats it (the
  system policy, the tool schemas), exactly, so eval and serving build the same input;
- `splits.json`: the call ids of train / validation / calibration / test. Calls are split
  by session (a call without one by its own id), by a hash, so it is deterministic; once
  recorded, a test or calibration call stays there on every later run and is never
  trained on (calibration sets the confidence a specialist defers at);
- `dataset/hf/` (`datasets` save_to_disk) and `dataset/<split>.jsonl`:
  rows of id, session, split, prompt, completion and their token counts.

The prompt is the request rendered by the model's chat template with the generation
prompt, after pruning and the recipe's context policy (`dataset.context`: the last turns
or tokens of a long conversation, tool results cut), both recorded in pruning.json; the
completion is the assistant's answer followed by the template's end-of-turn marker.
Tool calls use one JSON convention whatever the template, which `parse_output` reads back
(the evaluator and the serving router use it too):

    <tool_call>{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}</tool_call>

A template with tool support (it mentions `tools`) gets the schemas through `tools=`
and tool results as `tool` messages; one without (SmolLM2, Gemma 3) gets the schemas
in the system message with an instruction to answer in the convention, and tool results
as user turns wrapped in `<tool_response>`. Past assistant tool calls are written in the
convention in both cases, so the model sees the same format it is taught to emit.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from slmify.recipes import DatasetConfig, PruneConfig
from slmify.schema import (
    CallRecord,
    ChatRequest,
    ContextPolicy,
    PromptPruning,
    Splits,
    message_text,
)
from slmify.workspace import (
    SPLITS_FILE,
    read_splits_file,
    write_pruning_file,
    write_splits_file,
)

SPLITS = ("train", "validation", "calibration", "test")
FROZEN = ("test", "calibration")  # once a call is held out there, it stays there
TOOLS_PREAMBLE = (
    "You can call these tools. To call one, answer with "
    '<tool_call>{"name": TOOL_NAME, "arguments": {...}}</tool_call>.\nTools:'
)
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


# -- the tool-call convention -------------------------------------------------------------


def render_tool_call(name: str, arguments: Any) -> str:
    """One call in the convention; `arguments` as sent (a JSON string) or a dict."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # kept verbatim: the teacher's malformed arguments are what it sent
    call = {"name": name, "arguments": arguments}
    return f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>"


def render_assistant(message: dict[str, Any]) -> str:
    """An assistant message as text: its content, then its tool calls in the convention."""
    parts = [message_text(message.get("content")).strip()]
    calls = [c["function"] for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    if isinstance(message.get("function_call"), dict):
        calls.append(message["function_call"])
    parts += [render_tool_call(c.get("name", ""), c.get("arguments") or "") for c in calls]
    return "\n".join(p for p in parts if p)


def parse_output(text: str, offered_tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A model's text as an OpenAI assistant message, `<tool_call>` blocks as tool_calls.

    A block that is not JSON with a `name`, or names a tool that was not offered (when
    tools were offered), stays in the content, so a malformed call is never executed.
    """
    offered = {t.get("name") for t in offered_tools}
    calls, kept, last = [], [], 0
    for match in TOOL_CALL_RE.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        if offered_tools and call["name"] not in offered:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        args = call.get("arguments", {})
        calls.append(
            {
                "id": f"call_{len(calls)}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    content = ("".join(kept) + text[last:]).strip()
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return message


# -- prompts ------------------------------------------------------------------------------


def compact_tool(spec: dict[str, Any]) -> dict[str, Any]:
    """A tool schema without descriptions: name, argument names, types, required."""
    params = spec.get("parameters") or {}
    props = {
        k: {"type": v.get("type", "any"), **({"enum": v["enum"]} if "enum" in v else {})}
        for k, v in (params.get("properties") or {}).items()
        if isinstance(v, dict)
    }
    return {
        "name": spec.get("name"),
        "parameters": {"properties": props, "required": params.get("required", [])},
    }


def _pruned_tools(specs: list[dict[str, Any]], pruning: PromptPruning) -> list[dict[str, Any]]:
    if pruning.tools is None or specs != pruning.tools:
        return specs
    if pruning.tools_action == "drop":
        return []
    if pruning.tools_action == "compact":
        return [compact_tool(s) for s in specs]
    return specs


def native_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders tool schemas itself."""
    return "tools" in (tokenizer.chat_template or "")


def build_prompt(tokenizer: Any, request: ChatRequest, pruning: PromptPruning) -> str:
    """The text the model reads for a request: pruned, rendered, ending at its turn."""
    messages = [dict(m) for m in request.messages]
    if (
        pruning.system is not None
        and messages
        and messages[0].get("role") == "system"
        and message_text(messages[0].get("content")) == pruning.system
    ):
        messages = messages[1:]
    messages = apply_context(messages, pruning.context, tokenizer)
    specs = [t["function"] for t in request.tools or [] if "function" in t]
    specs = _pruned_tools(specs + list(request.functions or []), pruning)
    native = native_tools(tokenizer)
    chat = _chat_messages(messages, native)
    if specs and not native:
        schema = "\n".join(json.dumps(s, ensure_ascii=False) for s in specs)
        block = f"{TOOLS_PREAMBLE}\n{schema}"
        if chat and chat[0]["role"] == "system":
            chat[0]["content"] = f"{chat[0]['content']}\n\n{block}"
        else:
            chat.insert(0, {"role": "system", "content": block})
    tools = [{"type": "function", "function": s} for s in specs] if native and specs else None
    return tokenizer.apply_chat_template(
        chat, tools=tools, tokenize=False, add_generation_prompt=True
    )


def apply_context(
    messages: list[dict[str, Any]], policy: ContextPolicy, tokenizer: Any
) -> list[dict[str, Any]]:
    """The messages a specialist reads under `policy`: a leading system message, then the
    last turns that the turn and token budgets allow (the last, the one the agent answers,
    always), tool results cut to `tool_result_chars`. Tokens are those of each message's
    text as rendered (tool calls in the convention), without the template's markers."""
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(head) :]
    if policy.tool_result_chars is not None:
        cut = policy.tool_result_chars
        turns = [
            {**m, "content": _cut(message_text(m.get("content")), cut)}
            if m.get("role") in ("tool", "function")
            else m
            for m in turns
        ]
    keep = min(len(turns), policy.max_turns or len(turns))
    if policy.max_tokens is not None:
        total, fits = 0, 0
        for m in reversed(turns[len(turns) - keep :]):
            text = (
                render_assistant(m)
                if m.get("role") == "assistant"
                else message_text(m.get("content"))
            )
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if fits and total > policy.max_tokens:
                break
            fits += 1
        keep = fits
    return head + turns[len(turns) - keep :]


def _cut(text: str, chars: int) -> str:
    """Head and tail of a long tool result: JSON records often end with what the next call
    needs (a user's `reservations` list comes last in tau-airline's user details)."""
    if len(text) <= chars:
        return text
    return f"{text[: chars - chars // 2]} …[cut]… {text[len(text) - chars // 2 :]}"


def _chat_messages(messages: list[dict[str, Any]], native: bool) -> list[dict[str, str]]:
    """Plain role/content messages; tool results as `tool` turns or wrapped user turns."""
    chat: list[dict[str, str]] = []
    for m in messages:
        role = m.get("role", "user")
        if role == "assistant":
            content = render_assistant(m)
        elif role in ("tool", "function"):
            content = message_text(m.get("content"))
            if not native:
                role, content = "user", f"<tool_response>{content}</tool_response>"
            else:
                role = "tool"
        else:
            content = message_text(m.get("content"))
        # Templates without tool support often insist on alternating roles (Gemma):
        # consecutive turns of one role are joined.
        if not native and chat and chat[-1]["role"] == role:
            chat[-1]["content"] += "\n" + content
        else:
            chat.append({"role": role, "content": content})
    return chat


def turn_end(tokenizer: Any) -> str:
    """What the template writes after an assistant turn (`<|im_end|>`), the stop marker."""
    marker = "\x00slmify\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
        tokenize=False,
    )
    return text.split(marker, 1)[1].strip() or tokenizer.eos_token


# -- pruning and splitting ----------------------------------------------------------------


def find_pruning(
    calls: list[CallRecord], cfg: PruneConfig, context: ContextPolicy | None = None
) -> PromptPruning:
    """The system text and tool schemas that every call of the task repeats verbatim, and
    the context policy the task's prompts are built with."""
    context = context or ContextPolicy()
    systems = {
        message_text(c.request.messages[0].get("content"))
        if c.request.messages and c.request.messages[0].get("role") == "system"
        else None
        for c in calls
    }
    system = next(iter(systems)) if len(systems) == 1 and cfg.system == "drop" else None
    tool_sets = {json.dumps(c.offered_tools(), sort_keys=True) for c in calls}
    shared_tools = json.loads(next(iter(tool_sets))) if len(tool_sets) == 1 else []
    if cfg.tools == "keep" or not shared_tools:
        return PromptPruning(system=system, context=context)
    return PromptPruning(
        system=system, tools_action=cfg.tools, tools=calls[0].offered_tools(), context=context
    )


def hash_unit(key: str) -> float:
    """A key's deterministic place in [0, 1)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def split_of(call: CallRecord, cfg: DatasetConfig) -> str:
    """The split a call belongs to by a hash of its session (else of its id): test, then
    calibration, then validation, then train, by the recipe's fractions. The one rule: eval
    and end-to-end replays call it to find held-out sessions, claimed by a task or not."""
    u = hash_unit(call.session_id or call.id)
    for split, upto in (
        ("test", cfg.test_fraction),
        ("calibration", cfg.test_fraction + cfg.calibration_fraction),
        ("validation", cfg.test_fraction + cfg.calibration_fraction + cfg.validation_fraction),
    ):
        if u < upto:
            return split
    return "train"


def assign_splits(calls: list[CallRecord], cfg: DatasetConfig, recorded: Splits | None) -> Splits:
    """Call ids per split; ids `recorded` (the last run's) as test or calibration stay there."""
    frozen = {cid: s for s in FROZEN for cid in getattr(recorded, s)} if recorded else {}
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for c in calls:
        splits[frozen.get(c.id) or split_of(c, cfg)].append(c.id)
    return Splits(
        key="session (call id when absent), sha256",
        validation_fraction=cfg.validation_fraction,
        test_fraction=cfg.test_fraction,
        calibration_fraction=cfg.calibration_fraction,
        **splits,
    )


# -- the dataset --------------------------------------------------------------------------


def build_task_dataset(
    calls: list[CallRecord], tokenizer: Any, cfg: DatasetConfig, out: Path
) -> dict[str, list[dict[str, Any]]]:
    """Render, split and write a task's dataset under `out`; returns rows per split."""
    from datasets import Dataset, DatasetDict

    pruning = find_pruning(calls, cfg.prune, cfg.context)
    recorded = read_splits_file(out) if (out / SPLITS_FILE).exists() else None
    splits = assign_splits(calls, cfg, recorded)
    split_by_id = {cid: s for s in SPLITS for cid in getattr(splits, s)}
    end = turn_end(tokenizer)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for c in calls:
        prompt = build_prompt(tokenizer, c.request, pruning)
        completion = render_assistant(c.response.message if c.response else {}) + end
        rows[split_by_id[c.id]].append(
            {
                "id": c.id,
                "session": c.session_id or c.id,
                "prompt": prompt,
                "completion": completion,
                "prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                "completion_tokens": len(
                    tokenizer(completion, add_special_tokens=False)["input_ids"]
                ),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    write_pruning_file(out, pruning)
    write_splits_file(out, splits)
    folder = out / "dataset"
    folder.mkdir(exist_ok=True)
    for split, items in rows.items():
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
    DatasetDict(
        {s: Dataset.from_list(items, features=None) for s, items in rows.items() if items}
    ).save_to_disk(str(folder / "hf"))
    return rows


def tokenize_rows(
    rows: list[dict], tokenizer: Any, max_length: int, cap: int | None
) -> tuple[Any, int]:
    """input_ids + completion_mask (loss on the answer only), long examples left out;
    returns the HF Dataset and how many rows were too long.

    Prompt and completion are tokenized apart and joined, so the completion starts
    exactly where the prompt ends (trl's own tokenization can merge tokens there).
    A hash of the call id picks the capped subset, the same on every run.
    """
    from datasets import Dataset

    fitting = [r for r in rows if r["prompt_tokens"] + r["completion_tokens"] <= max_length]
    fitting.sort(key=lambda r: hash_unit(r["id"]))
    items = []
    for r in fitting[:cap]:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        items.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    return Dataset.from_list(items), len(rows) - len(fitting)
