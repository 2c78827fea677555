"""Fitting a field head (slmify.fieldhead) on a task's training calls.

Reads the task's train and validation calls (a head has no training run to stop early, so
both are training data, as for the label head); decides each leaf's kind, fits the
skeleton choice and every choice / copy leaf, and writes `specialists/<task id>/head/`.
Reports each leaf's kind and its cross-validated accuracy (3 folds over calls) in
metrics.json; a leaf that qualifies as both choice and copy keeps the better of the two.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmify.fieldhead import (
    COPY_MIN,
    MAX_CHOICES,
    MAX_WORDS,
    TOKEN,
    WORD_TOKENS,
    FieldHead,
    FieldHeadError,
    Linear,
    candidate_features,
    candidates,
    char_classes,
    json_type,
    leaves,
    previous_values,
    skeleton,
    structure,
)
from slmify.labelhead import (
    EMBEDDING_MODEL,
    MAX_SEQ_LENGTH,
    blocks,
    cv_folds,
    fit_softmax,
    fit_vocabulary,
    head_texts,
    softmax,
)
from slmify.schema import SCHEMA_VERSION, CallRecord

MIN_FORM_CALLS = 2  # an answer form seen once is not learned (its calls are dropped)
MIN_COVERAGE = 0.9  # share of the calls the kept forms must answer


@dataclass
class Example:
    call: CallRecord
    name: str | None
    form: str
    values: dict[str, Any]


def examples(calls: list[CallRecord]) -> list[Example]:
    """The calls as (form, leaf values); FieldHeadError when too few share a learnable form."""
    out, why = [], Counter()
    for c in calls:
        try:
            name, value = structure(c)
        except FieldHeadError as e:
            why[str(e)] += 1
            continue
        out.append(Example(c, name, skeleton(name, value), dict(leaves(value))))
    counts = Counter(e.form for e in out)
    kept = [e for e in out if counts[e.form] >= MIN_FORM_CALLS]
    if len(kept) < MIN_COVERAGE * len(calls) or not kept:
        reason = f"; {why.most_common(1)[0][1]} {why.most_common(1)[0][0]}" if why else ""
        raise FieldHeadError(
            f"{len(counts)} answer forms: the repeated ones answer {len(kept)} of "
            f"{len(calls)} calls{reason}"
        )
    return kept


def copy_shapes(values: list[Any]) -> dict[str, Any]:
    """What a copied value looks like: its character classes, length and word count, with
    some slack on the length for values longer or shorter than any seen."""
    texts = [str(v) for v in values]
    lengths = [len(t) for t in texts]
    return {
        "classes": sorted({char_classes(t) for t in texts}),
        "min_len": max(1, int(min(lengths) * 0.75)),
        "max_len": int(max(lengths) * 1.35) + 1,
        "max_words": min(MAX_WORDS, max(len(TOKEN.findall(t)) for t in texts)),
        "numbers": all(isinstance(v, int) for v in values),
    }


def fit_field_head(calls: list[CallRecord], seed: int = 0) -> tuple[FieldHead, dict[str, Any]]:
    """The head and, per leaf, its kind and cross-validated accuracy."""
    kept = examples(calls)
    forms = sorted({e.form for e in kept})
    texts = ["\n".join(head_texts(e.call.request)) for e in kept]
    vocabulary, idf = fit_vocabulary(texts, WORD_TOKENS)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": "field-head",
        "embedding_model": EMBEDDING_MODEL,
        "max_seq_length": MAX_SEQ_LENGTH,
        "vocabulary": vocabulary,
        "forms": forms,
        "form_leaves": {
            f: sorted({p for e in kept if e.form == f for p in e.values}) for f in forms
        },
        "leaves": {},
    }
    head = FieldHead(meta, {}, idf)
    embedded: list[np.ndarray] = []

    def dense(rows: list[int]) -> np.ndarray:
        """The choice features of `rows`; the requests are embedded once, and only when a
        choice is fitted (copy and const leaves never read them)."""
        if not embedded:
            embedded.append(head.dense([e.call.request for e in kept]))
        return embedded[0][rows]

    report: dict[str, Any] = {}
    if len(forms) > 1:
        y = np.array([forms.index(e.form) for e in kept])
        X = dense(list(range(len(kept))))
        head.weights["form"], report["form"] = _fit_choice(X, y, len(forms), idf, seed)
    by_path: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(kept):
        for path in e.values:
            by_path[path].append(i)
    for path, rows in sorted(by_path.items()):
        items = [kept[i] for i in rows]
        leaf, weights, report[path] = _fit_leaf(
            path, items, lambda rows=rows: dense(rows), idf, seed
        )
        meta["leaves"][path] = leaf
        if weights is not None:
            head.weights[path] = weights
    return head, report


def _fit_leaf(path, items: list[Example], X: Callable[[], np.ndarray], idf, seed: int):  # noqa: ANN001
    """(leaf description, weights or None, report) for one leaf path; `X()` gives the
    items' choice features."""
    values = [e.values[path] for e in items]
    keys = [json.dumps(v) for v in values]
    distinct = sorted(set(keys))
    if len(distinct) == 1:
        return {"kind": "const", "value": values[0]}, None, {"kind": "const"}
    types = Counter(json_type(v) for v in values)
    kind, _ = types.most_common(1)[0]
    copy_ok, found = False, []
    if kind != "literal":
        shapes = copy_shapes([v for v in values if json_type(v) == kind])
        found = [candidates(e.call.request, shapes) for e in items]
        copied = sum(str(v) in f for v, f in zip(values, found, strict=True))
        copy_ok = copied >= COPY_MIN * len(items)
    choice_ok = len(distinct) <= MAX_CHOICES and len(distinct) <= len(items) / 2
    if not (copy_ok or choice_ok):
        raise FieldHeadError(
            f"{path}: {len(distinct)} distinct values in {len(items)} calls, "
            + (f"{copied} found in the request" if kind != "literal" else "not copyable")
        )
    options = {}  # copy first: on a tie it wins, as it can answer values never seen
    if copy_ok:
        leaf = {"kind": "copy", "type": kind, "shapes": shapes}
        weights, report = _fit_copy(path, items, found, seed)
        options["copy"] = (leaf, weights, report)
    if choice_ok:
        y = np.array([distinct.index(k) for k in keys])
        weights, report = _fit_choice(X(), y, len(distinct), idf, seed)
        options["choice"] = ({"kind": "choice", "classes": distinct}, weights, report)
    best = max(options, key=lambda k: options[k][2]["cv_accuracy"] or 0.0)
    leaf, weights, report = options[best]
    if len(options) > 1:
        report["instead_of"] = {k: v[2]["cv_accuracy"] for k, v in options.items() if k != best}
    return leaf, weights, report


