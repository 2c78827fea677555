"""Import throughput and peak memory of `slmify collect import` on a real log.

Imports ../shared/datasets/tau-airline/calls.jsonl.gz (2,454 calls) into a fresh SQLite
store in a temporary folder, `--runs` times, and prints calls/s (best and median run, by
wall clock and by CPU time, which a busy shared machine disturbs less) and the peak
memory: tracemalloc's peak of Python allocations during one import, and
the child process's max RSS (which includes the interpreter and pydantic themselves).
Before each import the same file is only read and parsed (decompression and
`orjson.loads` of every line, the importer's own reader): that rate is the ceiling, and
the import's rate is printed as a share of it, both taken in the same run so that a busy
machine slows them alike. The import's CPU time counts its writer thread too.
`--profile` prints the top of a cProfile of one import instead (the main thread only).

    .venv/bin/python bench/bench_import.py [--runs 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from slmify.collect import import_files, iter_records
from slmify.store import open_store

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tau-airline"
CALLS = DATASET / "calls.jsonl.gz"


def import_once(tmp: Path) -> tuple[dict, float, float]:
    """One import into a new store under `tmp`; returns (summary, wall s, CPU s)."""
    tmp.mkdir(parents=True)
    with open_store(str(tmp / "calls.db")) as store:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = import_files(store, [CALLS], tmp / "rejects.jsonl")
        return summary, time.perf_counter() - wall, time.process_time() - cpu


def parse_once() -> tuple[int, float]:
    """Read and parse every line of the file, nothing else; returns (records, wall s)."""
    wall = time.perf_counter()
    n = sum(1 for _, obj, error in iter_records(CALLS) if error is None)
    return n, time.perf_counter() - wall


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far (Linux), to tell how much of it
    other processes held while this ran."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def child_max_rss_mib() -> float:
    """Max RSS of a fresh interpreter that does one import (ru_maxrss is KiB on Linux)."""
    code = (
        "import sys, tempfile, pathlib; sys.path.insert(0, 'bench');"
        "from bench_import import import_once;"
        "import_once(pathlib.Path(tempfile.mkdtemp()) / 'rss')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not CALLS.exists():
        sys.exit(f"bench_import: {CALLS} not found")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(import_once, root / "profile")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            return
        import_once(root / "warmup")  # imports and pydantic schema builds, not timed
        rates, cpu_rates, ceilings = [], [], []
        ticks, own = machine_ticks(), os.times()
        for i in range(args.runs):
            parsed, parse_wall = parse_once()
            ceilings.append(parsed / parse_wall)
            summary, wall, cpu = import_once(root / f"run{i}")
            assert summary["imported"] == summary["read"] == parsed, summary
            rates.append(summary["imported"] / wall)
            cpu_rates.append(summary["imported"] / cpu)
        others = _others_share(ticks, own)
        tracemalloc.start()
        import_once(root / "traced")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(f"dataset: {CALLS} ({summary['imported']} calls), fresh SQLite store per run")
    print(
        f"import throughput (wall clock): best {max(rates):,.0f} calls/s,"
        f" median {statistics.median(rates):,.0f} calls/s over {args.runs} runs"
    )
    # On a shared machine the wall clock includes waiting for a core; CPU time does not.
    print(
        f"import throughput (CPU time): best {max(cpu_rates):,.0f} calls/s,"
        f" median {statistics.median(cpu_rates):,.0f} calls/s"
    )
    best, ceiling = max(rates), max(ceilings)
    ratios = [r / c for r, c in zip(rates, ceilings, strict=True)]
    print(
        f"JSON-parse-only ceiling (read + orjson.loads, same runs): best {ceiling:,.0f} calls/s,"
        f" median {statistics.median(ceilings):,.0f} calls/s;"
        f" import's best = {best / ceiling:.0%} of the best ceiling,"
        f" median ratio {statistics.median(ratios):.0%}"
    )
    if others is not None:
        # Figures from a machine whose cores others held are not comparable to a quiet one's.
        print(f"other processes held {others:.0%} of the machine's CPU during the timed runs")
    print(f"peak Python allocations during one import (tracemalloc): {peak / 2**20:.1f} MiB")
    print(f"max RSS of a child process doing one import: {child_max_rss_mib():.0f} MiB")


def _others_share(ticks: tuple[int, int] | None, own: os.times_result) -> float | None:
    after = machine_ticks()
    if ticks is None or after is None:
        return None
    busy, total = after[0] - ticks[0], after[1] - ticks[1]
    now = os.times()
    mine = (now.user - own.user + now.system - own.system) * os.sysconf("SC_CLK_TCK")
    return max(0.0, busy - mine) / total if total else None


if __name__ == "__main__":
    main()
