"""A label task answered by its label head against the same task's LoRA generating the label.

On a workspace where `slmify run` (or `make demo`) trained a label head for a task with
closed-set answers, this copies the workspace, trains that task again with
`--set label.specialist=lora` through the CLI (the recipe and budget the workspace used),
and answers the task's frozen test calls with both specialists through the pool serve
uses (slmify.specialists): exact label agreement with the LLM's answer, answer latency
p50 / p90, and each one's training time. Issue 12, item 5.

    nice -n 10 .venv/bin/python bench/bench_label.py WORKSPACE [--task ID] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slmify.evaluate import trained_task
from slmify.metrics import score_answer
from slmify.specialists import SpecialistPool
from slmify.store import open_store
from slmify.workspace import Workspace


def label_task(ws: Workspace, wanted: str | None) -> str:
    tasks = [t.id for t in ws.tasks() if t.output_shape == "label"]
    if wanted:
        return wanted
    if not tasks:
        sys.exit(f"{ws.root}: no label task")
    return tasks[0]


def answer_all(root: Path, task_id: str, calls: list) -> dict:  # noqa: ANN001
    """Agreement and latency of the task's trained specialist in `root` on `calls`."""
    ws = Workspace.at(root)
    trained = trained_task(root, next(t for t in ws.tasks() if t.id == task_id))
    assert not isinstance(trained, str), trained
    pool = SpecialistPool([trained.runtime()])
    pool.answer(task_id, calls[0].request)  # load the model before timing
    agree, latency = 0, []
    for call in calls:
        start = time.perf_counter()
        answer = pool.answer(task_id, call.request)
        latency.append(1000 * (time.perf_counter() - start))
        score = score_answer(call.response.message, answer.message, call.offered_tools(), None)
        agree += bool(score.agree) and answer.problem is None
    latency.sort()
    metrics = json.loads((ws.specialist_dir(task_id) / "metrics.json").read_text())
    return {
        "kind": trained.result.kind,
        "agree": agree,
        "calls": len(calls),
        "p50_ms": statistics.median(latency),
        "p90_ms": latency[int(0.9 * (len(latency) - 1))],
        "train_s": round(metrics["wall_s"], 1) if metrics.get("wall_s") else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--task")
    ap.add_argument("--limit", type=int, default=40, help="test calls answered by each")
    args = ap.parse_args()
    ws = Workspace.at(args.workspace)
    task_id = label_task(ws, args.task)
    test = set(ws.splits(task_id).test)
    with open_store(str(args.workspace / "calls.db")) as store:
        calls = [s.record for s in store.iter_calls() if s.record.id in test]
    calls = sorted(calls, key=lambda c: c.id)[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        copy, recipe = Path(tmp) / "ws", Path(tmp) / "recipe.yaml"
        shutil.copytree(args.workspace, copy)
        # The recipe the head was trained with, resolved (the run's overrides included).
        shutil.copy(ws.recipe_file(task_id), recipe)
        shutil.rmtree(Workspace.at(copy).specialist_dir(task_id))
        cli = [str(Path(sys.executable).with_name("slmify")), "train", "-w", str(copy)]
        cli += ["--task", task_id, "--recipe", str(recipe), "--set", "label.specialist=lora"]
        subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
        rows = [answer_all(args.workspace, task_id, calls), answer_all(copy, task_id, calls)]
    print(f"{task_id}: {len(calls)} test calls of {args.workspace}")
    print(f"{'specialist':12s} {'agree':>9s} {'p50 ms':>9s} {'p90 ms':>9s} {'train s':>8s}")
    for r in rows:
        print(
            f"{r['kind']:12s} {r['agree']:4d}/{r['calls']:<4d} {r['p50_ms']:9.1f} "
            f"{r['p90_ms']:9.1f} {r['train_s'] or '-':>8}"
        )


if __name__ == "__main__":
    main()
