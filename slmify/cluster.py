"""S3 cluster: discover the agent's recurring task types, and fit the runtime router.

Reads the store's calls with status ok that curation did not mark duplicate or excluded
(all ok calls when curation has not run) and writes WORKSPACE/cluster/:

- tasks.json         {"schema_version": 1, "tasks": [TaskCluster...]}, ranked by value;
- router/            the runtime router (`slmify.router.load_router`);
- report.html, report.json, and config.yaml (the resolved recipe and run metadata);

and WORKSPACE/assignments.jsonl, one line per call, {"id": call id, "task": task id or
null}; null means the call fits no task and stays with the LLM. The folder is written to
a staging folder and swapped in at the end, the assignments to a temp file then renamed,
so a failed run leaves the previous results whole. The steps are numbered in `cluster_store`.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans

from slmify.embed import DEFAULT_MODEL, Embedder, embed_cached
from slmify.errors import SlmifyError
from slmify.features import (
    INPUT_SHAPES,
    CallView,
    Projection,
    input_shape,
    load_views,
    onehot,
    strip_boilerplate,
)
from slmify.router import Router, fit_router
from slmify.schema import TaskCluster
from slmify.schema_stages import ClusterSummary
from slmify.store import Store
from slmify.tasks import DEFAULT_PRICES, ModelPrice, describe_tasks
from slmify.workspace import Workspace, cluster_page_file

# Constructors taking (number of clusters or None, config); any object with `fit` and
# `labels_` (-1 = noise) fits the slot.
CLUSTERERS: dict[str, Callable[[int | None, Any], Any]] = {
    "kmeans": lambda k, cfg: KMeans(n_clusters=k, n_init=3, random_state=cfg.seed),
    "agglomerative": lambda k, cfg: AgglomerativeClustering(n_clusters=k, linkage="ward"),
    "hdbscan": lambda k, cfg: HDBSCAN(min_cluster_size=cfg.min_cluster_calls),
}


class ClusterError(SlmifyError, ValueError):
    """Input that cannot be clustered; the message says why and what to do."""


class FeatureWeights(BaseModel):
    """How much each unit-norm feature block counts in the distance between two calls."""

    model_config = ConfigDict(extra="forbid")

    # Discrete blocks weigh most: a different agent or a different action is a different
    # task whatever the words; the embeddings then split calls that act alike.
    identity: float = Field(3.0, ge=0)
    action: float = Field(3.0, ge=0)
    input_shape: float = Field(1.0, ge=0)
    task_text: float = Field(0.3, ge=0)
    turn_text: float = Field(0.2, ge=0)


class ClusterConfig(BaseModel):
    """The `cluster:` recipe (recipes/cluster.yaml documents each knob)."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str = DEFAULT_MODEL
    max_seq_length: int = Field(128, ge=16, le=512)
    embedding_dims: int = Field(32, ge=2)
    weights: FeatureWeights = Field(default_factory=FeatureWeights)
    algorithm: str = "kmeans"
    n_clusters: int | None = Field(None, ge=2)
    max_clusters: int = Field(30, ge=2)
    min_cluster_calls: int = Field(10, ge=2)
    outlier_iqr: float = Field(3.0, gt=0)
    sample_size: int = Field(5000, ge=100)
    seed: int = 0
    router_min_confidence: float = Field(0.5, ge=0, le=1)
    # The turn's n-grams alone: as accurate as its embedding or more (tau-airline held out
    # 0.69 vs 0.57, fireact and the demo 1.00 all), and no MiniLM pass on the turn (p50
    # 0.8 ms vs 12 ms); with the embedding too, tau reaches 0.71 (bench/bench_router.py).
    # The task statement's n-grams instead of its embedding: no MiniLM at all (p99 0.8-1.3
    # ms vs 13-31 ms) and held out as accurate (tau 0.692 vs 0.687, the others 1.00); tau's
    # routed share falls to 0.875 from 0.891 but what it routes is righter (0.777 vs
    # 0.759), and only what is right can be served. The agent's last message's n-grams
    # too ("please confirm (yes)" before the user's "yes"): tau held out 0.709 vs 0.692,
    # routed 0.887 vs 0.875, right when routed 0.788 vs 0.777, p50 0.6 ms vs 0.5; FireAct
    # and the demo unchanged (1.000; the demo's calls have no assistant message): the
    # default.
    router_features: list[
        Literal["task_embedding", "task_ngrams", "turn_embedding", "turn_ngrams", "reply_ngrams"]
    ] = Field(
        default_factory=lambda: ["task_ngrams", "turn_ngrams", "reply_ngrams"],
        description="What the router reads of the task statement and of the last turn: "
        "their MiniLM embeddings (a model pass per task statement, per call for the turn) "
        "and/or the TF-IDF of their word 1-2-grams (no model pass); reply_ngrams: the "
        "TF-IDF of the agent's last assistant message; without an embedding the router "
        "never loads MiniLM.",
    )
    holdout_share: float = Field(
        0.35,
        gt=0,
        lt=1,
        description="Sessions placed below this (datasets.hash_unit, the train stage's split "
        "hash) are never fitted by the router and score it: keep it at the train recipe's "
        "dataset.test_fraction + calibration_fraction so eval replays only unseen sessions.",
    )
    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    @field_validator("algorithm")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in CLUSTERERS:
            raise ValueError(f"unknown algorithm {v!r}; choose one of {sorted(CLUSTERERS)}")
        return v


