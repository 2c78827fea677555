"""S3 cluster on small real samples: quality against labels, stable ids, the embedding
cache, the router artifact, bad input and the CLI summary."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import DATASETS, dataset
from sklearn.metrics import v_measure_score
from typer.testing import CliRunner

from slmify.cli import app
from slmify.cluster import ClusterConfig, ClusterError, cluster_store, load_cluster_config
from slmify.collect import import_files
from slmify.datasets import hash_unit
from slmify.embed import Embedder
from slmify.router import load_router
from slmify.schema import ChatRequest, message_text
from slmify.schema_stages import ClusterSummary
from slmify.store import open_store
from slmify.workspace import Workspace


def write_sample(name: str, every: int, out: Path, skip: int = 0) -> Path:
    """Every `every`-th session of a shared dataset (offset `skip`), as a JSONL file."""
    with gzip.open(dataset(name), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    sessions = sorted({r["metadata"]["session_id"] for r in rows})
    keep = set(sessions[skip::every])
    out.write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["metadata"]["session_id"] in keep)
    )
    return out


def labels(name: str, key: str) -> dict[str, str]:
    with open(DATASETS / name / "labels.jsonl", encoding="utf-8") as f:
        return {row["id"]: row[key] for row in map(json.loads, f)}


def run(ws: Workspace, files: list[Path], config: ClusterConfig | None = None) -> ClusterSummary:
    with open_store(ws.store_url) as st:
        if files:
            import_files(st, files, ws.path("rejects.jsonl"))
        return cluster_store(st, ws, config or ClusterConfig())


@pytest.fixture(scope="module")
def fireact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, ClusterSummary]:
    root = tmp_path_factory.mktemp("fireact")
    ws = Workspace.resolve(root / "ws")
    return ws, run(ws, [write_sample("fireact", 12, root / "fireact.jsonl")])


@pytest.fixture(scope="module")
def tau(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, ClusterSummary]:
    root = tmp_path_factory.mktemp("tau")
    ws = Workspace.resolve(root / "ws")
    # A tenth of the sessions: a tool called 5 times here is called 50 times in the set,
    # so the smallest cluster kept shrinks with the sample.
    config = ClusterConfig(min_cluster_calls=3)
    return ws, run(ws, [write_sample("tau-airline", 10, root / "tau.jsonl")], config)


# Bars a little under what these samples score, far above the conversation-embedding
# baseline (0.31 and 0.21 on the whole sets); the whole sets: bench/bench_cluster.py.
@pytest.mark.parametrize(
    "sample, name, key, bar",
    [("fireact", "fireact", "task", 0.8), ("tau", "tau-airline", "next_action", 0.75)],
)
def test_sample_matches_labels(sample, name, key, bar, request: pytest.FixtureRequest) -> None:
    ws, summary = request.getfixturevalue(sample)
    assigned = ws.assignments()
    truth = labels(name, key)
    score = v_measure_score([truth[c] for c in assigned], [t or "-" for t in assigned.values()])
    assert score >= bar, f"V-measure {score:.3f} on the {name} sample"
    assert summary.unassigned_share <= 0.10
    tasks = ws.tasks()  # its schema_version checked
    # Every call is counted once: in a task or unassigned.
    assert sum(t.calls for t in tasks) + summary.unassigned == summary.calls
    assert len(assigned) == summary.calls
    assert all(set(t.representatives) <= set(assigned) for t in tasks)
    assert (ws.cluster_dir() / "report.html").read_text().count("<tr>") == len(tasks) + 1
    # report.json is the summary and the tasks; map.json a sample of the calls, by task.
    report = ws.cluster_report()
    assert (report.summary, report.tasks) == (summary, tasks)
    spots = ws.call_map()
    assert len(spots.points) == len(spots.task) == min(summary.calls, 2000)
    assert set(spots.task) <= {t.id for t in tasks} | {None}


def test_rerun_same_ids_and_nothing_reembedded(tau: tuple[Workspace, ClusterSummary]) -> None:
    ws, first = tau
    before = ws.assignments()
    again = run(ws, [], ClusterConfig(min_cluster_calls=3))
    assert again.embedded == 0 and again.embeddings_cached > 0
    assert ws.assignments() == before


def test_ids_follow_tasks_when_calls_arrive(tmp_path: Path) -> None:
    ws, config = Workspace.resolve(tmp_path / "ws"), ClusterConfig(min_cluster_calls=3)
    run(ws, [write_sample("tau-airline", 32, tmp_path / "a.jsonl")], config)
    old = {c: t for c, t in ws.assignments().items() if t is not None}
    run(ws, [write_sample("tau-airline", 32, tmp_path / "b.jsonl", skip=16)], config)
    new = ws.assignments()
    assert len(new) > len(old)
    old_ids = set(old.values())
    carried = set(new.values()) & old_ids
    assert carried, "no task kept its id"
    # A task that is mostly one old task's calls, and holds most of them, keeps its id.
    for task in set(new.values()) - {None}:
        members = [c for c, t in new.items() if t == task and c in old]
        if not members:
            assert int(task[1:3]) > max(int(t[1:3]) for t in old_ids)  # a new number
            continue
        top, n = Counter(old[c] for c in members).most_common(1)[0]
        if n > len(members) / 2 and n > sum(t == top for t in old.values()) / 2:
            assert task == top


def test_router_roundtrip(tau: tuple[Workspace, ClusterSummary]) -> None:
    ws, summary = tau
    assert summary.router_holdout["accuracy"] is not None
    router = load_router(summary.router)
    assigned = ws.assignments()
    with open_store(ws.store_url) as st:
        calls = [s.record for s in st.iter_calls()][:12]
    routed = [router.route(c.request) for c in calls]
    assert all(0.0 <= conf <= 1.0 for _, conf in routed)
    agree = sum(task == assigned[c.id] for c, (task, _) in zip(calls, routed, strict=True))
    assert agree >= 0.6 * len(calls)
    stranger = ChatRequest(
        messages=[
            {"role": "system", "content": "another agent"},
            {"role": "user", "content": "hello"},
        ]
    )
    assert router.route(stranger) == (None, 1.0)
    # Routed together (as `slmify serve` batches concurrent calls): the same decisions.
    together = load_router(summary.router).route_many([c.request for c in calls] + [stranger])
    assert [t for t, _ in together] == [t for t, _ in routed] + [None]
    assert [c for _, c in together[:-1]] == pytest.approx([c for _, c in routed], abs=0.01)


def test_the_router_never_fits_the_sessions_eval_replays(
    tau: tuple[Workspace, ClusterSummary],
) -> None:
    ws, summary = tau
    router = load_router(summary.router)
    assert router.meta.held_out_share == ClusterConfig().holdout_share == 0.35
    # Its score is on exactly the sessions the train stage's split hash holds out (test
    # and calibration under the shipped recipes' fractions), every call of them.
    with open_store(ws.store_url) as st:
        clustered = [st.get_call(cid).record for cid in ws.assignments()]
    held = [c for c in clustered if hash_unit(c.session_id or c.id) < 0.35]
    assert held and len(held) < len(clustered)
    holdout = router.meta.holdout
    assert holdout["test_calls"] == len(held)
    assert holdout["test_sessions"] == len({c.session_id for c in held})


def test_bad_input_gets_a_clear_message_and_writes_nothing(tmp_path: Path) -> None:
    runner = CliRunner()
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["cluster", "-w", str(ws)])
    assert result.exit_code == 1
    assert "no calls to cluster in" in result.output and "slmify collect import" in result.output

    empty = tmp_path / "empty.jsonl"
    empty.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"e{i}",
                    "request": {"messages": [{"role": "user", "content": ""}]},
                    "response": {"choices": [{"message": {"role": "assistant", "content": ""}}]},
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    runner.invoke(app, ["collect", "import", str(empty), "-w", str(ws)])
    result = runner.invoke(app, ["cluster", "-w", str(ws)])
    assert result.exit_code == 1 and "none of the 5 calls" in result.output

    result = runner.invoke(app, ["cluster", "-w", str(ws), "--set", "n_clusters=8"])
    assert result.exit_code == 1 and "5 call(s) to cluster" in result.output
    assert "8 clusters were asked for" in result.output
    nothing = Workspace.at(ws)
    assert not nothing.cluster_dir().exists() and not nothing.assignments_file().exists()


def test_recipe_typo_names_the_key() -> None:
    with pytest.raises(ClusterError, match="weights.acton: unknown key"):
        load_cluster_config("default", ["weights.acton=2"])
    with pytest.raises(ClusterError, match="unknown algorithm 'dbscan'"):
        load_cluster_config("default", ["algorithm=dbscan"])
    assert load_cluster_config() == ClusterConfig()


def test_cli_json_names_the_artifacts(tmp_path: Path) -> None:
    sample = write_sample("tau-airline", 40, tmp_path / "tau.jsonl")
    ws = tmp_path / "ws"
    CliRunner().invoke(app, ["collect", "import", str(sample), "-w", str(ws)])
    result = CliRunner().invoke(
        app, ["cluster", "-w", str(ws), "--json", "--set", "min_cluster_calls=3"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # The summary the stage kept, key for key, as the dict it printed before it had a model.
    assert list(summary) == list(ClusterSummary.model_fields)
    assert summary == Workspace.at(ws).cluster_report().summary.model_dump(mode="json")
    assert Path(summary["assignments"]) == Workspace.at(ws).assignments_file()
    assert len(Path(summary["assignments"]).read_text().splitlines()) == summary["calls"]


@pytest.mark.parametrize("algorithm", ["agglomerative", "hdbscan"])
def test_other_clusterers(
    algorithm: str, tau: tuple[Workspace, ClusterSummary], tmp_path: Path
) -> None:
    ws, _ = tau
    copy = Workspace.resolve(tmp_path / "ws")
    shutil.copy(ws.store_url, copy.store_url)  # the calls and their cached embeddings
    summary = run(copy, [], ClusterConfig(algorithm=algorithm, min_cluster_calls=3))
    assert summary.embedded == 0 and summary.tasks >= 2
    assert summary.unassigned_share <= 0.25
    assert Path(summary.tasks_path) == copy.tasks_file()
    assert sum(t.calls for t in copy.tasks()) + summary.unassigned == summary.calls


def test_fast_embedding_keeps_the_vectors(tau: tuple[Workspace, ClusterSummary]) -> None:
    """The router's one-pass (bf16 where the CPU has it) vectors match clustering's."""
    ws, _ = tau
    with open_store(ws.store_url) as st:
        calls = [s.record for s in st.iter_calls()][:6]
    texts = [message_text(c.request.messages[-1].get("content")) for c in calls] + [""]
    slow, fast = Embedder().encode(texts), Embedder(fast=True).encode_few(texts)
    assert fast.shape == slow.shape and not fast[-1].any()
    assert ((slow[:-1] * fast[:-1]).sum(axis=1) > 0.999).all()


def test_run_holds_out_what_the_train_recipe_replays(tmp_path: Path) -> None:
    """`slmify run` widens the router's held-out share to the train recipe's test and
    calibration fractions; a share already wider stays."""
    from slmify.recipes import load_recipe
    from slmify.runconfig import ClusterRunConfig, resolve_cluster_recipe

    recipe = load_recipe(
        "cpu-smollm2-135m", ["dataset.test_fraction=0.3", "dataset.calibration_fraction=0.2"]
    )
    config = resolve_cluster_recipe(ClusterRunConfig(), tmp_path, recipe)
    assert config.holdout_share == pytest.approx(0.5)
    wide = ClusterRunConfig(overrides=["holdout_share=0.6"])
    assert resolve_cluster_recipe(wide, tmp_path, recipe).holdout_share == 0.6


def _copy(ws: Workspace, to: Path) -> Workspace:
    shutil.copytree(ws.root, to)
    return Workspace.resolve(to)


def test_a_router_on_turn_ngrams_embeds_each_task_statement_once(
    tau: tuple[Workspace, ClusterSummary], tmp_path: Path
) -> None:
    """router_features=[task_embedding, turn_ngrams]: the last turn's TF-IDF replaces its
    embedding, its vectors are sklearn's, and MiniLM embeds only each session's task
    statement, once."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    from slmify.features import load_views, strip_boilerplate
    from slmify.workspace import router_weights_file

    ws = _copy(tau[0], tmp_path / "ws")
    features = ["turn_ngrams", "task_embedding"]  # stored in a fixed order
    run(ws, [], ClusterConfig(min_cluster_calls=3, router_features=features))
    assert ws.assignments() == tau[0].assignments()  # the router's features leave the tasks
    router = load_router(ws.router_dir())
    assert router.meta.features == ["turn_ngrams"] and router.turn_proj is None
    assert router.meta.task_features == ["task_embedding"] and router.task_ngrams is None
    with np.load(router_weights_file(ws.router_dir())) as a:
        assert "turn_mean" not in a and a["turn_idf"].shape == (len(router.meta.turn_ngrams),)
    # Vocabulary and idf are sklearn's on the fitted calls' last turns (boilerplate
    # removed); the loaded router gives sklearn's vectors for every call.
    with open_store(ws.store_url) as st:
        views, _ = strip_boilerplate(load_views(st, len))
    turns = [v.inputs.turn_text for v in views]
    fitted = [t for v, t in zip(views, turns, strict=True) if hash_unit(v.session) >= 0.35]
    assert 0 < len(fitted) < len(turns)
    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=5000)
    tfidf.fit(fitted)
    assert router.meta.turn_ngrams == tfidf.get_feature_names_out().tolist()
    assert abs(router.ngrams(turns) - tfidf.transform(turns)).max() < 1e-6
    # Routing: MiniLM reads each distinct task statement once, never a later turn.
    embedded: list[str] = []
    embed = router._embed
    router._embed = lambda texts: embedded.extend(texts) or embed(texts)
    with open_store(ws.store_url) as st:
        calls = [s.record for s in st.iter_calls()][:40]
    routed = [router.route(c.request) for c in calls]
    assert sorted(embedded) == sorted({router.prepare(c.request).task_text for c in calls})
    assigned = ws.assignments()
    agree = sum(t == assigned.get(c.id) for c, (t, _) in zip(calls, routed, strict=True))
    assert agree >= 0.6 * len(calls)


