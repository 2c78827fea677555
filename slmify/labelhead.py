"""A label specialist that answers from its closed label set: logistic regression on MiniLM
embeddings of the request and its word n-grams (TF-IDF), with a probability per label.

A task whose LLM answers come from a small closed set (a ticket classifier) does not need
a generative model: the embedder the cluster stage already loads, and a linear head on
it, trains in seconds on a CPU, answers in milliseconds, can only ever answer a label it
saw, and gives the probability of the label it answers, which is its confidence.

The embeddings carry what a request means; the n-grams carry the words a label often turns
on ("charged twice", "never arrived") that a sentence embedding blurs; each block has unit
norm, so neither drowns the other.

Reads the task's train-split calls; writes `specialists/<task id>/head/`: `head.json`
(labels, embedding model, the n-gram vocabulary, schema version) and `head.npz` (weights,
idf). No pickle: loading runs no code from the files.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmify.features import input_view
from slmify.metrics import normalize_label
from slmify.schema import SCHEMA_VERSION, CallRecord, ChatRequest

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256
MAX_LABELS = 50  # more distinct answers than this is not a closed label set
NGRAMS = (1, 2)
C_GRID = (1.0, 10.0, 100.0)  # logistic regression's inverse regularization, chosen by CV


class LabelHeadError(ValueError):
    """A task whose answers cannot train a label head; the message says why."""


def head_texts(request: ChatRequest) -> tuple[str, str]:
    """What the head reads: the task statement and the last turn (the system prompt and
    tools are the same on every call of a task and carry no signal)."""
    view = input_view(request)
    return view.task_text, view.turn_text


def tfidf(texts: list[str], vocabulary: dict[str, int], idf: np.ndarray) -> np.ndarray:
    """Unit-length sublinear TF-IDF rows over a fixed vocabulary (none: zero columns)."""
    from sklearn.feature_extraction.text import CountVectorizer

    if not vocabulary:
        return np.zeros((len(texts), 0), np.float32)
    counter = CountVectorizer(ngram_range=NGRAMS, vocabulary=vocabulary)
    counts = counter.transform(texts).toarray().astype(np.float32)
    weights = np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0) * idf
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    return (weights / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass
class LabelHead:
    labels: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    meta: dict[str, Any]
    idf: np.ndarray

    def __post_init__(self) -> None:
        self._embedder: Any = None

    def features(self, requests: list[ChatRequest]) -> np.ndarray:
        if self._embedder is None:
            from slmify.embed import Embedder

            self._embedder = Embedder(self.meta["embedding_model"], self.meta["max_seq_length"])
        pairs = [head_texts(r) for r in requests]
        task = self._embedder.encode([p[0] for p in pairs])
        turn = self._embedder.encode([p[1] for p in pairs])
        words = tfidf([f"{a}\n{b}" for a, b in pairs], self.meta["vocabulary"], self.idf)
        return np.hstack([task, turn, words])

    def probabilities(self, requests: list[ChatRequest]) -> np.ndarray:
        logits = self.features(requests) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, request: ChatRequest) -> tuple[str, float]:
        """The most likely label and its probability."""
        probs = self.probabilities([request])[0]
        best = int(probs.argmax())
        return self.labels[best], float(probs[best])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "head.npz", coef=self.coef, intercept=self.intercept, idf=self.idf)
        meta = {**self.meta, "labels": self.labels}
        (folder / "head.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def load_head(folder: Path) -> LabelHead:
    meta = json.loads((folder / "head.json").read_text(encoding="utf-8"))
    with np.load(folder / "head.npz") as a:
        return LabelHead(meta.pop("labels"), a["coef"], a["intercept"], meta, a["idf"])


def label_set(calls: list[CallRecord]) -> dict[str, str]:
    """Each normalized label and its most frequent spelling in the LLM's answers."""
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    for c in calls:
        text = c.output_text().strip()
        spellings[normalize_label(text)][text] += 1
    return {k: v.most_common(1)[0][0] for k, v in spellings.items()}