def load_cluster_config(name_or_path: str = "default", overrides: list[str] = ()) -> ClusterConfig:
    """A shipped recipe (recipes/cluster/NAME.yaml) or a YAML file, with `key=value`
    overrides; ClusterError names the file and the key."""
    from slmify.recipes import RECIPES_DIR, RecipeError, apply_override, describe_errors

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = RECIPES_DIR / "cluster" / f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ClusterError(f"cannot read cluster recipe {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ClusterError(f"{path}: a cluster recipe is a mapping of settings")
    try:
        for item in overrides:
            apply_override(raw, item)
        return ClusterConfig.model_validate(raw)
    except RecipeError as e:
        raise ClusterError(str(e)) from None
    except ValidationError as e:
        raise ClusterError(f"{path}: {describe_errors(e)}") from None


# -- 1. the calls ---------------------------------------------------------------------------


def check_input(views: list[CallView], config: ClusterConfig, location: str) -> None:
    n = len(views)
    if n == 0:
        raise ClusterError(
            f"no calls to cluster in {location}: the store holds no ok call that curation "
            "kept; import logs first with `slmify collect import FILE`"
        )
    k = config.n_clusters or 2
    if n < max(k, 3):
        raise ClusterError(
            f"{n} call(s) to cluster in {location} but {k} clusters were asked for: "
            "collect more calls or lower n_clusters in the recipe"
        )
    if all(not (v.inputs.task_text or v.inputs.turn_text or v.output_text) for v in views):
        raise ClusterError(
            f"none of the {n} calls in {location} has any text (messages and answers are "
            "empty): there is nothing to cluster"
        )


# -- 4. clustering --------------------------------------------------------------------------


def cluster_matrix(views: list[CallView], task_vecs, turn_vecs, w: FeatureWeights) -> np.ndarray:
    """Weighted blocks: identity, action, input shape, task and turn embeddings."""
    identities = sorted({v.inputs.identity for v in views})
    actions = sorted({v.action for v in views})
    return np.hstack(
        [
            w.identity * onehot([v.inputs.identity for v in views], identities),
            w.action * onehot([v.action for v in views], actions),
            w.input_shape
            * onehot([input_shape(v.inputs.task_text) for v in views], list(INPUT_SHAPES)),
            w.task_text * task_vecs,
            w.turn_text * turn_vecs,
        ]
    ).astype(np.float32)


def choose_k(X: np.ndarray, config: ClusterConfig) -> tuple[int, float]:
    """The number of clusters with the best silhouette (on at most 3,000 calls)."""
    from sklearn.metrics import silhouette_score

    top = min(config.max_clusters, len(X) - 1)
    # Every k up to 12, then coarser: past a dozen the silhouette curve is flat.
    grid = [k for k in [*range(2, 13), 15, 20, 25, 30, 40, 50] if k <= top] or [2]
    best = (grid[0], -1.0)
    for k in grid:
        labels = CLUSTERERS[config.algorithm](k, config).fit(X).labels_
        if len(set(labels)) < 2:
            continue
        score = float(
            silhouette_score(X, labels, sample_size=min(len(X), 3000), random_state=config.seed)
        )
        if score > best[1] + 1e-6:
            best = (k, score)
    return best


def fit_labels(X: np.ndarray, config: ClusterConfig) -> tuple[np.ndarray, int, float | None]:
    """Cluster ids per call (-1: unassigned), the number of clusters, the silhouette.

    The clusterer is fitted on at most `sample_size` calls; every call then joins the
    nearest centroid, so 100,000 calls cost one pass of distances, not a bigger fit.
    """
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(len(X), min(len(X), config.sample_size), replace=False))
    k, silhouette = config.n_clusters, None
    if k is None and config.algorithm != "hdbscan":
        k, silhouette = choose_k(X[sample], config)
    fitted = CLUSTERERS[config.algorithm](k, config).fit(X[sample]).labels_
    found = sorted(set(fitted.tolist()) - {-1})
    if not found:
        return np.full(len(X), -1), 0, silhouette
    centroids = np.stack([X[sample][fitted == c].mean(axis=0) for c in found])
    labels, dist = nearest(X, centroids)
    labels[sample[fitted == -1]] = -1  # noise stays noise
    labels = drop_outliers(labels, dist, config)
    return labels, len(found), silhouette


