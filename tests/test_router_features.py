"""The router's reply block (`router_features: [..., reply_ngrams]`): the TF-IDF of the
agent's last assistant message, on a third of tau-airline's sessions with its labelled next
actions standing in for the clustering's tasks (fit_router without MiniLM: n-grams only)."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import DATASETS, dataset
from sklearn.feature_extraction.text import TfidfVectorizer

from slmify.cluster import ClusterConfig
from slmify.collect import import_files
from slmify.datasets import hash_unit
from slmify.features import MAX_TEXT_CHARS, CallView, line_key, load_views, strip_boilerplate
from slmify.router import Router, fit_router, load_router, router_blocks
from slmify.schema import ChatRequest, message_text
from slmify.store import open_store
from slmify.workspace import Workspace, router_weights_file

Sample = tuple[list[CallView], list[str], dict[str, ChatRequest]]


@pytest.fixture(scope="module")
def tau(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """A third of tau-airline's sessions as load_views + strip_boilerplate give them, each
    call's labelled next action, and the requests by call id."""
    root = tmp_path_factory.mktemp("tau")
    with gzip.open(dataset("tau-airline"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    keep = set(sorted({r["metadata"]["session_id"] for r in rows})[::3])
    sample = root / "tau.jsonl"
    sample.write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["metadata"]["session_id"] in keep)
    )
    ws = Workspace.resolve(root / "ws")
    with open_store(ws.store_url) as st:
        import_files(st, [sample], ws.path("rejects.jsonl"))
        views, _ = strip_boilerplate(load_views(st, len))
        requests = {s.record.id: s.record.request for s in st.iter_calls()}
    with open(DATASETS / "tau-airline" / "labels.jsonl", encoding="utf-8") as f:
        actions = {row["id"]: row["next_action"] for row in map(json.loads, f)}
    return views, [actions[v.id] for v in views], requests


def fit(tau: Sample, reply: bool) -> Router:
    views, task_of, _ = tau
    config = ClusterConfig()
    settings = {
        "embedding_model": config.embedding_model,
        "max_seq_length": config.max_seq_length,
        "min_confidence": config.router_min_confidence,
        "shared_lines": {},
        "features": ["turn_ngrams"],
        "task_features": ["task_ngrams"],
    }
    # No embedding block: the projections and vectors are never read.
    return fit_router(
        views, task_of, None, None, (None, None), settings, 0.35, 0, reply_ngrams=reply
    )


def test_the_reply_text_is_the_last_assistant_messages_text(tau: Sample) -> None:
    """Empty on a session's first call and after a bare tool call; the assistant's words
    otherwise (tau's agent sometimes writes a line beside its tool call)."""
    views, _, requests = tau
    first = [v for v in views if v.inputs.previous_action == "start"]
    after_text = [v for v in views if v.inputs.previous_action == "text"]
    after_tool = [v for v in views if v.inputs.previous_action not in ("start", "text")]
    assert len(first) + len(after_text) + len(after_tool) == len(views)
    assert len(first) == len({v.session for v in views}) and len(after_text) > 100
    assert all(v.inputs.reply_text == "" for v in first)
    assert all(v.inputs.reply_text for v in after_text)
    worded = [v for v in after_tool if v.inputs.reply_text]
    assert 0 < len(worded) < 0.2 * len(after_tool)
    for v in after_text[:20] + worded[:20]:
        said = [m for m in requests[v.id].messages if m["role"] == "assistant"][-1]
        assert v.inputs.reply_text == message_text(said["content"]).strip()[:MAX_TEXT_CHARS]


