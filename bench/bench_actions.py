"""Can an agent-level model choose a one-prompt agent's next action well enough to serve it?

Issue 17's second design: instead of a router guessing the task from the input and a task
specialist answering, one model over all the agent's calls chooses the action, reading
also what the task specialists would answer. Here that model is the router's logistic
regression (bench/bench_routing.py: the router's own features, word n-grams of the last
turn and of the agent's previous message, the last tool's name, the action history) plus,
per tool-call task with a field head (slmify.fieldfit), the evidence of its copy pointer
on the call: whether every copied field finds a candidate, the product of their
probabilities, and whether the chosen values sit in the last message and were already
used by an earlier tool call. Heads are fitted on each fold's training calls only.

Folds are by task group (tau-airline's task id: its 4 trials are near-duplicates), train /
calibrate / test as in bench_routing; per task the threshold is the lowest confidence at
which the Wilson lower bound of precision on the calibration fold clears `--target`.
Prints top-1 accuracy, what the calibrated model routes and how much of it is right, and
the share routable with thresholds chosen on the test calls themselves (an upper bound).

    nice -n 10 .venv/bin/python bench/bench_actions.py [--workspace /tmp/tau] [--heads 3]
        [--tasks ID ...]   # a head whose fields are choices fits slowly (minutes per fold)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_routing import (
    CANDIDATES,
    LLM,
    cross_route,
    group_folds,
    load_calls,
    prepare_workspace,
    read_labels,
    summary_row,
    task_table,
)
from bench_routing import candidate_docs as routing_docs

from slmify.fieldfit import fit_field_head
from slmify.fieldhead import FieldHead, FieldHeadError
from slmify.router import load_router
from slmify.schema import CallRecord
from slmify.store import open_store
from slmify.workspace import Workspace


def evidence(head: FieldHead, call: CallRecord) -> list[float]:
    """What the head's copy pointer sees on a call: all fields found, the product of their
    probabilities, the share of chosen values in the last message / already used."""
    found_all, probability, last, used, fields = 1.0, 1.0, 0, 0, 0
    name = json.loads(head.meta["forms"][0])[0]
    for path, leaf in head.meta["leaves"].items():
        if leaf["kind"] != "copy":
            continue
        best, p, used_any = head.pointer(call.request, name, path, leaf)
        if best is None:
            found_all, probability = 0.0, 0.0
            continue
        probability *= p
        last += min(o.distance for o in best.occurrences) == 0
        used += best.text in used_any
        fields += 1
    n = max(fields, 1)
    return [found_all, probability, last / n, used / n, float(fields > 0)]


def head_evidence(records: list[CallRecord], y: np.ndarray, tasks: list[str]):  # noqa: ANN201
    """`more(train)` for cross_route: the evidence of heads fitted on the train rows."""

    def more(train: np.ndarray) -> np.ndarray:
        blocks = []
        for task in tasks:
            try:
                head, _ = fit_field_head([records[i] for i in train if y[i] == task])
            except FieldHeadError:
                continue
            blocks.append(np.array([evidence(head, r) for r in records], np.float32))
        return np.hstack(blocks) if blocks else np.zeros((len(records), 0), np.float32)

    return more


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/slmify-bench-routing/tau-airline"))
    ap.add_argument(
        "--heads", type=int, default=3, help="field heads for the N largest tool-call tasks"
    )
    ap.add_argument("--tasks", nargs="*", help="field heads for these task ids instead")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prepare_workspace("tau-airline", args.workspace)
    calls = load_calls(args.workspace)
    truth, groups = read_labels("tau-airline", calls)
    y = calls.task_of
    with open_store(str(args.workspace / "calls.db")) as store:
        by_id = {s.record.id: s.record for s in store.iter_calls()}
    records = [by_id[i] for i in calls.ids]
    tool_tasks = [
        t.id for t in Workspace.at(args.workspace).tasks() if t.output_shape == "tool_call"
    ]
    heads = args.tasks or sorted(tool_tasks, key=lambda t: -(y == t).sum())[: args.heads]
    major = {t: max(set(truth[y == t]), key=list(truth[y == t]).count) for t in set(y) - {LLM}}
    docs = routing_docs(calls)
    folds = group_folds(groups, args.folds, args.seed)
    min_conf = load_router(Workspace.at(args.workspace).router_dir()).meta.min_confidence
    print(f"tau-airline: {len(y)} calls, split by task group, {args.folds} folds; heads: {heads}")
    print(
        f"{'features':28s} {'top-1':>6s} | {'fixed':>6s} {'prec':>6s} | {'cal.':>5s} "
        f"{'routed':>6s} {'prec':>6s} {'lower':>6s} {'truth':>6s} {'lower':>6s} | {'ideal':>6s}"
    )
    for name, more in (
        ("router + all candidates", None),
        ("+ field-head evidence", head_evidence(records, y, heads)),
    ):
        started = time.perf_counter()
        r = cross_route(calls, docs, CANDIDATES, folds, args, min_conf, more)
        print(
            summary_row(name, r, y, truth, major, args),
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        print("\n".join(task_table(r, y, truth, major)), flush=True)


if __name__ == "__main__":
    main()
