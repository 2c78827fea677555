"""How far the cluster stage's router can be trusted, with a per-task calibrated threshold.

On one dataset of ../shared/datasets (tau-airline or fireact), in a workspace the CLI
imported, curated and clustered (`slmify collect import --curate`, `slmify cluster`; a
workspace that already has cluster/router/ is reused as is), this refits the router the
cluster stage fits (slmify.router: the same input features and logistic regression, the
saved router's projections and `router_features`: a router on the last turn's or the task
statement's n-grams has them in every row below, refitted per fold on all its train calls)
on held-out folds and measures it two ways:

- split by session, as `slmify cluster` scores it;
- split by task group: tau-airline's `task_id` label (its 4 trials of one task are
  near-duplicates, so a session split leaks), fireact's question (the same question is
  asked by a ReAct and a chain-of-thought session). Labels choose folds and measure;
  they are never features.

Each fold's groups are the test set, the next fold's the calibration set, the rest train.
Per task, the threshold is the lowest router confidence at which the one-sided Wilson
lower bound of routing precision over the calibration calls routed to that task clears
`--target` (slmify.gate.fit_threshold, as eval calibrates specialists); the test calls
are then routed with it. Right means: routed to task T and the clustering assigned T; the
ground-truth column counts a route right when the call's label is T's majority label.
Figures pool all folds' test calls. The same is printed for candidate extra features
(issue 17), each added alone to the router's, then all of them together
(bench/bench_actions.py adds what the field heads read).

    nice -n 10 .venv/bin/python bench/bench_routing.py [--dataset tau-airline]
        [--workspace /tmp/tau] [--target 0.95] [--folds 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize

from slmify.embed import Embedder, embed_cached
from slmify.features import input_blocks, load_views, strip_boilerplate
from slmify.gate import fit_threshold, wilson_bounds
from slmify.router import LLM, _fit_linear, load_router
from slmify.schema import message_text
from slmify.store import open_store

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
TRUTH = {"tau-airline": "next_action", "fireact": "task"}
MAX_STAGE = 20  # assistant turns so far, one-hot, the long tail pooled


# -- the workspace and the calls -------------------------------------------------------


def prepare_workspace(dataset: str, ws: Path) -> None:
    """Import, curate and cluster through the CLI unless `ws` already has a router."""
    if (ws / "cluster" / "router" / "router.json").is_file():
        return
    cli = [str(Path(sys.executable).with_name("slmify"))]
    calls = DATASETS / dataset / "calls.jsonl.gz"
    for args in (["collect", "import", str(calls), "--curate"], ["cluster"]):
        print("$ slmify", " ".join(args), "-w", ws, flush=True)
        subprocess.run([*cli, *args, "-w", str(ws)], check=True, stdout=subprocess.DEVNULL)


@dataclass
class Calls:
    ids: list[str]
    sessions: list[str]
    task_of: np.ndarray  # the clustering's assignment, LLM where unassigned
    base: np.ndarray  # the router's own input features
    base_no_prev: np.ndarray  # the same without the previous action (an ablation)
    inputs: list  # InputView per call (boilerplate removed, as the router sees it)
    messages: list[list[dict]]  # the request's messages, as stored (scrubbed)
    today: tuple[str, ...]  # the candidates the saved router already reads (its n-grams)


def load_calls(ws: Path) -> Calls:
    """The clustered calls with the router's features, computed as `slmify cluster` does."""
    router = load_router(ws / "cluster" / "router")
    with open_store(str(ws / "calls.db")) as store:
        embedder = Embedder(router.meta.embedding_model, router.meta.max_seq_length)
        views, _ = strip_boilerplate(load_views(store, embedder.count_tokens))
        n = len(views)
        texts = [v.inputs.task_text for v in views] + [v.inputs.turn_text for v in views]
        vecs, _ = embed_cached(store, embedder, texts)
        wanted = {v.id for v in views}
        messages = {
            s.record.id: s.record.request.messages
            for s in store.iter_calls()
            if s.record.id in wanted
        }
    assigned = [json.loads(x) for x in (ws / "assignments.jsonl").read_text().splitlines()]
    task_of = {r["id"]: r["task"] or LLM for r in assigned}
    inputs = [v.inputs for v in views]
    # Vocabularies from all calls, as fit_router builds them before its held-out split.
    identities = sorted({v.identity for v in inputs})
    # The router's own blocks: each embedding only where it reads it.
    task_vecs = None if router.task_proj is None else router.task_proj(vecs[:n])
    turn_vecs = None if router.turn_proj is None else router.turn_proj(vecs[n:])
    previous = sorted({v.previous_action for v in inputs})
    base = input_blocks(inputs, identities, previous, task_vecs, turn_vecs)
    return Calls(
        ids=[v.id for v in views],
        sessions=[v.session for v in views],
        task_of=np.array([task_of[v.id] for v in views]),
        base=base,
        base_no_prev=input_blocks(inputs, identities, [], task_vecs, turn_vecs),
        inputs=inputs,
        messages=[messages[v.id] for v in views],
        today=(("last-turn n-grams",) if router.ngrams is not None else ())
        + (("task-statement n-grams",) if router.task_ngrams is not None else ()),
    )