def nearest(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, dists = np.empty(len(X), dtype=int), np.empty(len(X))
    c2 = (centroids**2).sum(axis=1)
    for i in range(0, len(X), 20000):
        d = c2 - 2 * X[i : i + 20000] @ centroids.T  # |x|^2 is the same for every centroid
        labels[i : i + 20000] = d.argmin(axis=1)
        dists[i : i + 20000] = np.sqrt(
            np.maximum(d.min(axis=1) + (X[i : i + 20000] ** 2).sum(axis=1), 0)
        )
    return labels, dists


def drop_outliers(labels: np.ndarray, dist: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Unassign calls far out of their cluster (beyond Q3 + outlier_iqr * IQR of its
    distances to the centroid) and whole clusters smaller than min_cluster_calls."""
    labels = labels.copy()
    for c in set(labels.tolist()) - {-1}:
        members = np.flatnonzero(labels == c)
        q1, q3 = np.percentile(dist[members], [25, 75])
        labels[members[dist[members] > q3 + config.outlier_iqr * (q3 - q1)]] = -1
        if (labels == c).sum() < config.min_cluster_calls:
            labels[labels == c] = -1
    return labels


# -- the stage ------------------------------------------------------------------------------


def cluster_store(
    store: Store, ws: Workspace, config: ClusterConfig, progress: bool = False
) -> ClusterSummary:
    """Discover task types in the store's calls; write WORKSPACE/cluster/; return a summary
    (also kept in cluster/report.json)."""
    started = time.perf_counter()
    # 1. The calls; the embedder's tokenizer estimates tokens where the logs lack usage.
    embedder = Embedder(config.embedding_model, config.max_seq_length)
    views = load_views(store, embedder.count_tokens)
    check_input(views, config, store.location)
    # 2. Keep what varies: each agent's boilerplate lines are dropped before embedding.
    views, shared = strip_boilerplate(views)
    # 3. Embed task statements and last turns; the store caches vectors by text hash.
    n = len(views)
    texts = [v.inputs.task_text for v in views] + [v.inputs.turn_text for v in views]
    t_embed = time.perf_counter()
    vectors, embedded = _embed(store, embedder, texts, progress)
    t_embed = time.perf_counter() - t_embed
    task_raw, turn_raw = vectors[:n], vectors[n:]
    # 4-6. Cluster, describe the tasks, fit the router.
    t_cluster = time.perf_counter()
    previous = ws.assigned() if ws.assignments_file().exists() else {}
    found = discover(views, task_raw, turn_raw, shared, config, previous)
    t_cluster = time.perf_counter() - t_cluster
    # 7. Write everything to a staging folder, then swap it in.
    final = ws.cluster_dir()
    tasks, task_of, router = found.tasks, found.task_of, found.router
    unassigned = sum(t is None for t in task_of)
    summary = ClusterSummary(
        calls=n,
        tasks=len(tasks),
        unassigned=unassigned,
        unassigned_share=round(unassigned / n, 4),
        algorithm=config.algorithm,
        clusters_found=found.clusters,
        silhouette=None if found.silhouette is None else round(found.silhouette, 4),
        embedded=embedded,
        embeddings_cached=len(set(texts)) - embedded,
        tokens=f"estimated with the {config.embedding_model} tokenizer (logs lack usage)"
        if any(v.tokens_estimated for v in views)
        else "from logged usage",
        router_holdout=router.meta.holdout,
        embed_seconds=round(t_embed, 2),
        cluster_seconds=round(t_cluster, 2),  # with describing and the router
        seconds=round(time.perf_counter() - started, 2),
        tasks_path=str(ws.tasks_file()),
        assignments=str(ws.assignments_file()),
        report=str(cluster_page_file(final)),
        router=str(ws.router_dir()),
    )
    _write(ws, final, config, summary, tasks, views, task_of, router, found.features)
    return summary


@dataclass
class Discovery:
    features: np.ndarray
    clusters: int
    silhouette: float | None
    tasks: list[TaskCluster]
    task_of: list[str | None]
    router: Router


def discover(
    views: list[CallView],
    task_raw: np.ndarray,
    turn_raw: np.ndarray,
    shared: dict[str, set[str]],
    config: ClusterConfig,
    previous: dict[str, str],
) -> Discovery:
    """Steps 4-6 on embedded calls (the bench runs them on 100,000 replicated calls)."""
    # 4. Weighted feature blocks, clustered; far-out calls and tiny clusters unassigned.
    projections = tuple(
        Projection.fit(v, config.embedding_dims, config.seed) for v in (task_raw, turn_raw)
    )
    X = cluster_matrix(views, projections[0](task_raw), projections[1](turn_raw), config.weights)
    labels, k, silhouette = fit_labels(X, config)
    # 5. Name and measure each task; ids follow the previous run's tasks where they persist.
    prices = {**DEFAULT_PRICES, **config.prices}
    tasks, task_of = describe_tasks(views, labels, X, prices, previous, config.seed)
    # 6. The router, from input-only features, scored on held-out sessions.
    settings = {
        "embedding_model": config.embedding_model,
        "max_seq_length": config.max_seq_length,
        "min_confidence": config.router_min_confidence,
        "shared_lines": {ident: sorted(keys) for ident, keys in shared.items()},
        # A fixed order, whatever the recipe's: the feature blocks follow it.
        "features": [f for f in ("turn_embedding", "turn_ngrams") if f in config.router_features],
        "task_features": [
            f for f in ("task_embedding", "task_ngrams") if f in config.router_features
        ],
    }
    router = fit_router(
        views,
        task_of,
        task_raw,
        turn_raw,
        projections,
        settings,
        config.holdout_share,
        config.seed,
        reply_ngrams="reply_ngrams" in config.router_features,
    )
    return Discovery(X, k, silhouette, tasks, task_of, router)


def _embed(store: Store, embedder: Embedder, texts: list[str], progress: bool):
    if not progress:
        return embed_cached(store, embedder, texts)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("embedding", total=None)
        return embed_cached(
            store, embedder, texts, lambda done, total: bar.update(task, advance=done, total=total)
        )


def _write(ws, final, config, summary, tasks, views, task_of, router, features) -> None:
    from slmify.report import write_report

    staging = ws.root / ".cluster-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ws.write_tasks(tasks, staging)
    router.save(staging / "router")
    write_report(staging, summary, tasks, features, task_of)
    meta = {
        "config": config.model_dump(mode="json"),
        "python": platform.python_version(),
        "summary": summary.model_dump(mode="json"),
    }
    (staging / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    old = ws.root / ".cluster-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    ws.write_assignments({v.id: t for v, t in zip(views, task_of, strict=True)})
