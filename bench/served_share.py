"""The number that matters, on real agent logs: the share of held-out calls specialists
answer end to end through the router, at the LLM's quality, with and without deferral.

    .venv/bin/python bench/served_share.py tau-airline [--minutes 3] [--workspace DIR]
        [--set key=value ...] [--limit N] [--skip-train]

Runs the pipeline as a user would (`slmify collect import --curate`, `cluster`, `train`,
`eval`) on ../shared/datasets/NAME, then prints the end-to-end figures from
WORKSPACE/eval/endtoend/summary.json, per task, and, from the dataset's ground-truth
labels (read here for measuring only; the pipeline never sees them), how many served calls
were misroutes: a call whose labelled action differs from the action most of the task's
clustered calls have. Not a `bench_*.py`: `make bench` would train for an hour.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from slmify.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
LABEL_KEYS = ("next_action", "task", "group")


def cli(*args: str) -> dict:
    cmd = [sys.executable, "-c", "from slmify.cli import app; app()", *args, "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  {' '.join(args[:1])}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def labels_of(name: str) -> dict[str, str]:
    path = DATASETS / name / "labels.jsonl"
    out = {}
    if path.exists():
        for line in path.open():
            row = json.loads(line)
            key = next((k for k in LABEL_KEYS if k in row), None)
            if key:
                out[row["id"]] = str(row[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", nargs="?", default="tau-airline")
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per task")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--limit", type=int, help="held-out calls per split (default: all)")
    ap.add_argument("--skip-train", action="store_true", help="reuse the workspace's specialists")
    args = ap.parse_args()
    ws = args.workspace or Path(f"/tmp/slmify-bench-{args.dataset}")
    calls = DATASETS / args.dataset / "calls.jsonl.gz"
    if not calls.exists():
        sys.exit(f"{calls} not found")
    w = ["-w", str(ws)]
    if not args.skip_train:
        cli("collect", "import", str(calls), "--curate", *w)
        cli("cluster", *w)
        sets = [f"train.max_minutes={args.minutes}", *args.overrides]
        cli("train", *w, *[x for s in sets for x in ("--set", s)])
    limit = ["--limit", str(args.limit)] if args.limit else []
    out = cli("eval", *w, *limit)
    e2e = Workspace.at(ws).end_to_end().model_dump()
    print(f"\n{args.dataset}: {out['headline']}")
    print(
        f"  without deferral: {e2e['served_without_deferral']} served, agreement "
        f"{e2e['agreement_without_deferral']} (lower {e2e['agreement_lower_without_deferral']})"
    )
    print(f"  reasons: {e2e['reasons']}")
    print(
        f"  router: {e2e['routed_share']:.1%} of held-out calls sent to a trained task, "
        f"{e2e['routing_accuracy']} of those to the task the clustering gave them"
    )
    cost, latency = e2e["llm_cost_usd_moved"], e2e["llm_latency_s_moved"]
    print(f"  LLM cost moved ${cost}, LLM latency moved {latency} s")
    print(
        "  per task: routed / served (agreement, lower) | without deferral | threshold | decision"
    )
    for t in out["tasks"]:
        s = t.get("served")
        if not s:
            print(f"    {t['id']}: {t['status']}: {t['reason']}")
            continue
        print(
            f"    {t['id']}: {s['routed']} / {s['served']} ({s['agreement']}, "
            f"{s['agreement_lower']}) | {s['served_without_deferral']} "
            f"({s['agreement_without_deferral']}) | {t['threshold']} | {t['status']}"
        )
    misroutes(
        ws, labels_of(args.dataset), {t["id"] for t in out["tasks"] if t["status"] == "promoted"}
    )


def misroutes(ws: Path, labels: dict[str, str], promoted: set[str]) -> None:
    """Routing against the labels: a task's action is its clustered calls' majority label."""
    if not labels:
        return
    majority: dict[str, Counter] = defaultdict(Counter)
    for line in (ws / "assignments.jsonl").open():
        row = json.loads(line)
        if row.get("task") and row["id"] in labels:
            majority[row["task"]][labels[row["id"]]] += 1
    action = {t: c.most_common(1)[0][0] for t, c in majority.items()}
    rows = [json.loads(x) for x in (ws / "eval" / "endtoend" / "test.jsonl").open()]
    routed = [r for r in rows if r["picked"] and r["call_id"] in labels]
    right = [r for r in routed if labels[r["call_id"]] == action.get(r["picked"])]
    served = [r for r in routed if r["answered_by"] in promoted]
    wrong_served = [r for r in served if labels[r["call_id"]] != action.get(r["picked"])]
    print(
        f"  routing vs labels: {len(routed)} of {len(rows)} held-out calls routed, "
        f"{len(right) / max(1, len(routed)):.3f} to the task of their labelled action; "
        f"served misroutes: {len(wrong_served)} of {len(served)}"
    )


if __name__ == "__main__":
    main()