def fit_head(calls: list[CallRecord], seed: int = 0) -> LabelHead:
    """Fit the head on the task's training calls (the LLM's labels are the targets)."""
    from sklearn.linear_model import LogisticRegression

    spelled = label_set(calls)
    if len(spelled) > MAX_LABELS:
        raise LabelHeadError(f"{len(spelled)} distinct answers: not a closed label set")
    if any(c.tool_calls() or "\n" in c.output_text().strip() for c in calls):
        raise LabelHeadError("some answers are tool calls or several lines, not labels")
    labels = sorted(spelled)
    texts = ["\n".join(head_texts(c.request)) for c in calls]
    vocabulary, idf = _fit_vocabulary(texts)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "embedding_model": EMBEDDING_MODEL,
        "max_seq_length": MAX_SEQ_LENGTH,
        "reads": "task statement and last turn: each embedded, and their word n-grams",
        "vocabulary": vocabulary,
    }
    head = LabelHead([spelled[k] for k in labels], np.zeros(0), np.zeros(0), meta, idf)
    X = head.features([c.request for c in calls])
    y = np.array([labels.index(normalize_label(c.output_text())) for c in calls])
    if len(labels) == 1:  # one label: always answer it, with certainty
        head.coef, head.intercept = np.zeros((1, X.shape[1]), np.float32), np.zeros(1, np.float32)
        return head
    C, head.meta["cv_accuracy"] = _choose_c(X, y, seed)
    head.meta["C"] = C
    model = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(X, y)
    coef, intercept = model.coef_, model.intercept_
    if len(labels) == 2:  # sklearn keeps one row for two classes; softmax needs both
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    head.coef, head.intercept = coef.astype(np.float32), intercept.astype(np.float32)
    return head


def _choose_c(X: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float | None]:
    """The regularization with the best cross-validated log-loss, and its accuracy; the
    middle value when a label has too few examples to cross-validate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate

    folds = min(5, int(np.bincount(y).min()))
    if folds < 3:
        return C_GRID[1], None
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    best: tuple[float, float, float | None] = (-np.inf, C_GRID[1], None)
    for C in C_GRID:
        model = LogisticRegression(C=C, max_iter=5000, random_state=seed)
        scores = cross_validate(model, X, y, cv=cv, scoring=("neg_log_loss", "accuracy"))
        loss = float(scores["test_neg_log_loss"].mean())
        if loss > best[0]:
            best = (loss, C, round(float(scores["test_accuracy"].mean()), 4))
    return best[1], best[2]


def _fit_vocabulary(texts: list[str]) -> tuple[dict[str, int], np.ndarray]:
    """The n-grams seen in at least two training requests, and their smoothed idf."""
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        counts = CountVectorizer(ngram_range=NGRAMS, min_df=2).fit(texts)
    except ValueError:  # no n-gram in two requests: the embeddings alone
        return {}, np.zeros(0, np.float32)
    vocabulary = {k: int(v) for k, v in counts.vocabulary_.items()}
    df = np.asarray((counts.transform(texts) > 0).sum(axis=0)).ravel()
    idf = np.log((1 + len(texts)) / (1 + df)) + 1.0
    return vocabulary, idf.astype(np.float32)


def train_head(
    calls: list[CallRecord], ids: set[str], out: Path
) -> tuple[dict[str, Any], str | None]:
    """Fit and save the task's head (`out`/head/) on the calls named in `ids`, its train
    and validation splits (a head has no training run to stop early, so validation calls
    are training data; its
    regularization is chosen by cross-validation on them, whose accuracy is reported);
    metrics, and why not when its answers are no closed label set (the caller trains a
    LoRA instead)."""
    import time

    train = [c for c in calls if c.id in ids]
    start = time.perf_counter()
    try:
        head = fit_head(train)
    except LabelHeadError as e:
        return {}, str(e)
    head.save(out / "head")
    return {
        "kind": "label-head",
        "labels": head.labels,
        "train_examples": len(train),
        "C": head.meta["C"],
        "cv_accuracy": head.meta["cv_accuracy"],
        "wall_s": round(time.perf_counter() - start, 2),
    }, None