def read_labels(dataset: str, calls: Calls) -> tuple[np.ndarray, list[str]]:
    """Ground truth per call, and the task group per call (labels: measuring only)."""
    with open(DATASETS / dataset / "labels.jsonl", encoding="utf-8") as f:
        rows = {r["id"]: r for r in map(json.loads, f)}
    truth = np.array([str(rows[i][TRUTH[dataset]]) for i in calls.ids])
    if dataset == "tau-airline":
        return truth, [f"task{rows[i]['task_id']}" for i in calls.ids]
    # fireact has no task id: one question is one task, whichever sessions ask it.
    first_user = {}
    with gzip.open(DATASETS / dataset / "calls.jsonl.gz", "rt", encoding="utf-8") as f:
        for d in map(json.loads, f):
            user = [m for m in d["request"]["messages"] if m["role"] == "user"]
            first_user[d["id"]] = message_text(user[0]["content"]) if user else d["id"]
    return truth, [first_user[i] for i in calls.ids]


# -- candidate features (issue 17) -----------------------------------------------------


def _actions(messages: list[dict]) -> list[str]:
    """Each assistant message's action: the tools it called, else `text`."""
    out = []
    for m in messages:
        if m.get("role") != "assistant":
            continue
        names = sorted({c["function"]["name"] for c in m.get("tool_calls") or []})
        out.append("+".join(names) or "text")
    return out


def _last_tool_result(messages: list[dict]) -> tuple[str, str]:
    """The latest tool message's tool name (via its call id when unnamed) and content."""
    called = {
        c.get("id"): c["function"]["name"]
        for m in messages
        if m.get("role") == "assistant"
        for c in m.get("tool_calls") or []
    }
    for m in reversed(messages):
        if m.get("role") in ("tool", "function"):
            name = m.get("name") or called.get(m.get("tool_call_id"), "unnamed")
            return name, message_text(m.get("content"))
    return "none", ""


def _json_keys(text: str) -> str:
    """The keys of a JSON document, nested ones too, and the length class of its lists."""
    try:
        doc = json.loads(text)
    except ValueError:
        return "NOTJSON" if text else "EMPTY"
    keys: list[str] = []

    def walk(v) -> None:  # noqa: ANN001
        if isinstance(v, dict):
            for k, x in v.items():
                keys.append(f"K_{k}")
                walk(x)
        elif isinstance(v, list):
            keys.append(f"LIST{min(len(v), 5)}")
            for x in v[:3]:
                walk(x)

    walk(doc)
    return " ".join(keys) or "SCALAR"


