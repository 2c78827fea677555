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
WORDS = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two characters or more


class LabelHeadError(ValueError):
    """A task whose answers cannot train a label head; the message says why."""


def head_texts(request: ChatRequest) -> tuple[str, str]:
    """What the head reads: the task statement and the last turn (the system prompt and
    tools are the same on every call of a task and carry no signal)."""
    view = input_view(request)
    return view.task_text, view.turn_text


def tfidf(
    texts: list[str], vocabulary: dict[str, int], idf: np.ndarray, tokens: str = WORDS
) -> np.ndarray:
    """Unit-length sublinear TF-IDF rows over a fixed vocabulary (none: zero columns)."""
    from sklearn.feature_extraction.text import CountVectorizer

    if not vocabulary:
        return np.zeros((len(texts), 0), np.float32)
    counter = CountVectorizer(ngram_range=NGRAMS, vocabulary=vocabulary, token_pattern=tokens)
    counts = counter.transform(texts).toarray().astype(np.float32)
    weights = np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0) * idf
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    return (weights / np.maximum(norms, 1e-12)).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    """Probabilities from logits along the last axis."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class RequestFeatures:
    """What a head reads of requests: MiniLM embeddings of the task statement and of the
    last turn, then the unit-length TF-IDF of their word n-grams over `meta`'s vocabulary."""

    meta: dict[str, Any]  # embedding_model, max_seq_length, vocabulary
    idf: np.ndarray
    tokens: str = WORDS

    def __post_init__(self) -> None:
        self._embedder: Any = None

    def __call__(self, requests: list[ChatRequest]) -> np.ndarray:
        if self._embedder is None:
            from slmify.embed import Embedder

            self._embedder = Embedder(self.meta["embedding_model"], self.meta["max_seq_length"])
        pairs = [head_texts(r) for r in requests]
        task = self._embedder.encode([p[0] for p in pairs])
        turn = self._embedder.encode([p[1] for p in pairs])
        texts = [f"{a}\n{b}" for a, b in pairs]
        return np.hstack([task, turn, tfidf(texts, self.meta["vocabulary"], self.idf, self.tokens)])


@dataclass
class LabelHead:
    labels: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    meta: dict[str, Any]
    idf: np.ndarray

    def __post_init__(self) -> None:
        self.features = RequestFeatures(self.meta, self.idf)

    def probabilities(self, requests: list[ChatRequest]) -> np.ndarray:
        return softmax(self.features(requests) @ self.coef.T + self.intercept)

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
    spelled = label_set(calls)
    if len(spelled) > MAX_LABELS:
        raise LabelHeadError(f"{len(spelled)} distinct answers: not a closed label set")
    if any(c.tool_calls() or "\n" in c.output_text().strip() for c in calls):
        raise LabelHeadError("some answers are tool calls or several lines, not labels")
    labels = sorted(spelled)
    texts = ["\n".join(head_texts(c.request)) for c in calls]
    vocabulary, idf = fit_vocabulary(texts)
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
    head.coef, head.intercept, chosen = fit_softmax(X, y, len(labels), blocks(X, idf), seed)
    head.meta.update(chosen)
    return head


def blocks(X: np.ndarray, idf: np.ndarray) -> dict[str, slice]:
    """The feature blocks of `features`' rows: the embeddings (task, turn), then words."""
    width = X.shape[1] - len(idf)
    return {"embeddings": slice(0, width), "words": slice(width, X.shape[1])}


def fit_softmax(
    X: np.ndarray, y: np.ndarray, classes: int, blocks: dict[str, slice], seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Softmax regression of class indices `y` on `X`: which feature blocks it reads and
    its regularization are chosen by cross-validated accuracy (log-loss breaks ties), so a
    task decided by its words is not blurred by the embeddings, nor the reverse.

    Returns full-width weights (zero on the blocks left out, so reading is unchanged), and
    what was chosen: {"features", "C", "cv_accuracy"} (accuracy None: too few calls)."""
    options = {"+".join(blocks): np.arange(X.shape[1])}
    for name, cols in blocks.items():
        if len(blocks) > 1 and cols.stop > cols.start:
            options[name] = np.arange(X.shape[1])[cols]
    folds = cv_folds(len(y), seed)
    best: tuple[float, float, str, float] | None = None
    for name, cols in options.items():
        for C in C_GRID if len(folds) > 1 else C_GRID[1:2]:
            acc, loss = _cross_validate(X[:, cols], y, classes, C, folds, seed)
            if best is None or (acc, loss) > best[:2]:
                best = (acc, loss, name, C)
    assert best is not None
    acc, _, name, C = best
    coef, intercept = _fit_rows(X[:, options[name]], y, classes, C, seed)
    full = np.zeros((classes, X.shape[1]), np.float32)
    full[:, options[name]] = coef
    cv = round(acc, 4) if len(folds) > 1 else None
    return full, intercept, {"features": name, "C": C, "cv_accuracy": cv}


def cv_folds(n: int, seed: int, k: int = 3) -> list[np.ndarray]:
    """k shuffled folds of row indices; one (no cross-validation) below 3 rows a fold."""
    if n < 3 * k:
        return [np.arange(n)]
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def _cross_validate(X, y, classes, C, folds, seed) -> tuple[float, float]:
    """Accuracy and negated mean log-loss over the folds."""
    hits, loss = 0, 0.0
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test) if len(folds) > 1 else test
        coef, intercept = _fit_rows(X[train], y[train], classes, C, seed)
        logits = X[test] @ coef.T + intercept
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        hits += int((logp.argmax(axis=1) == y[test]).sum())
        loss += float(-logp[np.arange(len(test)), y[test]].sum())
    n = sum(len(f) for f in folds)
    return hits / n, -loss / n


def _fit_rows(X, y, classes, C, seed) -> tuple[np.ndarray, np.ndarray]:
    """Weights over all `classes`; a class absent from `y` gets a logit it never wins."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((classes, X.shape[1]), np.float32)
    intercept = np.full(classes, -30.0, np.float32)
    present = np.unique(y)
    if len(present) == 1:
        intercept[present[0]] = 0.0
        return coef, intercept
    model = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(X, y)
    c, b = model.coef_, model.intercept_
    if len(present) == 2:  # sklearn keeps one row for two classes; softmax needs both
        c, b = np.vstack([-c / 2, c / 2]), np.r_[-b / 2, b / 2]
    coef[present], intercept[present] = c, b
    return coef, intercept


def fit_vocabulary(texts: list[str], tokens: str = WORDS) -> tuple[dict[str, int], np.ndarray]:
    """The n-grams seen in at least two training requests, and their smoothed idf."""
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        counts = CountVectorizer(ngram_range=NGRAMS, min_df=2, token_pattern=tokens).fit(texts)
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
        "features": head.meta["features"],
        "C": head.meta["C"],
        "cv_accuracy": head.meta["cv_accuracy"],
        "wall_s": round(time.perf_counter() - start, 2),
    }, None
