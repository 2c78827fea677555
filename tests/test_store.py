"""The call store on SQLite and on a real PostgreSQL server: migrations, atomic batches,
idempotent inserts, faithful round trips, the embeddings cache.

PostgreSQL cases run on a fresh schema per test (`postgres_url` in conftest.py) and skip
when no server is reachable, unless SLMIFY_TEST_POSTGRES (set by .ci/run) promised one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import dataset
from typer.testing import CliRunner

from slmify.cli import app
from slmify.schema import CallRecord
from slmify.store import (
    Store,
    StoreError,
    call_row,
    open_store,
    record_json,
    redact_url,
)
from slmify.store_migrations import MIGRATIONS


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "calls.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as st:
        yield st


def record(i: int, **extra: object) -> CallRecord:
    return CallRecord.model_validate(
        {
            "id": f"call-{i}",
            "source": f"test:{i}",
            "timestamp": datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
            "session_id": "s1",
            "agent": "bot",
            "request": {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": f"question {i} — é"}],
                "params": {"temperature": 0.5},
            },
            "response": {
                "message": {"role": "assistant", "content": f"answer {i}"},
                "finish_reason": "stop",
                "response_id": f"r{i}",
            },
            "usage": {"prompt_tokens": 10, "completion_tokens": 2},
            **extra,
        }
    )


def test_migrations_applied_once_each_and_recorded(store_url: str) -> None:
    with open_store(store_url) as st:
        first = st.execute("SELECT name, applied_at FROM _migrations ORDER BY name").fetchall()
        st.add_calls([record(1)])
    with open_store(store_url) as st:  # reopening applies nothing again and loses nothing
        again = st.execute("SELECT name, applied_at FROM _migrations ORDER BY name").fetchall()
        assert st.count_calls() == 1
    assert [name for name, _ in first] == sorted(fn.__name__ for fn in MIGRATIONS)
    assert again == first


def test_sqlite_store_uses_wal(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "calls.db")) as st:
        assert st.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_round_trip_is_faithful(store: Store) -> None:
    originals = [record(i) for i in range(3)]
    store.add_calls(originals)
    stored = list(store.iter_calls())
    assert [s.record for s in stored] == originals
    assert [s.seq for s in stored] == sorted(s.seq for s in stored)
    assert store.get_call("call-1").record == originals[1]
    assert store.get_call("nope") is None
    assert list(store.iter_calls(after_seq=stored[1].seq))[0].record == originals[2]


def test_inserting_present_ids_is_a_counted_no_op(store: Store) -> None:
    assert store.add_calls([record(1), record(2)]) == (2, [])
    changed = record(2, agent="other")  # same id, other content: the first one stays
    assert store.add_calls([record(3), changed, record(3)]) == (1, ["call-2", "call-3"])
    assert store.count_calls() == 3
    assert store.get_call("call-2").record.agent == "bot"


def test_a_failing_batch_leaves_the_store_as_before(store: Store) -> None:
    store.add_calls([record(1)])
    rows = [call_row(record(i)) for i in range(2, 6)]
    rows[2] = (rows[2][0], None, *rows[2][2:])  # `source` is NOT NULL: fails mid-batch
    with pytest.raises(Exception, match="(?i)null"):
        store.add_rows(rows)
    assert store.count_calls() == 1
    assert [s.record.id for s in store.iter_calls()] == ["call-1"]
    assert store.add_calls([record(2)]) == (1, [])  # the store is usable afterwards


def test_content_hash_is_canonical_json_of_request_and_answer() -> None:
    rec = record(1)
    canonical = json.dumps(
        {
            "request": rec.request.model_dump(mode="json"),
            "response": rec.response.model_dump(mode="json", exclude={"response_id"}),
        },
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert rec.content_hash() == hashlib.sha256(canonical.encode()).hexdigest()
    # Ids, sources and the provider's response id are not content.
    assert record(2, id="x", source="y").content_hash() != rec.content_hash()
    other_id = rec.model_copy(update={"id": "z", "source": "elsewhere"})
    assert other_id.content_hash() == rec.content_hash()
    row = call_row(rec)
    assert row[7] == rec.content_hash() and CallRecord.model_validate_json(row[8]) == rec


def test_record_json_is_pydantics_json() -> None:
    """The stored JSON is written by orjson from the fields, byte for byte what
    `model_dump_json` writes, and by pydantic where orjson refuses a value."""
    rec = record(1, latency_ms=12.5, metadata={"tags": ["a", "ü"], "n": None, "f": 1e-07})
    assert record_json(rec) == rec.model_dump_json()
    naive = rec.model_copy(update={"timestamp": datetime(2025, 1, 2, 3, 4, 5, 600)})
    assert record_json(naive) == naive.model_dump_json()
    huge = record(2, metadata={"n": 2**70, "by_id": {7: "x"}})  # orjson refuses both
    assert record_json(huge) == huge.model_dump_json()
    assert CallRecord.model_validate_json(record_json(huge)).metadata["n"] == 2**70


def test_embeddings_cache(store: Store) -> None:
    vectors = {"h1": np.arange(4, dtype=np.float32), "h2": np.ones(4, dtype=np.float32)}
    store.put_embeddings("minilm", vectors)
    store.put_embeddings("minilm", {"h1": np.zeros(4)})  # present: kept as first written
    got = store.get_embeddings("minilm", ["h1", "h2", "h3"])
    assert sorted(got) == ["h1", "h2"]
    np.testing.assert_array_equal(got["h1"], vectors["h1"])
    assert store.get_embeddings("other-model", ["h1"]) == {}


def test_urls_are_redacted_and_unreachable_servers_named() -> None:
    url = "postgresql://slm:s3cret@127.0.0.1:1/calls"
    assert redact_url(url) == "postgresql://slm:***@127.0.0.1:1/calls"
    with pytest.raises(StoreError) as err:
        open_store(url)
    assert "cannot connect to PostgreSQL store postgresql://slm:***@127.0.0.1:1/calls" in str(
        err.value
    )
    assert "s3cret" not in str(err.value)


@pytest.mark.postgres
def test_cli_imports_a_real_set_into_postgresql(postgres_url: str) -> None:
    path = dataset("toolbench-legacy")
    runner = CliRunner()
    args = ["collect", "import", str(path), "--store", postgres_url, "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert (summary["read"], summary["imported"], summary["rejected"]) == (52, 52, 0)
    assert ":***@" in summary["store"] and "slmify@" not in summary["store"]
    again = json.loads(runner.invoke(app, args).stdout)
    assert (again["imported"], again["duplicates"]) == (0, 52)
    with open_store(postgres_url) as st:
        assert st.count_calls() == 52
        rec = st.get_call("toolbench-G1-10-0").record
        assert rec.request.functions and rec.response.message["function_call"]


def test_two_fresh_imports_at_once_both_succeed(store_url: str, tmp_path: Path) -> None:
    """Two stores opened at the same moment on a new database: one applies the migrations,
    the other waits and finds them applied (unserialized, 1 round in 30 failed with
    `table calls already exists`)."""
    import threading

    sqlite = not store_url.startswith("postgresql")
    for round_ in range(30 if sqlite else 1):
        url = str(tmp_path / f"round{round_}" / "calls.db") if sqlite else store_url
        barrier, errors, inserted = threading.Barrier(2), [], []

        def one(k: int, url=url, barrier=barrier, errors=errors, inserted=inserted) -> None:  # noqa: ANN001
            barrier.wait()
            try:
                with open_store(url) as st:
                    inserted.append(st.add_calls([record(100 * k + i) for i in range(5)])[0])
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and inserted == [5, 5]
        with open_store(url) as st:
            assert st.count_calls() == 10
            names = [r[0] for r in st.execute("SELECT name FROM _migrations").fetchall()]
            assert sorted(names) == sorted(fn.__name__ for fn in MIGRATIONS)


def test_a_held_write_lock_is_waited_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer finds the database locked past SQLite's busy wait: it backs off and retries
    instead of failing the batch."""
    import sqlite3
    import threading

    url = str(tmp_path / "calls.db")
    with open_store(url) as st:
        st.conn.execute("PRAGMA busy_timeout=50")  # the 30 s wait, shortened for the test
        blocker = sqlite3.connect(url, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, lambda: blocker.execute("COMMIT")).start()
        assert st.add_calls([record(1)]) == (1, [])
        blocker.close()
