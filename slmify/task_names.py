"""What a task is, in words a user reads: a name, a one-line description and examples,
derived from the task's own calls (never renaming its id, which other stages key on).

The name is the task's instruction as an action ("Extract order details from customer
emails"), taken from the system prompt (or, lacking one, the task statement: the first
user message), when that instruction is the task's own; tasks sharing one system prompt (an
agent whose every call carries the same policy) are named by what they answer instead
("Call get_reservation_details", "Pick one of 6 labels"). The description adds the answer's
shape: the tool and its arguments, the JSON keys, the label set, or the length of the text.

Reads call records (scrubbed once curated) handed in by slmify.workspace_report; writes
nothing.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from typing import Any

from slmify.schema import CallRecord, TaskCluster, message_text

# Verbs that open an instruction's action ("You extract ...", "Classify ..."); a sentence
# opening with another word ("You are Acme's assistant") is a role, not what the task does.
TASK_VERBS = frozenset(
    "answer book calculate call categorise categorize check choose classify compare compute "
    "convert correct create decide detect draft estimate explain extract find fix generate "
    "identify label list look output parse pick plan predict rank rate recommend reply "
    "respond return review rewrite route schedule score search select summarise summarize "
    "tag translate triage use validate verify write".split()
)
# Words a name never ends on once cut to NAME_WORDS ("Extract order details from ...").
DANGLING = frozenset("a an and by for from in into of on or the to with".split())
NAME_WORDS = 8
EXCERPT_CHARS = 280
ANSWER_CHARS = 200


def sentences(text: str) -> list[str]:
    """Sentences and lines of a prompt, markdown heading marks dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip().lstrip("#>*- ").strip()
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", line) if s.strip()]
    return out


def instruction_of(calls: list[CallRecord]) -> str:
    """The task's instruction text: its most common system prompt, else its most common
    first user message (the task statement)."""
    texts: Counter[str] = Counter()
    for role in ("system", "user"):
        for c in calls:
            first = next((m for m in c.request.messages if m.get("role") == role), None)
            if first is not None:
                texts[message_text(first.get("content")).strip()] += 1
        if texts:
            return texts.most_common(1)[0][0]
    return ""


def action_phrase(instruction: str) -> str | None:
    """The first clause of the instruction that says what to do, cut to a name's length."""
    for sentence in sentences(instruction):
        for clause in re.split(r"[,;:]\s+|\s+-\s+", sentence):
            words = clause.strip().rstrip(".!?").split()
            if words and words[0].lower() == "you":
                words = words[1:]
            if words and words[0].lower() in ("should", "must", "will", "can", "always"):
                words = words[1:]
            if not words or words[0].lower() not in TASK_VERBS:
                continue
            words = words[:NAME_WORDS]
            while len(words) > 1 and words[-1].lower() in DANGLING:
                words.pop()
            return " ".join([words[0].capitalize(), *words[1:]])
    return None


def answer_shape(task: TaskCluster, calls: list[CallRecord], labels: list[str] | None) -> str:
    """What the LLM answers, in words: the tool and arguments, JSON keys, labels, length."""
    if task.output_shape == "tool_call":
        made = Counter(
            f"{tc['name']}({', '.join(_keys(tc['arguments']))})"
            for c in calls
            for tc in c.tool_calls()
        )
        return "a call to " + (" or ".join(t for t, _ in made.most_common(2)) or "a tool")
    if task.output_shape == "json":
        keys = Counter(tuple(_keys(c.output_text())) for c in calls)
        common = keys.most_common(1)[0][0] if keys else ()
        return "a JSON object" + (f" with keys {', '.join(common)}" if common else "")
    if task.output_shape == "label":
        labels = labels or [
            a for a, _ in Counter(c.output_text().strip() for c in calls).most_common()
        ]
        shown = ", ".join(labels[:8]) + (", …" if len(labels) > 8 else "")
        return f"one of {len(labels)} labels: {shown}"
    words = [len(c.output_text().split()) for c in calls if c.output_text()]
    return f"free text of about {round(statistics.median(words))} words" if words else "free text"


def _keys(arguments: str) -> list[str]:
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        return []
    return list(value) if isinstance(value, dict) else []


def fallback_name(task: TaskCluster, labels: list[str] | None) -> str:
    """A name from what the task answers, for tasks whose instruction does not tell them
    apart."""
    if task.output_shape == "tool_call" and task.tools:
        return "Call " + " or ".join(task.tools[:2])
    if task.output_shape == "label":
        return f"Pick one of {len(labels)} labels" if labels else "Answer with a label"
    terms = ", ".join(task.top_terms[:3])
    what = "JSON" if task.output_shape == "json" else "text"
    return f"Write {what} about {terms}" if terms else f"Write {what}"


def name_tasks(
    tasks: list[TaskCluster],
    calls: dict[str, list[CallRecord]],
    labels: dict[str, list[str] | None],
) -> dict[str, dict[str, Any]]:
    """Per task id: name, description, instruction and answer shape; names are unique
    (a repeated one gets its task id's number)."""
    instructions = {t.id: instruction_of(calls.get(t.id, [])) for t in tasks}
    shared = Counter(instructions.values())
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        mine, text = calls.get(t.id, []), instructions[t.id]
        action = action_phrase(text) if text and shared[text] == 1 else None
        first = next(iter(sentences(text)), "")
        shape = answer_shape(t, mine, labels.get(t.id))
        out[t.id] = {
            "name": action or fallback_name(t, labels.get(t.id)),
            "description": (f"{first} " if first else "") + f"Answers with {shape}.",
            "instruction": first,
            "answer_shape": shape,
        }
    names = Counter(d["name"] for d in out.values())
    for task_id, d in out.items():
        if names[d["name"]] > 1:
            d["name"] += f" ({task_id.split('-')[0]})"
    return out


def example(call: CallRecord) -> dict[str, str]:
    """An example call: the message the agent answered (an excerpt) and the LLM's answer."""
    # The last message with words: a turn that only called a tool has none to show.
    texts = [(m, message_text(m.get("content")).strip()) for m in call.request.messages]
    asked, text = next(((m, t) for m, t in reversed(texts) if t), ({}, ""))
    if asked.get("role") not in (None, "user"):
        text = f"[{asked['role']}] {text}"
    tools = call.tool_calls()
    answer = "; ".join(f"{t['name']}({t['arguments']})" for t in tools) or call.output_text()
    return {
        "call_id": call.id,
        "role": str(asked.get("role", "")),
        "input": _cut(text, EXCERPT_CHARS),
        "answer": _cut(answer.strip(), ANSWER_CHARS),
    }


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"