def _fit_choice(X: np.ndarray, y: np.ndarray, classes: int, idf: np.ndarray, seed: int):
    """The label head's softmax regression, its features and C chosen by cross-validation."""
    coef, intercept, chosen = fit_softmax(X, y, classes, blocks(X, idf), seed)
    return Linear(coef, intercept), {"kind": "choice", **chosen}


def _fit_copy(path: str, items: list[Example], found_per_call: list[dict], seed: int):
    """The pointer: logistic regression on candidate features (each call's candidates as
    `_fit_leaf` found them), the LLM's value the positive."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    groups = []  # per call: feature rows and the index of the right candidate (or None)
    for e, by_text in zip(items, found_per_call, strict=True):
        found = list(by_text.values())
        used, same = previous_values(e.call.request, e.name, path)
        rows = [candidate_features(c, used, same) for c in found]
        truth = str(e.values[path])
        groups.append((rows, next((i for i, c in enumerate(found) if c.text == truth), None)))

    def fit(idx: np.ndarray) -> Linear:
        rows = [r for i in idx if groups[i][1] is not None for r in groups[i][0]]
        y = [
            j == groups[i][1]
            for i in idx
            if groups[i][1] is not None
            for j in range(len(groups[i][0]))
        ]
        vec = DictVectorizer(sparse=False)
        Xc = vec.fit_transform(rows).astype(np.float32)
        names = {k: int(v) for k, v in vec.vocabulary_.items()}
        if len(set(y)) < 2:  # one candidate per call: nothing to weigh
            return Linear(np.zeros((1, len(names)), np.float32), np.zeros(1, np.float32), names)
        model = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(Xc, y)
        return Linear(model.coef_.astype(np.float32), model.intercept_.astype(np.float32), names)

    hits, folds = 0, cv_folds(len(groups), seed)
    for test in folds:
        w = fit(np.setdiff1d(np.arange(len(groups)), test) if len(folds) > 1 else test)
        for i in test:
            rows, truth = groups[i]
            if rows and truth is not None:
                hits += int(softmax(w.logits(w.sparse(rows))[:, 0]).argmax() == truth)
    return fit(np.arange(len(groups))), {
        "kind": "copy",
        "cv_accuracy": round(hits / len(groups), 4),
    }


def train_field_head(
    calls: list[CallRecord], ids: set[str], out: Path, min_cv_accuracy: float
) -> tuple[dict[str, Any], str | None]:
    """Fit and save the task's field head (`out`/head/) on the calls named in `ids`;
    metrics, and why not when its answers cannot be assembled by fields or its estimated
    accuracy (the product of its fields' cross-validated accuracies) is below
    `min_cv_accuracy` (the caller trains a LoRA instead)."""
    train = [c for c in calls if c.id in ids]
    start = time.perf_counter()
    try:
        head, leaves_report = fit_field_head(train)
    except FieldHeadError as e:
        return {}, f"no field head: {e}"
    estimate = float(np.prod([r.get("cv_accuracy") or 1.0 for r in leaves_report.values()]))
    if estimate < min_cv_accuracy:
        return {}, (
            f"no field head: cross-validated accuracy about {estimate:.2f} < "
            f"structured.min_cv_accuracy={min_cv_accuracy}"
        )
    head.save(out / "head")
    return {
        "kind": "field-head",
        "train_examples": len(train),
        "forms": len(head.meta["forms"]),
        "leaves": leaves_report,
        "cv_accuracy": round(estimate, 4),
        "wall_s": round(time.perf_counter() - start, 2),
    }, None
