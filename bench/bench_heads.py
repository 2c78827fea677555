"""Field heads on real agent calls: per structured task, exact agreement with the LLM on
the task's own held-out sessions, how much of it a confidence threshold keeps, and the
cost to fit and to answer.

    .venv/bin/python bench/bench_heads.py [--dataset tau-airline] [--workspace WS]
        [--task ID ...] [--test-share 0.25]

The workspace is a clustered one (`slmify collect import ... --curate`, `slmify cluster`;
no training needed); by default the one bench_routing.py builds and keeps from
../shared/datasets/DATASET (about 2 minutes the first time).

For each tool-call or JSON task (or the ones named), the task's calls are split by
session (a hash, `--test-share` of sessions held out), a field head is fitted on the rest
exactly as `slmify train` fits it (slmify.fieldfit), and every held-out call is answered
and scored with eval's metric (slmify.metrics.score_answer). This measures the specialist
alone, on calls the clustering put in its task; what the deployment serves through the
router is `slmify eval`'s figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_routing import prepare_workspace  # noqa: E402

from slmify.datasets import parse_output  # noqa: E402
from slmify.fieldfit import fit_field_head  # noqa: E402
from slmify.fieldhead import FieldHeadError  # noqa: E402
from slmify.metrics import score_answer  # noqa: E402
from slmify.store import default_store_url, open_store  # noqa: E402


def held_out(session: str, share: float) -> bool:
    digest = hashlib.sha256(session.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def measure(task: str, calls: list, share: float) -> dict:
    test = [c for c in calls if held_out(c.session_id or c.id, share)]
    train = [c for c in calls if not held_out(c.session_id or c.id, share)]
    start = time.perf_counter()
    try:
        head, leaves = fit_field_head(train)
    except FieldHeadError as e:
        return {"task": task, "calls": len(calls), "why_not": str(e)}
    fit_s = time.perf_counter() - start
    rows, latency = [], []
    for c in test:
        t0 = time.perf_counter()
        text, confidence, problem = head.predict(c.request)
        latency.append(time.perf_counter() - t0)
        agree = False
        if problem is None:
            message = parse_output(text, c.offered_tools())
            agree = score_answer(c.response.message, message, c.offered_tools(), None).agree
        rows.append((confidence, agree))
    latency.sort()

    def kept(threshold: float) -> str:
        sel = [a for p, a in rows if p >= threshold]
        return f"{sum(sel)}/{len(sel)}" if sel else "0/0"

    return {
        "task": task,
        "calls": len(calls),
        "train": len(train),
        "test": len(test),
        "agree": sum(a for _, a in rows),
        "leaves": {p: r["kind"] for p, r in leaves.items()},
        "at_0.5": kept(0.5),
        "at_0.9": kept(0.9),
        "fit_s": round(fit_s, 1),
        "p50_ms": round(1000 * latency[len(latency) // 2], 1) if latency else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="tau-airline")
    ap.add_argument("--workspace", type=Path, help="default /tmp/slmify-bench-routing/DATASET")
    ap.add_argument("--task", action="append", default=[])
    ap.add_argument("--test-share", type=float, default=0.25)
    args = ap.parse_args()
    ws = args.workspace or Path("/tmp/slmify-bench-routing") / args.dataset
    prepare_workspace(args.dataset, ws)
    tasks = json.loads((ws / "cluster" / "tasks.json").read_text())["tasks"]
    wanted = [
        t["id"]
        for t in tasks
        if (t["id"] in args.task) or (not args.task and t["output_shape"] in ("tool_call", "json"))
    ]
    task_of = {}
    for line in (ws / "assignments.jsonl").open():
        row = json.loads(line)
        if row.get("task") in wanted:
            task_of[row["id"]] = row["task"]
    by_task: dict[str, list] = {t: [] for t in wanted}
    with open_store(default_store_url(ws)) as store:
        for stored in store.iter_calls():
            if (task := task_of.get(stored.record.id)) is not None:
                by_task[task].append(stored.record)
    print(f"field heads on {ws}: held-out share {args.test_share} of each task's sessions")
    for task in wanted:
        r = measure(task, by_task[task], args.test_share)
        if "why_not" in r:
            print(f"  {task}: {r['calls']} calls, no field head: {r['why_not']}")
            continue
        print(
            f"  {task}: {r['agree']}/{r['test']} exact ({r['agree'] / max(1, r['test']):.3f}); "
            f"confidence >= 0.5: {r['at_0.5']}, >= 0.9: {r['at_0.9']}; "
            f"fit {r['fit_s']} s on {r['train']} calls, p50 {r['p50_ms']} ms; {r['leaves']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
