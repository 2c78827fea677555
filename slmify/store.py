"""The call store: every collected call, its curation, and cached embeddings.

SQLite (WAL) in the workspace is the embedded default; a `postgresql://` URL points
several proxies on several hosts at one shared store. Both run the same SQL (`?`
placeholders are rewritten for psycopg) and the same list of migrations
(slmify.store_migrations). Rows are built by slmify.store_rows.

A call is one row holding the `CallRecord` as JSON, so a row is written whole or not at
all: an interrupted import never leaves half a record. Ids are unique; inserting an id
that is already there is a no-op that is counted, which makes re-imports idempotent.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmify.errors import SlmifyError
from slmify.schema import CallRecord, Curation
from slmify.store_migrations import migrate
from slmify.store_rows import call_row, record_json


@dataclass
class StoredCall:
    seq: int
    record: CallRecord
    curation: Curation | None


def default_store_url(workspace: Path) -> str:
    return str(workspace / "calls.db")


def open_store(url: str) -> Store:
    """Open (and migrate) the store at a SQLite path or a `postgresql://` URL."""
    if url.startswith(("postgresql://", "postgres://")):
        import psycopg

        try:
            # Autocommit, so `transaction()` blocks are real BEGIN/COMMITs: without it a
            # read opens a transaction that they nest in as savepoints, never committed.
            conn = psycopg.connect(url, connect_timeout=5, autocommit=True)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL store {redact_url(url)}: {e}") from e
        return Store(conn, "postgresql", redact_url(url))
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the proxy's writer thread owns the connection after open.
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    # A call's JSON is often 10-30 KB (system prompt and tool schemas in every call): 16 KiB
    # pages write it in fewer overflow pages, a third less insert time than the default
    # 4 KiB. It only takes effect when the database is created.
    conn.execute("PRAGMA page_size=16384")
    # Switching to WAL takes an exclusive lock and may answer "locked" at once (no busy
    # wait) while another process creates the same database: retried like a write.
    with_retry(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    # NORMAL in WAL mode loses at most the last transactions on power loss, never
    # corrupts; FULL would fsync on every batch of the proxy's writes.
    conn.execute("PRAGMA synchronous=NORMAL")
    return Store(conn, "sqlite", str(path))


def is_locked(e: BaseException) -> bool:
    """A write lock held by another connection for longer than its busy timeout."""
    text = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def with_retry(fn: Callable[[], Any], attempts: int = 8, first_wait_s: float = 0.05) -> Any:
    """`fn()`, retried with exponential backoff (about 13 s in all, on top of SQLite's own
    30 s busy wait per try) while the database is locked; other errors are raised at once."""
    import time

    for attempt in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not is_locked(e) or attempt == attempts - 1:
                raise
            time.sleep(first_wait_s * 2**attempt)
    raise AssertionError("unreachable")


class StoreError(SlmifyError, RuntimeError):
    pass


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and JSON summaries."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Store:
    def __init__(self, conn: Any, dialect: str, location: str):
        self.conn = conn
        self.dialect = dialect
        self.location = location
        migrate(self)

    # -- plumbing ---------------------------------------------------------------------

    def sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self.conn.execute(self.sql(sql), tuple(params))

    def transaction(self, statements: Callable[[Any], Any]) -> Any:
        """`statements(cursor)` in one transaction; SQLite's is retried while locked."""
        if self.dialect == "postgresql":
            with self.conn.transaction():
                return statements(self.conn.cursor())
        return with_retry(lambda: self._sqlite_transaction(statements))

    def _sqlite_transaction(self, statements: Callable[[Any], Any]) -> Any:
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            result = statements(cur)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")
        return result

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------

    def add_calls(self, records: Iterable[CallRecord]) -> tuple[int, list[str]]:
        """Insert records in one transaction; returns (inserted, ids already present)."""
        return self.add_rows([call_row(r) for r in records])

    def add_rows(self, rows: list[tuple[Any, ...]]) -> tuple[int, list[str]]:
        """Insert `call_row` tuples in one transaction; returns (inserted, ids present).

        The importer hands rows rather than records so a batch holds one JSON string per
        call instead of a tree of dicts (less memory, less garbage-collector work).
        """
        if not rows:
            return 0, []
        ids = [r[0] for r in rows]

        def insert(cur: Any) -> tuple[int, list[str]]:
            present = set(self._existing_ids(cur, ids))
            fresh, dups, seen = [], [], set()
            for row in rows:
                if row[0] in present or row[0] in seen:
                    dups.append(row[0])
                    continue
                seen.add(row[0])
                fresh.append(row)
            self._insert_calls(cur, fresh)
            return len(fresh), dups

        return self.transaction(insert)

    def _insert_calls(self, cur: Any, rows: list[tuple[Any, ...]]) -> None:
        """INSERT `call_row` tuples; in SQLite 100 rows per statement (900 parameters, under
        the 999 of old builds). One statement is one step of the engine, run without the
        GIL: the importer's writer thread then writes while the parser runs, where
        executemany took the GIL back for every row and the two threads took turns (6,100
        against 4,400 calls/s on tau-airline, bench/bench_import.py)."""
        # ON CONFLICT covers a concurrent writer (another proxy) racing on the same id.
        sql = (
            "INSERT INTO calls (id, source, timestamp, session_id, agent, model, status,"
            " content_hash, record, imported_at) VALUES {} ON CONFLICT (id) DO NOTHING"
        )
        one = "(?, ?, ?, ?, ?, ?, ?, ?, ?, CURRENT_TIMESTAMP)"
        if self.dialect == "postgresql":
            cur.executemany(self.sql(sql.format(one)), rows)
            return
        for i in range(0, len(rows), 100):
            chunk = rows[i : i + 100]
            cur.execute(sql.format(", ".join([one] * len(chunk))), [v for r in chunk for v in r])

    def _existing_ids(self, cur: Any, ids: list[str]) -> list[str]:
        found: list[str] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            cur.execute(self.sql(f"SELECT id FROM calls WHERE id IN ({marks})"), chunk)
            found.extend(row[0] for row in cur.fetchall())
        return found

    def stored_hashes(self, ids: list[str]) -> dict[str, tuple[str, bool]]:
        """(content hash, curated?) of the stored calls among `ids`."""
        out: dict[str, tuple[str, bool]] = {}
        cur = self.conn.cursor()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            cur.execute(
                self.sql(
                    "SELECT id, content_hash, curation IS NOT NULL FROM calls"
                    f" WHERE id IN ({marks})"
                ),
                chunk,
            )
            out.update((row[0], (row[1], bool(row[2]))) for row in cur.fetchall())
        return out

    def count_calls(self) -> int:
        return self.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def iter_calls(self, training_only: bool = False, after_seq: int = 0) -> Iterator[StoredCall]:
        """Calls in insertion order; `training_only` keeps curated, non-excluded ones."""
        where = "seq > ?"
        if training_only:
            where += " AND curation IS NOT NULL AND excluded IS NULL AND duplicate_of IS NULL"
        cur = self.conn.cursor()
        cur.execute(
            self.sql(f"SELECT seq, record, curation FROM calls WHERE {where} ORDER BY seq"),
            (after_seq,),
        )
        while batch := cur.fetchmany(1000):
            for seq, record, curation in batch:
                yield StoredCall(
                    seq=seq,
                    record=CallRecord.model_validate_json(record),
                    curation=Curation.model_validate_json(curation) if curation else None,
                )

    def get_call(self, call_id: str) -> StoredCall | None:
        row = self.execute(
            "SELECT seq, record, curation FROM calls WHERE id = ?", (call_id,)
        ).fetchone()
        if row is None:
            return None
        return StoredCall(
            row[0],
            CallRecord.model_validate_json(row[1]),
            Curation.model_validate_json(row[2]) if row[2] else None,
        )

    def placeholders(self, scope: str) -> dict[str, str]:
        """value hash -> placeholder already given in a (hashed) curation scope."""
        rows = self.execute(
            "SELECT value_hash, placeholder FROM placeholders WHERE scope = ?", (scope,)
        ).fetchall()
        return {h: p for h, p in rows}

    def save_curation(
        self,
        updates: list[tuple[CallRecord, Curation, CallRecord | None]],
        placeholders: list[tuple[str, str, str]] = (),
    ) -> None:
        """Store curated records: (scrubbed record, decision, raw record to keep or None),
        and the (scope, value hash, placeholder) rows they introduced, in one transaction.

        `content_hash` becomes the decision's `masked_hash`, the key later runs find
        duplicates by; the hash of the raw call is not kept (see `Curation.masked_hash`).
        """

        def write(cur: Any) -> None:
            cur.executemany(
                self.sql(
                    "UPDATE calls SET record = ?, content_hash = ?, curation = ?, duplicate_of = ?,"
                    " excluded = ?, raw_record = COALESCE(?, raw_record) WHERE id = ?"
                ),
                [
                    (
                        record_json(rec),
                        cur_.masked_hash or rec.content_hash(),
                        cur_.model_dump_json(),
                        cur_.duplicate_of,
                        cur_.excluded,
                        record_json(raw) if raw is not None else None,
                        rec.id,
                    )
                    for rec, cur_, raw in updates
                ],
            )
            cur.executemany(
                self.sql(
                    "INSERT INTO placeholders (scope, value_hash, placeholder) VALUES (?, ?, ?)"
                    " ON CONFLICT (scope, value_hash) DO NOTHING"
                ),
                list(placeholders),
            )

        self.transaction(write)

    def stats(self) -> dict[str, Any]:
        def grouped(col: str) -> dict[str, int]:
            rows = self.execute(
                f"SELECT COALESCE({col}, '(none)'), COUNT(*) FROM calls GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
            return {k: v for k, v in rows}

        one = self.execute(
            "SELECT COUNT(*),"
            " SUM(CASE WHEN curation IS NOT NULL THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN duplicate_of IS NOT NULL THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN excluded IS NOT NULL THEN 1 ELSE 0 END)"
            " FROM calls"
        ).fetchone()
        if self.dialect == "postgresql":
            usage = "(record::jsonb #>> '{{usage,{}}}')::bigint"
        else:
            usage = "json_extract(record, '$.usage.{}')"
        prompt, completion = usage.format("prompt_tokens"), usage.format("completion_tokens")
        tokens = self.execute(
            f"SELECT SUM({prompt}), SUM({completion}),"
            f" SUM(CASE WHEN {prompt} IS NULL OR {completion} IS NULL THEN 1 ELSE 0 END)"
            " FROM calls"
        ).fetchone()
        scrubbed: Counter[str] = Counter()
        for (curation,) in self.execute(
            "SELECT curation FROM calls WHERE curation IS NOT NULL"
        ).fetchall():
            scrubbed.update(json.loads(curation).get("replacements") or {})
        return {
            "calls": one[0],
            "curated": one[1] or 0,
            "duplicates": one[2] or 0,
            "excluded": one[3] or 0,
            "by_agent": grouped("agent"),
            "by_model": grouped("model"),
            "by_status": grouped("status"),
            "excluded_by_reason": {k: v for k, v in grouped("excluded").items() if k != "(none)"},
            # int(): PostgreSQL sums bigints as numeric (Decimal).
            "tokens": {
                "prompt": int(tokens[0] or 0),
                "completion": int(tokens[1] or 0),
                "calls_without_counts": int(tokens[2] or 0),
            },
            "scrubbed_by_type": dict(scrubbed.most_common()),
        }

    # -- embeddings cache ---------------------------------------------------------------

    def get_embeddings(self, model: str, hashes: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        cur = self.conn.cursor()
        for i in range(0, len(hashes), 500):
            chunk = hashes[i : i + 500]
            marks = ",".join("?" * len(chunk))
            cur.execute(
                self.sql(
                    f"SELECT content_hash, vector FROM embeddings"
                    f" WHERE model = ? AND content_hash IN ({marks})"
                ),
                [model, *chunk],
            )
            for h, blob in cur.fetchall():
                out[h] = np.frombuffer(bytes(blob), dtype=np.float32)
        return out

    def put_embeddings(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        rows = [(model, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in vectors.items()]
        self.transaction(
            lambda cur: cur.executemany(
                self.sql(
                    "INSERT INTO embeddings (model, content_hash, vector) VALUES (?, ?, ?)"
                    " ON CONFLICT (model, content_hash) DO NOTHING"
                ),
                rows,
            )
        )


def dump_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically (temp file, then rename); returns the row count."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
