"""The runtime router: which task a request belongs to, or the LLM, before it answers.

`slmify cluster` fits it on input-only features (agent identity, the task statement's
answer format, the last turn's role, the agent's previous action, and the blocks the
recipe's `router_features` name: the task statement's projected embedding and/or the
TF-IDF of its word 1-2-grams, the same two of the last turn, the TF-IDF of the agent's
last assistant message) against the clustering's
own assignment, on the sessions eval never replays, scores it on those eval replays, and
saves it to WORKSPACE/cluster/router/: `router.json` (`RouterMeta`: classes,
vocabularies, the n-gram terms, settings, held-out score; read and written by
slmify.workspace, strictly) and `router.npz` (the projections, the n-grams' idf and the
logistic-regression weights). No pickle: both files are inspectable and loading runs no
code from them. A router.json without `features` (written before it) uses the turn's
embedding and no n-grams, one without `task_features` the task statement's embedding and
no n-grams, one without `reply_ngrams` no reply block, as routers then did.

`load_router(path).route(request)` returns `(task_id, confidence)`, or `(None,
confidence)` for "stay with the LLM"; `route_many` routes several requests in one pass,
and `RouteBatcher` gathers the concurrent calls of an asyncio server (`slmify serve`) into
such batches. At routing time the work is, with the turn's embedding, one MiniLM pass on
the last turn; with the task statement's, one per session (it repeats across a session
and is cached); a router with neither never loads MiniLM. Then the n-gram lookups, a
matmul and a softmax.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slmify.features import (
    CallView,
    InputView,
    Ngrams,
    Projection,
    dynamic_text,
    input_blocks,
    input_view,
)
from slmify.schema import ChatRequest, RouterMeta
from slmify.workspace import read_router_meta, router_weights_file, write_router_meta

LLM = "LLM"
TASK_CACHE_SIZE = 10000
# Requests routed in one forward pass at most: the batch pads to its longest text.
MAX_ROUTE_BATCH = 32
# What a router.json written before `features` (`task_features`) read of the last turn
# (of the task statement) besides the fixed blocks.
LEGACY_FEATURES = ("turn_embedding",)
LEGACY_TASK_FEATURES = ("task_embedding",)


@dataclass
class Router:
    meta: RouterMeta
    task_proj: Projection | None  # None: the task statement is not embedded
    turn_proj: Projection | None  # None: the turn is not embedded
    coef: np.ndarray
    intercept: np.ndarray
    ngrams: Ngrams | None = None  # the last turn's; None: no such block
    task_ngrams: Ngrams | None = None  # the task statement's; None: no such block
    reply_ngrams: Ngrams | None = None  # the last assistant message's; None: no such block

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

    def features(
        self, views: list[InputView], task_vecs: np.ndarray | None, turn_vecs: np.ndarray | None
    ):  # noqa: ANN201 - an ndarray, or a CSR matrix with an n-gram block
        """The input features of `views`; the embeddings of a text the router does not
        embed are ignored (None is fine there)."""
        return input_blocks(
            views,
            self.meta.identities,
            self.meta.previous_actions,
            None if self.task_proj is None else self.task_proj(task_vecs),
            None if self.turn_proj is None else self.turn_proj(turn_vecs),
            self.ngrams,
            self.task_ngrams,
            self.reply_ngrams,
        )

    def fitted_on(self, session: str) -> bool:
        """Whether this router was fitted on a session's calls (every session, for a router
        fitted on all calls)."""
        share = self.meta.held_out_share
        return share is None or not held_out(session, share)

    @property
    def embeds(self) -> bool:
        """Whether routing runs MiniLM at all (an embedding block)."""
        return self.task_proj is not None or self.turn_proj is not None

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
            reply_text=dynamic_text(view.reply_text, shared),
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
        task_vecs, turn_vecs = self._embed_views(known) if self.embeds else (None, None)
        labels, conf = self.predict(self.features(known, task_vecs, turn_vecs))
        routed = iter(zip(labels, conf.tolist(), strict=True))
        return [(None, 1.0) if v is None else next(routed) for v in views]

    def _embed_views(self, views: list[InputView]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The embeddings of the views' task statements and last turns, each None where the
        router does not read it, in one MiniLM pass."""
        cache = self._task_cache
        if len(cache) >= TASK_CACHE_SIZE:
            cache.clear()
        # A task statement is embedded once per session; one that is also a turn here (the
        # session's first call) takes that turn's vector.
        turns = [v.turn_text for v in views] if self.turn_proj is not None else []
        tasks = {v.task_text for v in views} if self.task_proj is not None else set()
        fresh = sorted(tasks - cache.keys() - set(turns))
        vecs = self._embed(turns + fresh) if turns or fresh else []
        found = dict(zip(turns + fresh, vecs, strict=True))
        cache.update({t: found[t] for t in tasks if t not in cache})
        return (
            np.stack([cache[v.task_text] for v in views]) if tasks else None,
            vecs[: len(turns)] if turns else None,
        )

    def warm_up(self) -> None:
        """Load the embedding model and run it once, so that the first request does not
        wait; a router without an embedding block never loads it."""
        if self.embeds:
            self._embed(["warm-up"])

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from slmify.embed import Embedder

            meta = self.meta
            self._embedder = Embedder(meta.embedding_model, meta.max_seq_length, fast=True)
        return self._embedder.encode_few(texts)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"coef": self.coef, "intercept": self.intercept}
        if (task := self.task_proj) is not None:
            arrays |= {"task_mean": task.mean, "task_components": task.components}
        if (turn := self.turn_proj) is not None:
            arrays |= {"turn_mean": turn.mean, "turn_components": turn.components}
        if self.ngrams is not None:
            arrays["turn_idf"] = self.ngrams.idf
        if self.task_ngrams is not None:
            arrays["task_idf"] = self.task_ngrams.idf
        if self.reply_ngrams is not None:
            arrays["reply_idf"] = self.reply_ngrams.idf
        np.savez(router_weights_file(folder), **arrays)
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
    blocks = router_blocks(meta)
    with np.load(router_weights_file(folder)) as a:
        return Router(
            meta=meta,
            task_proj=Projection(a["task_mean"], a["task_components"])
            if "task_embedding" in blocks
            else None,
            turn_proj=Projection(a["turn_mean"], a["turn_components"])
            if "turn_embedding" in blocks
            else None,
            coef=a["coef"],
            intercept=a["intercept"],
            ngrams=Ngrams(meta.turn_ngrams, a["turn_idf"]) if "turn_ngrams" in blocks else None,
            task_ngrams=Ngrams(meta.task_ngrams, a["task_idf"])
            if "task_ngrams" in blocks
            else None,
            reply_ngrams=Ngrams(meta.reply_ngrams, a["reply_idf"])
            if "reply_ngrams" in blocks
            else None,
        )


