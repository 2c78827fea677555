"""Describe discovered task types: stable ids, readable labels, sizes, cost and value.

Given the calls of each cluster, builds one `TaskCluster` per cluster: a label from its
most distinguishing terms (class-based TF-IDF over the calls' varying text, as BERTopic
does), the tools it calls and its output shape; representative calls (nearest the
centroid); calls, share, input and output tokens and the LLM cost they represent; how
varied its outputs are; and a value score that ranks the tasks by what moving them to
a small model is worth.

Ids read `t03-extract-order-fields`. On a fresh workspace they are numbered by size; when
a previous run's assignments exist, a cluster that still holds most of an old task's
calls (and is mostly made of them) keeps that task's id, so later stages and drift
tracking follow a task over time; new clusters take the next free numbers.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slmify.features import CallView
from slmify.schema import OutputShape, TaskCluster


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, description="USD per million input tokens.")
    output: float = Field(ge=0, description="USD per million output tokens.")


# List prices in USD per million tokens (OpenAI and Anthropic pages, 2025). A model not
# here is priced by its longest listed prefix, else `default`; recipes override any row.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    name: ModelPrice(input=i, output=o)
    for name, (i, o) in {
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4o": (2.50, 10.00),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1": (2.00, 8.00),
        "gpt-4-turbo": (10.00, 30.00),
        "gpt-4": (30.00, 60.00),
        "gpt-3.5-turbo-16k": (3.00, 4.00),
        "gpt-3.5-turbo": (0.50, 1.50),
        "o3-mini": (1.10, 4.40),
        "claude-3-5-haiku": (0.80, 4.00),
        "claude-3-5-sonnet": (3.00, 15.00),
        "claude-sonnet-4": (3.00, 15.00),
        "default": (2.50, 10.00),
    }.items()
}
# How readily a small model matches the LLM on an output shape: constrained outputs
# (a label, a tool call, JSON) are learned from few examples, free text is graded harder.
SHAPE_EASE: dict[str, float] = {"label": 1.0, "tool_call": 0.9, "json": 0.9, "text": 0.6}
ID_PATTERN = re.compile(r"^t(\d+)-")


def price_of(model: str, prices: dict[str, ModelPrice]) -> ModelPrice:
    if model in prices:
        return prices[model]
    prefixes = [p for p in prices if p != "default" and model.startswith(p)]
    return prices[max(prefixes, key=len)] if prefixes else prices["default"]


def output_diversity(outputs: list[str], seed: int, sample: int = 100) -> float:
    """Mean pairwise Jaccard distance of the outputs' word sets: 0 all alike, 1 disjoint."""
    if len(outputs) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(outputs), min(sample, len(outputs)), replace=False)
    sets = [set(re.findall(r"\w+", outputs[i].lower())) for i in picked]
    dists = [
        1.0 - len(a & b) / len(a | b) if a | b else 0.0
        for i, a in enumerate(sets)
        for b in sets[i + 1 :]
    ]
    return float(np.mean(dists))


def top_terms(docs: list[str], n: int = 5) -> list[list[str]]:
    """The `n` most distinguishing words of each document (class-based TF-IDF)."""
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        vec = CountVectorizer(
            stop_words="english",
            token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z_]{2,}\b",
            max_features=50000,
        )
        counts = vec.fit_transform(docs).astype(np.float64)
    except ValueError:  # no words at all (only stop words or symbols)
        return [[] for _ in docs]
    tf = counts.multiply(1.0 / np.maximum(counts.sum(axis=1), 1)).tocsr()
    avg_words = counts.sum() / len(docs)
    idf = np.log1p(avg_words / np.asarray(counts.sum(axis=0)).ravel())
    scores = tf.multiply(idf).toarray()
    vocab = vec.get_feature_names_out()
    return [[vocab[j] for j in np.argsort(-row)[:n] if row[j] > 0] for row in scores]


