"""The call store's tables: a list of migrations, each applied once and recorded in
`_migrations`, like simonw/llm's store, the same SQL for SQLite and PostgreSQL.

Reads and writes the database of the `Store` (slmify.store) it is given: `migrate`
creates the tables a new or older store lacks, and records each migration it applied.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmify.store import Store

MIGRATIONS: list[Callable[[str], list[str]]] = []


def migration(fn: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_calls(dialect: str) -> list[str]:
    seq = "INTEGER PRIMARY KEY AUTOINCREMENT"
    if dialect == "postgresql":
        seq = "BIGSERIAL PRIMARY KEY"
    return [
        f"""CREATE TABLE calls (
            seq {seq},
            id TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL,
            timestamp TEXT,
            session_id TEXT,
            agent TEXT,
            model TEXT,
            status TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            record TEXT NOT NULL,
            raw_record TEXT,
            curation TEXT,
            duplicate_of TEXT,
            excluded TEXT,
            imported_at TEXT NOT NULL
        )""",
        "CREATE INDEX calls_content_hash ON calls (content_hash)",
        "CREATE INDEX calls_session ON calls (session_id)",
    ]


@migration
def m002_embeddings(dialect: str) -> list[str]:
    blob = "BYTEA" if dialect == "postgresql" else "BLOB"
    return [
        f"""CREATE TABLE embeddings (
            model TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            vector {blob} NOT NULL,
            PRIMARY KEY (model, content_hash)
        )"""
    ]


@migration
def m003_placeholders(dialect: str) -> list[str]:
    # Which placeholder a value got in a session, by keyed hashes (slmify.scrub): curation
    # runs that resume or add calls give a value the same placeholder. No value is stored.
    return [
        """CREATE TABLE placeholders (
            scope TEXT NOT NULL,
            value_hash TEXT NOT NULL,
            placeholder TEXT NOT NULL,
            PRIMARY KEY (scope, value_hash)
        )"""
    ]


def migrate(store: Store) -> None:
    """Apply the migrations not applied yet, all in one transaction that first takes
    the write lock (SQLite's BEGIN IMMEDIATE, a PostgreSQL advisory lock): two stores
    opened at once on a new database queue here, and the second finds them done."""
    try:  # the usual case, an up-to-date store, takes no write lock
        names = {row[0] for row in store.execute("SELECT name FROM _migrations").fetchall()}
        if names >= {fn.__name__ for fn in MIGRATIONS}:
            return
    except (sqlite3.OperationalError, *_missing_table_errors(store.dialect)):
        pass  # no _migrations table yet

    def apply(cur: Any) -> None:
        if store.dialect == "postgresql":
            cur.execute("SELECT pg_advisory_xact_lock(7715007)")  # any constant key
        cur.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
        cur.execute("SELECT name FROM _migrations")
        done = {row[0] for row in cur.fetchall()}
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            for stmt in fn(store.dialect):
                cur.execute(stmt)
            cur.execute(
                store.sql(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, CURRENT_TIMESTAMP)"
                ),
                (fn.__name__,),
            )

    store.transaction(apply)


def _missing_table_errors(dialect: str) -> tuple[type[Exception], ...]:
    if dialect != "postgresql":
        return ()
    import psycopg

    return (psycopg.errors.UndefinedTable,)