def test_a_router_json_without_features_routes_as_before(
    tau: tuple[Workspace, ClusterSummary], tmp_path: Path
) -> None:
    """A router.json written before `features`, `turn_ngrams`, `task_features` and
    `task_ngrams` (both texts embedded, no n-grams) loads and routes exactly as the router
    that wrote it."""
    ws = _copy(tau[0], tmp_path / "ws")
    features = ["task_embedding", "turn_embedding"]
    run(ws, [], ClusterConfig(min_cluster_calls=3, router_features=features))
    with open_store(ws.store_url) as st:
        requests = [s.record.request for s in st.iter_calls()][:12]
    router = load_router(ws.router_dir())
    assert router.meta.features == ["turn_embedding"] and router.ngrams is None
    before = router.route_many(requests)
    path = ws.router_dir() / "router.json"
    old = json.loads(path.read_text(encoding="utf-8"))
    assert old.pop("features") == ["turn_embedding"] and old.pop("turn_ngrams") == []
    assert old.pop("task_features") == ["task_embedding"] and old.pop("task_ngrams") == []
    path.write_text(json.dumps(old, indent=1), encoding="utf-8")
    legacy = load_router(ws.router_dir())
    assert legacy.meta.features is None and legacy.turn_proj is not None
    assert legacy.meta.task_features is None and legacy.task_proj is not None
    assert legacy.route_many(requests) == before