def _last_assistant_text(messages: list[dict]) -> str:
    """The words of the agent's latest message that had any (what the user answers to)."""
    for m in reversed(messages):
        if m.get("role") == "assistant" and (text := message_text(m.get("content")).strip()):
            return text[-2000:]
    return "NONE"


def candidate_docs(calls: Calls) -> dict[str, list[str]]:
    """Per candidate feature, one whitespace-separated token string per call."""
    docs: dict[str, list[str]] = {k: [] for k in CANDIDATES}
    for msgs, view in zip(calls.messages, calls.inputs, strict=True):
        actions = _actions(msgs)
        tool, result = _last_tool_result(msgs)
        docs["last tool name"].append(f"T_{tool}")
        docs["stage"].append(f"S{min(len(actions), MAX_STAGE)}")
        docs["action before previous"].append(f"A2_{actions[-2] if len(actions) > 1 else 'start'}")
        docs["actions so far"].append(" ".join(f"A_{a}" for a in actions) or "A_none")
        docs["last-turn n-grams"].append(view.turn_text)
        docs["task-statement n-grams"].append(view.task_text)
        docs["tool-result JSON keys"].append(_json_keys(result) if tool != "none" else "NONE")
        docs["previous agent words"].append(_last_assistant_text(msgs))
    return docs


CANDIDATES = (
    "last tool name",
    "stage",
    "action before previous",
    "actions so far",
    "last-turn n-grams",
    "task-statement n-grams",
    "tool-result JSON keys",
    "previous agent words",
)
NGRAM_CANDIDATES = ("last-turn n-grams", "task-statement n-grams", "previous agent words")


def _vectorizer(name: str):  # noqa: ANN202
    if name in NGRAM_CANDIDATES:  # words and word pairs of the whole (2,000-char) text
        return TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=5000)
    return CountVectorizer(binary=True, tokenizer=str.split, lowercase=False, token_pattern=None)


def design(base: np.ndarray, docs: dict[str, list[str]], extra: tuple[str, ...], train):  # noqa: ANN001, ANN201
    """The router's features plus the `extra` blocks, each fitted on train rows only and
    of unit norm per call like the router's own blocks."""
    if not extra:
        return base
    blocks = [sparse.csr_matrix(base)]
    for name in extra:
        vec = _vectorizer(name).fit([docs[name][i] for i in train])
        blocks.append(normalize(vec.transform(docs[name]).astype(np.float32)))
    return sparse.hstack(blocks, format="csr")


# -- folds, fitting, calibration -------------------------------------------------------