def test_the_reply_block_comes_after_the_old_ones(tau: Sample, tmp_path: Path) -> None:
    """The reply block's columns follow every older block unchanged, and a router.json
    written before the block (no `reply_ngrams` key) loads and routes as its router did."""
    base, full = fit(tau, reply=False), fit(tau, reply=True)
    inputs = [v.inputs for v in tau[0]]
    old, new = base.features(inputs, None, None), full.features(inputs, None, None)
    assert len(full.meta.reply_ngrams) > 0 and base.meta.reply_ngrams == []
    assert new.shape[1] == old.shape[1] + len(full.meta.reply_ngrams)
    assert (new[:, : old.shape[1]] != old).nnz == 0
    assert full.coef.shape[1] == new.shape[1] and base.coef.shape[1] == old.shape[1]
    assert router_blocks(base.meta) == ("task_ngrams", "turn_ngrams")
    requests = list(tau[2].values())[:200]
    before = base.route_many(requests)
    base.save(tmp_path)
    meta = json.loads((tmp_path / "router.json").read_text(encoding="utf-8"))
    assert meta.pop("reply_ngrams") == []
    (tmp_path / "router.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    legacy = load_router(tmp_path)
    assert legacy.reply_ngrams is None and legacy.route_many(requests) == before


def test_the_reply_terms_and_idf_round_trip(tau: Sample, tmp_path: Path) -> None:
    full = fit(tau, reply=True)
    full.save(tmp_path)
    with np.load(router_weights_file(tmp_path)) as a:
        assert sorted(a.files) == ["coef", "intercept", "reply_idf", "task_idf", "turn_idf"]
        assert np.array_equal(a["reply_idf"], full.reply_ngrams.idf)
    loaded = load_router(tmp_path)
    assert router_blocks(loaded.meta) == ("task_ngrams", "turn_ngrams", "reply_ngrams")
    assert loaded.meta.reply_ngrams == full.reply_ngrams.terms == full.meta.reply_ngrams
    requests = list(tau[2].values())
    assert loaded.route_many(requests) == full.route_many(requests)


def test_the_reply_vocabulary_is_fitted_on_the_fitted_sessions_only(tau: Sample) -> None:
    """sklearn's vocabulary and idf on the fitted calls' replies, not on every call's (it
    would know the held-out sessions' words)."""
    views = tau[0]
    full = fit(tau, reply=True)
    replies = [v.inputs.reply_text for v in views]
    fitted = [r for v, r in zip(views, replies, strict=True) if hash_unit(v.session) >= 0.35]
    assert 0 < len(fitted) < len(replies)

    def tfidf(texts: list[str]) -> TfidfVectorizer:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=5000)
        return vec.fit(texts)

    assert full.meta.reply_ngrams == tfidf(fitted).get_feature_names_out().tolist()
    assert full.meta.reply_ngrams != tfidf(replies).get_feature_names_out().tolist()
    assert abs(full.reply_ngrams(replies) - tfidf(fitted).transform(replies)).max() < 1e-6


def test_shared_lines_are_dropped_from_the_reply(tau: Sample) -> None:
    """A line an agent repeats in most calls is boilerplate in its reply too: dropped while
    clustering (strip_boilerplate) and while routing (Router.prepare)."""
    views, _, requests = tau
    said = [v for v in views if v.inputs.previous_action == "text"][:30]
    boiler = "Remember: the airline policy applies to every booking."
    padded = [
        replace(
            v,
            inputs=replace(
                v.inputs,
                turn_text=f"{boiler}\n{v.inputs.turn_text}",
                reply_text=f"{v.inputs.reply_text}\n{boiler}",
            ),
        )
        for v in said
    ]
    stripped, shared = strip_boilerplate(padded)
    assert line_key(boiler) in shared[said[0].inputs.identity]
    assert [v.inputs.reply_text for v in stripped] == [v.inputs.reply_text for v in said]
    router = fit(tau, reply=True)
    first_lines = {v.inputs.reply_text.splitlines()[0] for v in said}
    meta = router.meta.model_copy(
        update={"shared_lines": {said[0].inputs.identity: sorted(map(line_key, first_lines))}}
    )
    routing = Router(meta, None, None, router.coef, router.intercept, *router_ngrams(router))
    for v in said:
        rest = "\n".join(v.inputs.reply_text.splitlines()[1:]).strip()
        assert routing.prepare(requests[v.id]).reply_text == rest


def router_ngrams(router: Router) -> tuple:
    return router.ngrams, router.task_ngrams, router.reply_ngrams