def router_blocks(meta: RouterMeta) -> tuple[str, ...]:
    """The optional feature blocks a router uses, the task statement's first
    (`RouterMeta.task_features`, then `features`, then `reply_ngrams` where its vocabulary
    is not empty: an empty one adds no column, so the router is the same without it)."""
    task = LEGACY_TASK_FEATURES if meta.task_features is None else tuple(meta.task_features)
    turn = LEGACY_FEATURES if meta.features is None else tuple(meta.features)
    return task + turn + (("reply_ngrams",) if meta.reply_ngrams else ())


def held_out(session: str, share: float) -> bool:
    """Whether a router fitted with held-out share `share` leaves the session out: the
    train stage's split hash (`datasets.hash_unit`) places it below `share`."""
    from slmify.datasets import hash_unit

    return hash_unit(session) < share


def fit_router(
    views: list[CallView],
    task_of: list[str | None],
    task_vecs: np.ndarray,
    turn_vecs: np.ndarray,
    projections: tuple[Projection, Projection],
    settings: dict[str, Any],
    held_out_share: float,
    seed: int,
    reply_ngrams: bool = False,
) -> Router:
    """Fit on the sessions eval never replays; score on the ones it does.

    A session's place is `datasets.hash_unit(session)`, the hash the train stage splits
    sessions by (test first, then calibration): sessions placed below `held_out_share`
    (the train recipe's test + calibration fractions) are held out of the fit, so eval's
    routing figures are on calls the router never saw. When every session is held out
    (a tiny log), the router is fitted on all of them and its metadata says so
    (`held_out_share` None). `settings` carries what routing needs besides the weights
    (embedding model and length, shared lines, minimum confidence, `features` and
    `task_features`: the optional blocks); `reply_ngrams` adds the block of the last
    assistant message's n-grams. The n-gram vocabularies are fitted on the fitted calls
    only (their last turns, their task statements, their last assistant messages).
    """
    inputs = [v.inputs for v in views]
    meta = RouterMeta(
        **settings,
        identities=sorted({v.identity for v in inputs}),
        previous_actions=sorted({v.previous_action for v in inputs}),
        holdout={},
        classes=[],
    )
    held = np.array([held_out(v.session, held_out_share) for v in views], dtype=bool)
    if held.all():  # a tiny log: nothing left to fit on but the held-out sessions
        held[:] = False
        share, holdout = None, {"accuracy": None, "reason": "every session is held out"}
    else:
        share, holdout = held_out_share, {}
    fit, test = np.flatnonzero(~held), np.flatnonzero(held)
    blocks = router_blocks(meta)
    ngrams = Ngrams.fit([inputs[i].turn_text for i in fit]) if "turn_ngrams" in blocks else None
    # Per call, like the turn's: a session's statement counts once per call. Fitted on the
    # distinct statements instead, tau-airline's held-out accuracy was 0.685, not 0.692.
    statements = [inputs[i].task_text for i in fit]
    task_ngrams = Ngrams.fit(statements) if "task_ngrams" in blocks else None
    reply = Ngrams.fit([inputs[i].reply_text for i in fit]) if reply_ngrams else None
    task_proj, turn_proj = projections
    terms = {
        "turn_ngrams": ngrams.terms if ngrams else [],
        "task_ngrams": task_ngrams.terms if task_ngrams else [],
        "reply_ngrams": reply.terms if reply else [],
    }
    router = Router(
        meta.model_copy(update=terms),
        task_proj if "task_embedding" in blocks else None,
        turn_proj if "turn_embedding" in blocks else None,
        np.zeros((0, 0), np.float32),
        np.zeros(0, np.float32),
        ngrams,
        task_ngrams,
        reply if reply and reply.terms else None,  # as load_router will read it
    )
    X = router.features(inputs, task_vecs, turn_vecs)
    y = np.array([t or LLM for t in task_of])
    classes, router.coef, router.intercept = _fit_linear(X[fit], y[fit], seed)
    router.meta = router.meta.model_copy(update={"classes": classes, "held_out_share": share})
    if not holdout:
        holdout = _holdout(router, X[test], y[test], [views[i].session for i in test])
    router.meta = router.meta.model_copy(update={"holdout": holdout})
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
