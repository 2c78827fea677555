"""The runtime router: which task a request belongs to, or the LLM, before it answers.

`slmify cluster` fits it on input-only features (agent identity, the task statement's
answer format, the last turn's role, the agent's previous action, and the projected
embeddings of the task statement and last turn) against the clustering's own
assignment, on the sessions eval never replays, scores it on those eval replays, and saves it to
WORKSPACE/cluster/router/: `router.json` (`RouterMeta`: classes, vocabularies, settings,
held-out score; read and written by slmify.workspace, strictly) and `router.npz` (the
projections and the logistic-regression weights). No pickle: both files are inspectable
and loading runs no code from them.

`load_router(path).route(request)` returns `(task_id, confidence)`, or `(None,
confidence)` for "stay with the LLM"; `route_many` routes several requests in one pass,
and `RouteBatcher` gathers the concurrent calls of an asyncio server (`slmify serve`) into
such batches. At routing time the work is one MiniLM pass on the last turn (the task
statement repeats across a session and is cached), a matmul and a softmax.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slmify.features import CallView, InputView, Projection, dynamic_text, input_blocks, input_view
from slmify.schema import ChatRequest, RouterMeta
from slmify.workspace import read_router_meta, router_weights_file, write_router_meta

LLM = "LLM"
TASK_CACHE_SIZE = 10000
# Requests routed in one forward pass at most: the batch pads to its longest text.
MAX_ROUTE_BATCH = 32


@dataclass
class Router:
    meta: RouterMeta
    task_proj: Projection
    turn_proj: Projection
    coef: np.ndarray
    intercept: np.ndarray

    def __post_init__(self) -> None:
        self._embedder: Any = None
        self._task_cache: dict[str, np.ndarray] = {}
        self._shared = {k: set(v) for k, v in self.meta.shared_lines.items()}

    def predict(self, features: np.ndarray) -> tuple[list[str | None], np.ndarray]:
        """Task id (None: the LLM) and confidence for each row of input features."""
        logits = features @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        conf = probs[np.arange(len(best)), best]
        classes = self.meta.classes
        labels = [
            None if classes[b] == LLM or c < self.meta.min_confidence else classes[b]
            for b, c in zip(best, conf, strict=True)
        ]
        return labels, conf

    def features(self, views: list[InputView], task_vecs: np.ndarray, turn_vecs: np.ndarray):
        return input_blocks(
            views,
            self.meta.identities,
            self.meta.previous_actions,
            self.task_proj(task_vecs),
            self.turn_proj(turn_vecs),
        )

    def prepare(self, request: ChatRequest) -> InputView | None:
        """The request's input view with its agent's shared lines removed, or None for an
        agent never seen while clustering (no specialist knows it: the LLM answers)."""
        view = input_view(request)
        if view.identity not in self.meta.identities:
            return None
        shared = self._shared.get(view.identity, set())
        return replace(
            view,
            task_text=dynamic_text(view.task_text, shared),
            turn_text=dynamic_text(view.turn_text, shared),
        )

    def route(self, request: ChatRequest) -> tuple[str | None, float]:
        """The task this request belongs to (None: send it to the LLM) and the confidence."""
        return self.route_many([request])[0]

    def route_many(self, requests: list[ChatRequest]) -> list[tuple[str | None, float]]:
        """`route` for requests that arrived together: one forward pass embeds every text
        they need. A short text costs reading the model's weights, so a batch costs little
        more than one request."""
        views = [self.prepare(r) for r in requests]
        known = [v for v in views if v is not None]
        if not known:
            return [(None, 1.0)] * len(requests)
        cache = self._task_cache
        if len(cache) >= TASK_CACHE_SIZE:
            cache.clear()
        # A task statement is embedded once per session; one that is also a turn here (the
        # session's first call) takes that turn's vector.
        turns = [v.turn_text for v in known]
        fresh = sorted({v.task_text for v in known} - cache.keys() - set(turns))
        vecs = self._embed(turns + fresh)
        turn_vecs = vecs[: len(known)]
        found = dict(zip(turns + fresh, vecs, strict=True))
        cache.update({v.task_text: found[v.task_text] for v in known if v.task_text not in cache})
        task_vecs = np.stack([cache[v.task_text] for v in known])
        labels, conf = self.predict(self.features(known, task_vecs, turn_vecs))
        routed = iter(zip(labels, conf.tolist(), strict=True))
        return [(None, 1.0) if v is None else next(routed) for v in views]

    def warm_up(self) -> None:
        """Load the embedding model and run it once: the first request should not wait."""
        self._embed(["warm-up"])

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from slmify.embed import Embedder

            meta = self.meta
            self._embedder = Embedder(meta.embedding_model, meta.max_seq_length, fast=True)
        return self._embedder.encode_few(texts)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            router_weights_file(folder),
            coef=self.coef,
            intercept=self.intercept,
            task_mean=self.task_proj.mean,
            task_components=self.task_proj.components,
            turn_mean=self.turn_proj.mean,
            turn_components=self.turn_proj.components,
        )
        write_router_meta(folder, self.meta)


class RouteBatcher:
    """Routes the requests that wait together in one `route_many` call on the routing
    thread: under concurrent load one forward pass of the embedding model serves a whole
    batch, and an idle server routes a lone request at once."""

    def __init__(self, router: Router, executor: Executor):
        self.router, self.executor = router, executor
        self.waiting: list[tuple[ChatRequest, asyncio.Future]] = []
        self.runner: asyncio.Task | None = None

    async def route(self, request: ChatRequest) -> tuple[str | None, float]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            batch, self.waiting = self.waiting[:MAX_ROUTE_BATCH], self.waiting[MAX_ROUTE_BATCH:]
            requests = [r for r, _ in batch]
            try:
                routes = await loop.run_in_executor(self.executor, self.router.route_many, requests)
            except Exception as e:  # noqa: BLE001 - each caller decides what a failure means
                for _, future in batch:
                    if not future.done():  # done: its client went away
                        future.set_exception(e)
                continue
            for (_, future), route in zip(batch, routes, strict=True):
                if not future.done():
                    future.set_result(route)


def load_router(path: str | Path) -> Router:
    """Load a router saved by `slmify cluster` (its folder, or the router.json in it); its
    metadata is checked as `RouterMeta` (a WorkspaceError names the file otherwise)."""
    folder = Path(path)
    folder = folder.parent if folder.suffix == ".json" else folder
    meta = read_router_meta(folder)
    with np.load(router_weights_file(folder)) as a:
        return Router(
            meta=meta,
            task_proj=Projection(a["task_mean"], a["task_components"]),
            turn_proj=Projection(a["turn_mean"], a["turn_components"]),
            coef=a["coef"],
            intercept=a["intercept"],
        )


def fit_router(
    views: list[CallView],
    task_of: list[str | None],
    task_vecs: np.ndarray,
    turn_vecs: np.ndarray,
    projections: tuple[Projection, Projection],
    settings: dict[str, Any],
    held_out_share: float,
    seed: int,
) -> Router:
    """Fit on the sessions eval never replays; score on the ones it does.

    A session's place is `datasets.hash_unit(session)`, the hash the train stage splits
    sessions by (test first, then calibration): sessions placed below `held_out_share`
    (the train recipe's test + calibration fractions) are held out of the fit, so eval's
    routing figures are on calls the router never saw. When every session is held out
    (a tiny log), the router is fitted on all of them and its metadata says so
    (`held_out_share` None). `settings` carries what routing needs besides the weights
    (embedding model and length, shared lines, minimum confidence).
    """
    from slmify.datasets import hash_unit

    inputs = [v.inputs for v in views]
    meta = RouterMeta(
        **settings,
        identities=sorted({v.identity for v in inputs}),
        previous_actions=sorted({v.previous_action for v in inputs}),
        holdout={},
        classes=[],
    )
    task_proj, turn_proj = projections
    X = input_blocks(
        inputs, meta.identities, meta.previous_actions, task_proj(task_vecs), turn_proj(turn_vecs)
    )
    y = np.array([t or LLM for t in task_of])
    held = np.array([hash_unit(v.session) < held_out_share for v in views], dtype=bool)
    if held.all():  # a tiny log: nothing left to fit on but the held-out sessions
        held[:] = False
        share, holdout = None, {"accuracy": None, "reason": "every session is held out"}
    else:
        share, holdout = held_out_share, {}
    classes, coef, intercept = _fit_linear(X[~held], y[~held], seed)
    meta = meta.model_copy(update={"classes": classes, "held_out_share": share})
    router = Router(meta, task_proj, turn_proj, coef, intercept)
    if not holdout:
        sessions = [views[i].session for i in np.flatnonzero(held)]
        holdout = _holdout(router, X[held], y[held], sessions)
    router.meta = meta.model_copy(update={"holdout": holdout})
    return router


def _fit_linear(X: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(y.tolist()))
    if len(classes) == 1:  # one class: the router always answers it
        return classes, np.zeros((1, X.shape[1]), np.float32), np.zeros(1, np.float32)
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(X, y)
    coef, intercept = model.coef_, model.intercept_
    if len(classes) == 2:  # sklearn keeps one row for two classes; softmax needs both
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    return classes, coef.astype(np.float32), intercept.astype(np.float32)


def _holdout(router: Router, X: np.ndarray, y: np.ndarray, sessions: list[str]) -> dict[str, Any]:
    """Accuracy on the held-out sessions, against the clustering's assignment."""
    if not len(y):
        return {"accuracy": None, "reason": "no session placed below holdout_share"}
    predicted, _ = router.predict(X)
    truth = [None if t == LLM else t for t in y]
    hits = [p == t for p, t in zip(predicted, truth, strict=True)]
    routed = [p is not None for p in predicted]
    return {
        "accuracy": round(float(np.mean(hits)), 4),
        "test_calls": len(y),
        "test_sessions": len(set(sessions)),
        "routed_share": round(float(np.mean(routed)), 4),
        "accuracy_when_routed": round(
            float(np.mean([h for h, r in zip(hits, routed, strict=True) if r])), 4
        )
        if any(routed)
        else None,
    }
