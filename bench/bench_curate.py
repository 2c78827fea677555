"""Curation throughput of `slmify collect curate` on real logs.

Imports ../shared/datasets/tau-airline/calls.jsonl.gz (2,454 calls) once into a SQLite
store in a temporary folder, then curates a fresh copy of that store `--runs` times and
prints calls/s (best and median run, by wall clock and by CPU time, which a busy shared
machine disturbs less) and what was replaced. `--all` does the same on one store holding
all three shared sets (6,829 calls).

    .venv/bin/python bench/bench_curate.py [--runs 3] [--all]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from slmify.collect import import_files
from slmify.curate import curate_store
from slmify.store import open_store

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def curate_once(template: Path, tmp: Path) -> tuple[dict, float, float]:
    """Curate a copy of the store `template`; returns (summary, wall s, CPU s)."""
    db = tmp / "calls.db"
    shutil.copy(template, db)
    with open_store(str(db)) as store:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = curate_store(store, tmp / "curation-report.json")
        return summary, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="all three sets, not tau-airline")
    args = parser.parse_args()
    names = ["tau-airline", "fireact", "toolbench-legacy"] if args.all else ["tau-airline"]
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "imported.db"
        with open_store(str(template)) as store:
            paths = [DATASETS / n / "calls.jsonl.gz" for n in names]
            import_files(store, paths, Path(tmp) / "rejects.jsonl")
            store.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        walls, cpus = [], []
        for i in range(args.runs):
            run_dir = Path(tmp) / f"run{i}"
            run_dir.mkdir()
            summary, wall, cpu = curate_once(template, run_dir)
            walls.append(wall)
            cpus.append(cpu)
    n = summary["curated"]
    print(f"curate {'+'.join(names)}: {n} calls, {args.runs} runs")
    print(
        f"  wall: best {n / min(walls):.0f} calls/s, median {n / statistics.median(walls):.0f}"
        f" calls/s; CPU: best {n / min(cpus):.0f} calls/s"
    )
    print(
        f"  replaced {summary['replacements_by_type']} in {summary['scrubbed_calls']} calls;"
        f" duplicates {summary['duplicates']}; excluded {summary['excluded']}"
    )


if __name__ == "__main__":
    main()