def test_router_features_name_the_bad_one() -> None:
    with pytest.raises(ClusterError) as e:
        load_cluster_config("default", ["router_features=[turn_ngrams, turn_words]"])
    names = "'task_embedding', 'task_ngrams', 'turn_embedding', 'turn_ngrams' or 'reply_ngrams'"
    assert str(e.value).endswith(f"router_features.1: Input should be {names}")


def test_a_router_on_ngrams_alone_never_runs_minilm(
    tau: tuple[Workspace, ClusterSummary], tmp_path: Path
) -> None:
    """router_features=[task_ngrams, turn_ngrams]: the task statement's TF-IDF (sklearn's,
    fitted on the fitted calls' statements) replaces its embedding; warming
    up and routing never load MiniLM, and routing the held-out calls one at a time gives
    router.json's held-out figures exactly (no embedding, so no bf16 drift)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    from slmify.features import load_views, strip_boilerplate
    from slmify.workspace import router_weights_file

    ws = _copy(tau[0], tmp_path / "ws")
    features = ["turn_ngrams", "task_ngrams"]
    run(ws, [], ClusterConfig(min_cluster_calls=3, router_features=features))
    router = load_router(ws.router_dir())
    assert (router.meta.task_features, router.meta.features) == (["task_ngrams"], ["turn_ngrams"])
    assert router.task_proj is None and router.turn_proj is None and not router.embeds
    with np.load(router_weights_file(ws.router_dir())) as a:
        assert sorted(a.files) == ["coef", "intercept", "task_idf", "turn_idf"]
        meta = router.meta
        fixed = len(meta.identities) + 5 + 3 + len(meta.previous_actions)  # one-hot blocks
        ngrams = len(meta.turn_ngrams) + len(meta.task_ngrams)
        assert a["coef"].shape[1] == fixed + ngrams and len(meta.task_ngrams) > 0
    with open_store(ws.store_url) as st:
        views, _ = strip_boilerplate(load_views(st, len))
        requests = {s.record.id: s.record.request for s in st.iter_calls()}
    statements = [v.inputs.task_text for v in views]
    fitted = [t for v, t in zip(views, statements, strict=True) if hash_unit(v.session) >= 0.35]
    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=5000)
    tfidf.fit(fitted)
    assert router.meta.task_ngrams == tfidf.get_feature_names_out().tolist()
    assert abs(router.task_ngrams(statements) - tfidf.transform(statements)).max() < 1e-6

    def no_minilm(texts: list[str]) -> np.ndarray:
        raise AssertionError(f"MiniLM ran on {texts[:1]}")

    router._embed = no_minilm
    router.warm_up()
    assigned = ws.assignments()
    held = [v.id for v in views if hash_unit(v.session) < 0.35]
    routed = [router.route(requests[i])[0] for i in held]
    assert router._embedder is None and not router._task_cache
    hits = [t == assigned[i] for t, i in zip(routed, held, strict=True)]
    sent = [h for h, t in zip(hits, routed, strict=True) if t is not None]
    holdout = router.meta.holdout
    assert holdout["test_calls"] == len(held)
    assert holdout["accuracy"] == round(float(np.mean(hits)), 4)
    assert holdout["routed_share"] == round(len(sent) / len(held), 4)
    assert holdout["accuracy_when_routed"] == round(float(np.mean(sent)), 4)
