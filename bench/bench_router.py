"""Router decision time and held-out routing, per router feature setting, in one process.

Each workspace given was imported and clustered by the CLI, one per setting of the
cluster recipe's `router_features` (`slmify collect import FILE --curate -w WS`, then
`slmify cluster -w WS --set "router_features=[task_ngrams, turn_ngrams]"`); all hold the
same calls and, the clustering being seeded, the same assignments. The first is the
baseline.

The calls routed are the held-out ones: those of the sessions `datasets.hash_unit` places
below the router's `held_out_share`, the calls its router.json `holdout` scores and eval
replays. They are routed one at a time with `router.route`, in the store's order (a
session's calls in turn, so the task-statement cache works as in serving; emptied after
a warm-up), and call by call through every router in turn, so that all settings see the
same load on a shared machine. Printed per setting:

- router.json's held-out figures: accuracy, routed share, accuracy when routed;
- the same recomputed from these routes (the served embedding is bf16 where the CPU has
  it, the fitted one float32: the two may differ by a call or two);
- decision time p50 / p99 in ms and as a ratio to the baseline's (issue 14: p99 < 10 ms);
- the share of calls on which MiniLM ran (a turn, or a task statement not yet cached;
  never, for a router without an embedding block), and p50 / p99 over the other calls;
- with --per-task: per task, its held-out calls, the share of them routed to it, and the
  share right of the calls routed to it (precision).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/bench_router.py WS [WS ...] [--per-task]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slmify.datasets import hash_unit
from slmify.router import Router, load_router, router_blocks
from slmify.schema import ChatRequest
from slmify.store import open_store
from slmify.workspace import Workspace

WARM_UP = 10


def held_out(ws: Workspace, share: float) -> tuple[list[ChatRequest], list[str | None]]:
    """The held-out calls' requests, in store order, and the clustering's task of each."""
    assigned = ws.assignments()
    requests, truth = [], []
    with open_store(ws.store_url) as st:
        for stored in st.iter_calls():
            r = stored.record
            if r.id in assigned and hash_unit(r.session_id or r.id) < share:
                requests.append(r.request)
                truth.append(assigned[r.id])
    return requests, truth


def time_routes(routers: list[Router], requests: list[ChatRequest]):  # noqa: ANN201
    """Each router's decisions, a (routers x calls) array of decision times in ms, and
    one of whether MiniLM ran."""
    for router in routers:
        for q in requests[:WARM_UP]:  # loads MiniLM, fills caches
            router.route(q)
        router._task_cache.clear()
    times = np.zeros((len(routers), len(requests)))
    embedded = np.zeros((len(routers), len(requests)), dtype=bool)
    current = [0]  # the call being routed
    for i, router in enumerate(routers):
        router._embed = _marking(router._embed, embedded[i], current)
    decisions: list[list[str | None]] = [[] for _ in routers]
    for j, q in enumerate(requests):
        current[0] = j
        order = [(j + k) % len(routers) for k in range(len(routers))]  # no router always first
        for i in order:
            t0 = time.perf_counter()
            decisions[i].append(routers[i].route(q)[0])
            times[i, j] = (time.perf_counter() - t0) * 1000
    return decisions, times, embedded


def _marking(embed: Callable, marks: np.ndarray, current: list[int]) -> Callable:
    """`embed`, marking the call being routed as one MiniLM ran on."""

    def wrapped(texts: list[str]) -> np.ndarray:
        marks[current[0]] = True
        return embed(texts)

    return wrapped


def per_task(decided: list[str | None], truth: list[str | None]) -> list[str]:
    lines = [f"    {'task':36s} {'calls':>5s} {'routed':>7s} {'to it':>6s} {'prec':>6s}"]
    for task in sorted({t for t in truth if t}):
        calls = sum(t == task for t in truth)
        sent = [t for d, t in zip(decided, truth, strict=True) if d == task]
        right = sum(t == task for t in sent)
        prec = f"{right / len(sent):6.3f}" if sent else "     -"
        lines.append(f"    {task:36s} {calls:5d} {len(sent):7d} {right / calls:6.3f} {prec}")
    return lines


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspaces", type=Path, nargs="+", help="the first is the baseline")
    ap.add_argument("--per-task", action="store_true")
    args = ap.parse_args()
    spaces = [Workspace.at(p) for p in args.workspaces]
    routers = [load_router(ws.router_dir()) for ws in spaces]
    share = routers[0].meta.held_out_share
    assert all(r.meta.held_out_share == share for r in routers), "different holdout_share"
    requests, truth = held_out(spaces[0], share)
    assert all(ws.assignments() == spaces[0].assignments() for ws in spaces[1:]), (
        "the workspaces' clusterings differ: their routers cannot be compared"
    )
    print(
        f"{args.workspaces[0]}: {len(requests)} held-out calls (hash_unit < {share}); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    decisions, times, embedded = time_routes(routers, requests)
    p50, p99 = np.percentile(times, 50, axis=1), np.percentile(times, 99, axis=1)
    names = ["+".join(router_blocks(r.meta)) or "(none)" for r in routers]
    width = max(28, *map(len, names))
    print(
        f"  {'features':{width}s} {'acc':>6s} {'routed':>6s} {'prec':>6s} | {'acc':>6s}"
        f" {'routed':>6s} {'prec':>6s} | {'p50 ms':>7s} {'p99 ms':>7s} {'x p50':>6s}"
        f" {'x p99':>6s} | {'MiniLM':>6s} {'p50':>5s} {'p99':>5s}"
    )
    for i, (ws, router) in enumerate(zip(spaces, routers, strict=True)):
        h = router.meta.holdout
        hits = [d == t for d, t in zip(decisions[i], truth, strict=True)]
        sent = [h_ for h_, d in zip(hits, decisions[i], strict=True) if d is not None]
        rest = times[i][~embedded[i]]
        without = " ".join(f"{np.percentile(rest, q):5.2f}" for q in (50, 99)) if len(rest) else ""
        print(
            f"  {names[i]:{width}s} {h['accuracy']:6.3f} {h['routed_share']:6.3f} "
            f"{h['accuracy_when_routed'] or 0:6.3f} | {np.mean(hits):6.3f} "
            f"{len(sent) / len(hits):6.3f} {np.mean(sent) if sent else 0:6.3f} | "
            f"{p50[i]:7.2f} {p99[i]:7.2f} {p50[i] / p50[0]:6.2f} {p99[i] / p99[0]:6.2f} | "
            f"{embedded[i].mean():6.3f} {without}   ({ws.root})"
        )
    print(
        "  (acc / routed / prec: router.json's holdout | recomputed from these routes; MiniLM:"
        " share of calls it ran on, then p50 / p99 ms of the calls it did not)"
    )
    if args.per_task:
        for i, router in enumerate(routers):
            print(f"\n  per task, {'+'.join(router_blocks(router.meta))}: held-out calls")
            print("\n".join(per_task(decisions[i], truth)))


if __name__ == "__main__":
    main()