def describe_tasks(
    views: list[CallView],
    labels: np.ndarray,
    features: np.ndarray,
    prices: dict[str, ModelPrice],
    previous: dict[str, str],
    seed: int,
    representatives: int = 5,
) -> tuple[list[TaskCluster], list[str | None]]:
    """One TaskCluster per label >= 0, ranked by value; and each call's task id or None."""
    clusters = sorted(
        (np.flatnonzero(labels == c) for c in set(labels.tolist()) - {-1}),
        key=lambda m: (-len(m), m[0]),
    )
    # 500 calls name a cluster as well as all of them, at a bounded cost on 100,000.
    docs = [
        "\n".join(f"{views[i].inputs.task_text}\n{views[i].inputs.turn_text}" for i in m[:500])
        for m in clusters
    ]
    terms = top_terms(docs)
    ids = stable_ids(
        [[views[i].id for i in m] for m in clusters],
        [_slug(views, m, t) for m, t in zip(clusters, terms, strict=True)],
        previous,
    )
    total = len(views)
    tasks = []
    for task_id, members, words in zip(ids, clusters, terms, strict=True):
        tasks.append(
            _task(task_id, members, words, views, features, prices, total, seed, representatives)
        )
    task_of: list[str | None] = [None] * total
    for task, members in zip(tasks, clusters, strict=True):
        for i in members:
            task_of[i] = task.id
    tasks.sort(key=lambda t: (-t.value_score, t.id))
    return tasks, task_of


def _task(
    task_id: str,
    members: np.ndarray,
    words: list[str],
    views: list[CallView],
    features: np.ndarray,
    prices: dict[str, ModelPrice],
    total: int,
    seed: int,
    representatives: int,
) -> TaskCluster:
    calls = [views[i] for i in members]
    shape: OutputShape = Counter(c.output_shape for c in calls).most_common(1)[0][0]
    tools = [
        t
        for t, _ in Counter(c.action for c in calls if c.output_shape == "tool_call").most_common(5)
    ]
    cost = (
        sum(
            c.input_tokens * price_of(c.model, prices).input
            + c.output_tokens * price_of(c.model, prices).output
            for c in calls
        )
        / 1e6
    )
    diversity = output_diversity([c.output_text for c in calls], seed)
    centroid = features[members].mean(axis=0)
    nearest = members[np.argsort(((features[members] - centroid) ** 2).sum(axis=1))]
    what = ", ".join(tools[:2]) if tools else f"{shape} output"
    return TaskCluster(
        id=task_id,
        label=f"{what}: {', '.join(words[:3])}" if words else what,
        top_terms=words,
        tools=tools,
        output_shape=shape,
        calls=len(calls),
        share=round(len(calls) / total, 4),
        input_tokens=sum(c.input_tokens for c in calls),
        output_tokens=sum(c.output_tokens for c in calls),
        tokens_estimated=any(c.tokens_estimated for c in calls),
        llm_cost_usd=round(cost, 4),
        output_diversity=round(diversity, 3),
        value_score=round(cost * SHAPE_EASE[shape] * (1 - diversity / 2), 4),
        representatives=[views[i].id for i in nearest[:representatives]],
    )


def _slug(views: list[CallView], members: np.ndarray, words: list[str]) -> str:
    top_action = Counter(views[i].action for i in members).most_common(1)[0][0]
    # A tool name says what the task is; an output shape alone needs the terms beside it.
    parts = [top_action, *words[:2]] if top_action in SHAPE_EASE else [top_action]
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return slug[:40].rstrip("-") or "task"


def stable_ids(members: list[list[str]], slugs: list[str], previous: dict[str, str]) -> list[str]:
    """Ids for clusters (largest first): a previous task's id where the cluster is mostly
    that task's calls and holds most of them; else the next free number and its slug."""
    from scipy.optimize import linear_sum_assignment

    ids: list[str | None] = [None] * len(members)
    old_ids = sorted(set(previous.values()))
    if old_ids and members:
        current = {c for m in members for c in m}
        old_size = Counter(t for c, t in previous.items() if c in current)
        overlap = np.zeros((len(members), len(old_ids)))
        col = {t: j for j, t in enumerate(old_ids)}
        for i, m in enumerate(members):
            for c in m:
                if c in previous:
                    overlap[i, col[previous[c]]] += 1
        for i, j in zip(*linear_sum_assignment(-overlap), strict=True):
            seen = sum(c in previous for c in members[i])
            if overlap[i, j] > 0.5 * seen and overlap[i, j] > 0.5 * old_size[old_ids[j]]:
                ids[i] = old_ids[j]
    numbers = [int(m.group(1)) for t in old_ids if (m := ID_PATTERN.match(t))]
    next_number = max(numbers, default=0) + 1
    for i, slug in enumerate(slugs):
        if ids[i] is None:
            ids[i] = f"t{next_number:02d}-{slug}"
            next_number += 1
    return [i for i in ids if i is not None]
