"""What `slmify cluster` finds and what it costs, on the real logs and on 100,000 calls.

For fireact (label `task`) and tau-airline (label `next_action`), in a work folder that
keeps its stores between runs (the embedding cache makes a rerun cheap; give a fresh
folder for a cold run), prints:

1. V-measure (homogeneity / completeness) and unassigned % of the default recipe against
   the labels, beside the baseline computed in the same run: MiniLM embeddings of the
   whole conversation (request messages, 256 word pieces) + k-means with the true k;
2. the router's accuracy on held-out sessions (against the clustering's assignment);
3. embedding throughput on 256 real texts embedded afresh (no cache), clustering
   throughput (calls / seconds of clustering, describing and fitting the router), and
   the saved router's decision time per request (p50 / p95);
4. 100,000 calls: both sets' calls replicated (ids and sessions suffixed; their
   embeddings reused, as the store's cache would serve them, so replicas cost no
   embedding) through the clustering stage: time, and peak resident memory above the
   process's memory before the stage (sampled every 20 ms).

Labels are read here to measure, never by slmify.

    .venv/bin/python bench/bench_cluster.py [WORKDIR]   # default /tmp/slmify-bench-cluster
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import homogeneity_completeness_v_measure

from slmify.cluster import ClusterConfig, cluster_store, discover
from slmify.collect import import_files
from slmify.embed import Embedder, embed_cached
from slmify.features import load_views, shared_lines, strip_boilerplate
from slmify.router import load_router
from slmify.schema import message_text
from slmify.store import open_store
from slmify.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SETS = {"fireact": "task", "tau-airline": "next_action"}
BIG = 100_000


def labels(name: str) -> dict[str, str]:
    with open(DATASETS / name / "labels.jsonl", encoding="utf-8") as f:
        return {r["id"]: r[SETS[name]] for r in map(json.loads, f)}


def baseline(store, ids: list[str], truth: list[str]) -> tuple[float, float, float]:
    """MiniLM on the whole conversation, k-means with the true number of labels."""
    embedder = Embedder(max_seq_length=256)
    convo = {}
    for s in store.iter_calls():
        msgs = s.record.request.messages
        convo[s.record.id] = "\n".join(
            f"{m['role']}: {message_text(m.get('content'))}" for m in msgs
        )
    vecs, _ = embed_cached(store, embedder, [convo[i] for i in ids])
    k = len(set(truth))
    pred = KMeans(n_clusters=k, n_init=3, random_state=0).fit(vecs).labels_
    return homogeneity_completeness_v_measure(truth, pred)


def run_set(name: str, workdir: Path) -> dict:
    ws = Workspace.resolve(workdir / name)
    with open_store(ws.store_url) as st:
        if st.count_calls() == 0:
            import_files(st, [DATASETS / name / "calls.jsonl.gz"], ws.path("rejects.jsonl"))
        summary = cluster_store(st, ws, ClusterConfig()).model_dump()
        rows = [json.loads(x) for x in (ws.root / "assignments.jsonl").read_text().splitlines()]
        truth_of = labels(name)
        ids, truth = [r["id"] for r in rows], [truth_of[r["id"]] for r in rows]
        ours = homogeneity_completeness_v_measure(truth, [r["task"] or "-" for r in rows])
        base = baseline(st, ids, truth)
    hold = summary["router_holdout"]
    print(
        f"{name:12s} calls {summary['calls']:5d}  tasks {summary['tasks']:2d}  "
        f"V {ours[2]:.3f} (h {ours[0]:.3f} c {ours[1]:.3f})  "
        f"unassigned {summary['unassigned_share']:.1%}  | baseline V {base[2]:.3f}\n"
        f"{'':12s} router held-out accuracy {hold['accuracy']:.3f} on "
        f"{hold['test_calls']} calls of {hold['test_sessions']} sessions "
        f"(routed {hold['routed_share']:.1%}, accuracy when routed "
        f"{hold['accuracy_when_routed']:.3f})  |  clustering "
        f"{summary['calls'] / summary['cluster_seconds']:.0f} calls/s, "
        f"embedded now {summary['embedded']}, cached {summary['embeddings_cached']}"
    )
    return {"ws": ws}


def embedding_rate(workdir: Path) -> None:
    embedder = Embedder()
    with open_store(Workspace.resolve(workdir / "tau-airline").store_url) as st:
        texts = [
            message_text(m.get("content"))[:2000]
            for s in st.iter_calls()
            for m in s.record.request.messages[-1:]
        ][:256]
    embedder.encode(texts[:8])  # warm-up: first call pays for lazy initialisation
    started = time.perf_counter()
    embedder.encode(texts)
    rate = len(texts) / (time.perf_counter() - started)
    # A call embeds two texts (task statement, last turn); sessions share the first.
    print(f"embedding    {rate:.0f} texts/s on CPU, so <= {rate / 2:.0f} new calls/s")


def route_latency(workdir: Path, n: int = 300) -> None:
    """p50 / p95 of `router.route` on real requests in log order (sessions repeat their
    task statement, as live traffic does), the model loaded beforehand."""
    for name in SETS:
        ws = Workspace.resolve(workdir / name)
        router = load_router(ws.root / "cluster" / "router")
        with open_store(ws.store_url) as st:
            requests = [s.record.request for s in st.iter_calls()][:n]
        router.route(requests[0])  # loads the embedding model
        times = []
        for request in requests:
            started = time.perf_counter()
            router.route(request)
            times.append((time.perf_counter() - started) * 1000)
        p50, p95 = np.percentile(times, [50, 95])
        print(f"route        {name:12s} p50 {p50:.1f} ms  p95 {p95:.1f} ms over {n} requests")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def big_run(workdir: Path) -> None:
    config = ClusterConfig()
    views, vecs = [], []
    for name in SETS:
        ws = Workspace.resolve(workdir / name)
        with open_store(ws.store_url) as st:
            embedder = Embedder()
            loaded = load_views(st, embedder.count_tokens)
            loaded, _ = strip_boilerplate(loaded)
            views += loaded
            texts = [v.inputs.task_text for v in views[-len(loaded) :]]
            texts += [v.inputs.turn_text for v in views[-len(loaded) :]]
            got, fresh = embed_cached(st, embedder, texts)
            assert fresh == 0, "the real runs above cache every text"
            vecs.append(got.reshape(2, len(loaded), -1))
    task_raw = np.concatenate([v[0] for v in vecs])
    turn_raw = np.concatenate([v[1] for v in vecs])
    reps = -(-BIG // len(views))
    big = [
        replace(v, id=f"{v.id}#{r}", session=f"{v.session}#{r}") for r in range(reps) for v in views
    ][:BIG]
    idx = np.arange(BIG) % len(views)
    task_big, turn_big = task_raw[idx], turn_raw[idx]
    shared = shared_lines([v.inputs for v in views])

    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    found = discover(big, task_big, turn_big, shared, config, {})
    seconds = time.perf_counter() - started
    done.set()
    unassigned = sum(t is None for t in found.task_of)
    print(
        f"100k calls   {BIG} calls (fireact + tau-airline x{reps}, embeddings cached): "
        f"{seconds:.1f} s to cluster, describe and fit the router "
        f"({BIG / seconds:.0f} calls/s), peak memory +{peak[0] - base:.0f} MB over "
        f"{base:.0f} MB; {len(found.tasks)} tasks, unassigned {unassigned / BIG:.1%}"
    )


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slmify-bench-cluster")
    for name in SETS:
        run_set(name, workdir)
    embedding_rate(workdir)
    route_latency(workdir)
    big_run(workdir)


if __name__ == "__main__":
    main()
