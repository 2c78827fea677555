"""How often does the teacher itself take the same action in the same state? What bounds
any specialist judged by agreement with one logged answer.

A specialist is scored against the one answer the LLM happened to log. Where the LLM,
given the same state again, would act differently, no input-only model can agree with it
more often than it agrees with itself. The states here are coarse (the user's words differ
between trials and may explain part of the difference), so these figures describe the
teacher's spread, not a strict bound. Logs that replay the same user task several times
(tau-airline: 50 tasks x 4 trials, `task_id` in its labels) show this directly: group
calls by (user task, the actions the agent took so far in the conversation, the role of
the last message) and predict each call's action by the majority of the *other* calls of
its group (leave one out). The label only names the user task (it is for measuring, never
a feature); actions are read from the logged requests and responses.

Prints, for calls whose group has other calls:
- leave-one-out agreement of the action (an oracle that knows the user task and the
  history of actions, and nothing of the wording);
- the share of all calls that are tool calls in states where every other trial took the
  same action (`unanimous`), and how often those calls agree with it: what a router could
  serve at a high precision even knowing the user task.

    .venv/bin/python bench/bench_ceiling.py [--dataset tau-airline] [--group task_id]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmify.collect import from_openai_log  # noqa: E402
from slmify.features import action_of  # noqa: E402
from slmify.schema_calls import CallRecord, message_text, message_tool_calls  # noqa: E402
from slmify.shapes import text_shape  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
TEXT = ("text", "json", "label")  # text_shape's answers in words: a reply, not a tool


def is_tool(action: str) -> bool:
    return not action.startswith(TEXT)


def state(call: CallRecord) -> tuple[tuple[str, ...], str]:
    """The actions the agent took before this call (tool names, or the shape of its words),
    and who spoke last."""
    msgs = call.request.messages
    done = tuple(
        "+".join(sorted({c["name"] for c in message_tool_calls(m)}))
        or text_shape(message_text(m.get("content")))
        for m in msgs
        if m.get("role") == "assistant"
    )
    return done, msgs[-1].get("role", "") if msgs else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="tau-airline")
    ap.add_argument("--group", default="task_id", help="label naming the user task")
    args = ap.parse_args()
    folder = DATASETS / args.dataset
    with open(folder / "labels.jsonl", encoding="utf-8") as f:
        group_of = {row["id"]: row.get(args.group) for row in map(json.loads, f)}
    groups: dict[tuple, list[str]] = defaultdict(list)
    total = 0
    with gzip.open(folder / "calls.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            [call] = from_openai_log(json.loads(line), args.dataset)
            total += 1
            if group_of.get(call.id) is None:
                continue
            groups[(group_of[call.id], *state(call))].append(action_of(call))
    with_others = agree = unanimous_tool = unanimous_tool_agree = tools = 0
    for actions in groups.values():
        if len(actions) < 2:
            continue
        counts = Counter(actions)
        for a in actions:
            others = counts.copy()
            others[a] -= 1
            top, n = others.most_common(1)[0]
            with_others += 1
            agree += top == a
            tools += is_tool(a)
            if n == sum(others.values()) and n >= 2 and is_tool(top):
                unanimous_tool += 1
                unanimous_tool_agree += top == a
    print(f"{args.dataset}: {total} calls, {with_others} in a state other trials reached too")
    print(f"  leave-one-out agreement of the action: {agree / with_others:.3f}")
    print(f"  tool calls among them: {tools}")
    print(
        f"  tool calls in states where >= 2 other trials all took one tool action: "
        f"{unanimous_tool} ({unanimous_tool / total:.1%} of all calls), "
        f"agreeing with it: {unanimous_tool_agree / max(unanimous_tool, 1):.3f}"
    )


if __name__ == "__main__":
    main()