def group_folds(groups: list[str], k: int, seed: int) -> np.ndarray:
    """A fold number per call; all calls of one group share a fold."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[j]: rank % k for rank, j in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def calibrate(pred, conf, y, rows, target: float, confidence: float) -> dict[str, float]:  # noqa: ANN001
    """Per task, the lowest threshold whose Wilson lower bound of routing precision over
    the `rows` routed to it clears `target`; tasks that never clear it are left out."""
    out = {}
    for task in sorted(set(pred[rows].tolist()) - {LLM}):
        mine = rows[pred[rows] == task]
        scored = [(float(conf[i]), bool(y[i] == task)) for i in mine]
        threshold, _, _ = fit_threshold(scored, target, confidence)
        if threshold is not None:
            out[task] = threshold
    return out


@dataclass
class Routed:
    """Pooled over folds, per test call: the router's top task, whether the calibrated
    router routes it, whether the fixed min_confidence router does; tasks calibrated."""

    top: np.ndarray
    conf: np.ndarray
    calibrated: np.ndarray
    fixed: np.ndarray
    thresholds: list[dict[str, float]]


def cross_route(calls, docs, extra, folds, args, min_conf: float, more=None) -> Routed:  # noqa: ANN001
    """Each fold tested once: fitted on the other folds less the next, calibrated on it.
    `more(train)`: further features of every call, fitted on the train rows only."""
    n, k = len(calls.ids), args.folds
    y = calls.task_of
    top, top_conf = np.empty(n, dtype=object), np.zeros(n)
    calibrated, fixed = np.zeros(n, bool), np.zeros(n, bool)
    thresholds = []
    base = calls.base_no_prev if extra == ("-previous action",) else calls.base
    # The saved router's n-grams, when it has them, are part of every variant.
    extra = tuple(dict.fromkeys(e for e in calls.today + extra if e in CANDIDATES))
    for f in range(k):
        test, cal = np.flatnonzero(folds == f), np.flatnonzero(folds == (f + 1) % k)
        train = np.flatnonzero((folds != f) & (folds != (f + 1) % k))
        X = design(base, docs, extra, train)
        if more is not None:
            X = sparse.hstack([sparse.csr_matrix(X), sparse.csr_matrix(more(train))], format="csr")
        classes, coef, intercept = _fit_linear(X[train], y[train], args.seed)
        logits = np.asarray(X @ coef.T) + intercept
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        pred, conf = np.array(classes, dtype=object)[probs.argmax(1)], probs.max(1)
        thr = calibrate(pred, conf, y, cal, args.target, args.confidence)
        thresholds.append(thr)
        top[test], top_conf[test] = pred[test], conf[test]
        sent = pred[test] != LLM
        calibrated[test] = sent & np.array(
            [conf[i] >= thr.get(pred[i], np.inf) for i in test], dtype=bool
        )
        fixed[test] = sent & (conf[test] >= min_conf)
    return Routed(top, top_conf, calibrated, fixed, thresholds)


# -- the figures -------------------------------------------------------------------------

VARIANTS = (
    ("router today", ()),
    ("- previous action", ("-previous action",)),
    *((f"+ {c}", (c,)) for c in CANDIDATES),
    (f"+ all {len(CANDIDATES)}", CANDIDATES),
)


def _share(k: int, n: int) -> str:
    return f"{k / n:6.3f}" if n else "     -"


def ideal_routed(r: Routed, y: np.ndarray, target: float) -> int:
    """Calls routable with thresholds chosen on the test calls themselves (an upper
    bound): per task, the most confident calls sent to it whose precision stays >= target."""
    total = 0
    for task in set(r.top.tolist()) - {LLM}:
        mine = np.flatnonzero(r.top == task)
        right = y[mine[np.argsort(-r.conf[mine], kind="stable")]] == task
        ok = np.flatnonzero(np.cumsum(right) >= target * np.arange(1, len(right) + 1))
        total += int(ok[-1] + 1) if len(ok) else 0
    return total


def summary_row(name: str, r: Routed, y, truth, major, args) -> str:  # noqa: ANN001
    """One variant: top-1 accuracy, the fixed-threshold router, the calibrated router."""
    n = len(y)
    hit = r.top == y
    right = int((hit & r.calibrated).sum())
    routed = int(r.calibrated.sum())
    true_right = sum(truth[i] == major.get(r.top[i]) for i in np.flatnonzero(r.calibrated))
    lower = wilson_bounds(right, routed, args.confidence)[0]
    true_lower = wilson_bounds(true_right, routed, args.confidence)[0]
    calibrated = sum(len(t) for t in r.thresholds)
    ideal = ideal_routed(r, y, args.target)
    return (
        f"{name:28s} {hit.mean():6.3f} | {_share(r.fixed.sum(), n)} "
        f"{_share((hit & r.fixed).sum(), r.fixed.sum())} | {calibrated:5d} "
        f"{_share(routed, n)} {_share(right, routed)} {lower:6.3f} "
        f"{_share(true_right, routed)} {true_lower:6.3f} | {_share(ideal, n)}"
    )


def task_table(r: Routed, y, truth, major) -> list[str]:  # noqa: ANN001
    """Per task: its test calls, folds where it got a threshold, what the fixed and the
    calibrated routers send to it and how much of that is right."""
    lines = [
        f"  {'task':34s} {'calls':>5s} {'folds':>5s} | {'routed':>6s} {'prec':>6s} |"
        f" {'routed':>6s} {'share':>6s} {'prec':>6s} {'truth':>6s}"
    ]
    for task in sorted(set(y.tolist()) - {LLM}):
        calls = int((y == task).sum())
        folds = sum(task in t for t in r.thresholds)
        to_me = r.top == task
        fixed, cal = to_me & r.fixed, to_me & r.calibrated
        right_fixed = int((fixed & (y == task)).sum())
        right = int((cal & (y == task)).sum())
        true_right = int((cal & (truth == major[task])).sum())
        lines.append(
            f"  {task:34s} {calls:5d} {folds:5d} | {fixed.sum():6d} "
            f"{_share(right_fixed, fixed.sum())} | {cal.sum():6d} {_share(cal.sum(), calls)} "
            f"{_share(right, cal.sum())} {_share(true_right, cal.sum())}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="tau-airline", choices=sorted(TRUTH))
    ap.add_argument("--workspace", type=Path, help="default /tmp/slmify-bench-routing/DATASET")
    ap.add_argument("--target", type=float, default=0.95, help="routing precision bound")
    ap.add_argument("--confidence", type=float, default=0.95, help="one-sided, as eval's")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ws = args.workspace or Path("/tmp/slmify-bench-routing") / args.dataset
    prepare_workspace(args.dataset, ws)
    calls = load_calls(ws)
    truth, task_groups = read_labels(args.dataset, calls)
    y = calls.task_of
    # A task's ground truth is the label most of its calls carry (measuring only).
    major = {
        t: Counter(truth[y == t].tolist()).most_common(1)[0][0] for t in set(y.tolist()) - {LLM}
    }
    docs = candidate_docs(calls)
    min_conf = load_router(ws / "cluster" / "router").meta.min_confidence
    print(
        f"{args.dataset}: {len(y)} calls, {len(major)} tasks, {(y == LLM).sum()} unassigned; "
        f"{len(set(calls.sessions))} sessions, {len(set(task_groups))} task groups; workspace "
        f"{ws}; {args.folds} folds (train / calibrate / test = {args.folds - 2} / 1 / 1); "
        f"target {args.target} at {args.confidence:.0%} one-sided (Wilson)"
    )
    agree = np.mean([truth[i] == major[t] for i, t in enumerate(y) if t != LLM])
    print(
        f"the clustering's task is its majority label for {agree:.3f} of assigned calls.\n"
        f"columns: top-1 = the router's top class is the clustering's (LLM included); "
        f"@{min_conf} = routed share and precision with the fixed min_confidence of today; "
        f"cal. = (task, fold) pairs whose calibration cleared the target; routed / prec / "
        f"lower = the calibrated router on the test calls, lower its Wilson bound; truth = "
        f"precision against the label; ideal = share routable at precision >= target with "
        f"thresholds chosen on the test calls (an upper bound for any threshold)"
    )
    for split, groups in (("session", calls.sessions), ("task group", task_groups)):
        folds = group_folds(groups, args.folds, args.seed)
        started = time.perf_counter()
        print(f"\n== split by {split}: routed / precision pooled over all test calls")
        print(
            f"{'features':28s} {'top-1':>6s} | {'@' + str(min_conf):>6s} {'prec':>6s} |"
            f" {'cal.':>5s} {'routed':>6s} {'prec':>6s} {'lower':>6s} {'truth':>6s} {'lower':>6s} |"
            f" {'ideal':>6s}"
        )
        tables = {}
        for name, extra in VARIANTS:
            r = cross_route(calls, docs, extra, folds, args, min_conf)
            print(summary_row(name, r, y, truth, major, args), flush=True)
            if name in ("router today", VARIANTS[-1][0]):
                tables[name] = task_table(r, y, truth, major)
        for name, lines in tables.items():
            print(f"\n  per task, {name} (split by {split}):")
            print("\n".join(lines))
        print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
