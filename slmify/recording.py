"""Recording forwarded calls: an `Exchange` (slmify.forwarding) becomes a `CallRecord` in
the store, off the response path. Shared by `slmify proxy` and `slmify serve`.

A record's source is `proxy:<upstream>`, its id the upstream's response id, else a uuid;
`session_id` and `agent` come from the `x-slmify-session` / `x-slmify-agent` request
headers. Keys are never stored: a record is built from the request body, those two
headers and the answer; a stream is recorded as the message it adds up to (slmify.sse).

Writes: each exchange is appended to the workspace's recording journal (slmify.journal)
before the answer leaves, so a killed process loses no answered call (the next start
stores them); a writer thread turns exchanges into records and inserts them into the
store in batches, and is drained on shutdown. A call that cannot be made a record goes to
`rejects.jsonl` in the workspace.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from slmify.callparse import parse_request, parse_response
from slmify.forwarding import Exchange
from slmify.journal import Journal, orphans
from slmify.schema import CallRecord, ChatResponse, Usage
from slmify.sse import assemble_stream, parse_sse
from slmify.store import Store

log = logging.getLogger(__name__)

MAX_BATCH = 256


def exchange_to_record(ex: Exchange, record_id: str | None = None) -> CallRecord:
    """The `CallRecord` of one exchange; ValueError if the body is not a chat request.

    Its id is the upstream's response id, else `record_id` (the writer's journal key, so a
    replayed call gets the id it would have had), else a new uuid."""
    try:
        request = parse_request(json.loads(ex.request_body))
    except ValueError as e:
        raise ValueError(f"the request body is not a chat completions request: {e}") from e
    response, usage, error = _answer(ex)
    return CallRecord(
        id=(response.response_id if response and response.response_id else None)
        or record_id
        or str(uuid.uuid4()),
        source=ex.source,
        timestamp=ex.started,
        session_id=ex.session_id,
        agent=ex.agent,
        request=request,
        response=response,
        usage=usage,
        latency_ms=ex.latency_ms,
        status="error" if error else "ok",
        error=error,
        metadata=ex.metadata,
    )


def _answer(ex: Exchange) -> tuple[ChatResponse | None, Usage, str | None]:
    if ex.error:
        return None, Usage(), ex.error
    if ex.status >= 400:
        return None, Usage(), f"HTTP {ex.status}: {_error_text(ex.body)}"
    try:
        completion = assemble_stream(parse_sse(ex.body)) if ex.stream else json.loads(ex.body)
        if isinstance(completion, dict) and completion.get("error"):
            return None, Usage(), f"upstream error: {_error_text(completion)}"
        return parse_response(completion)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # a malformed chunk, say
        return None, Usage(), f"unreadable upstream answer: {e}"


def _error_text(body: bytes | dict[str, Any]) -> str:
    """The `error.message` of an OpenAI error body, else the body's start."""
    try:
        obj = json.loads(body) if isinstance(body, bytes) else body
        err = obj["error"]
        return str(err.get("message") or err) if isinstance(err, dict) else str(err)
    except (ValueError, TypeError, KeyError):
        return body.decode("utf-8", "replace")[:500] if isinstance(body, bytes) else str(body)


class CallWriter:
    """Records exchanges off the response path: a journal, one thread, batched inserts.

    `submit` appends the exchange to the workspace's journal (slmify.journal) before the
    answer leaves, then queues it; the thread turns what is queued into records and inserts
    them as one transaction, so a quiet proxy writes each call at once and a busy one few
    large transactions. At start it first stores what a killed writer left in the journal.
    A call that cannot be made a record (a body nested too deeply, say) is written to
    `rejects.jsonl` with its reason and takes no other call with it; a locked or
    unreachable store is retried with backoff, and what still fails stays in the journal
    for the next start. `close()` drains the queue.
    """

    def __init__(self, store: Store, journal_dir: Path | None = None):
        self.store = store
        self.counts = {"requests": 0, "recorded": 0, "failed": 0, "not_recorded": 0}
        self.replayed = 0  # calls a killed writer had left in the journal, stored now
        folder = journal_dir or _workspace_of(store)
        self.rejects_path = folder / "rejects.jsonl"
        self.journal = Journal(folder)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        for path, entries in orphans(folder):
            self._write([_Pending(*_from_entry(e), None, replay=True) for e in entries])
            self.replayed += len(entries)
            path.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._run, name="slmify-call-writer", daemon=True)
        self._thread.start()

    def submit(self, ex: Exchange) -> None:
        self.counts["requests"] += 1
        key = uuid.uuid4().hex
        try:
            seg = self.journal.append(_to_entry(ex, key))
        except (TypeError, ValueError, OSError) as e:
            # Unjournaled (metadata that is not JSON, a full disk): still recorded if the
            # process lives, like before the journal existed.
            log.warning("call not journaled: %s", type(e).__name__)
            seg = None
        self._queue.put(_Pending(ex, key, seg))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.journal.close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get())
            self._write([p for p in batch if p is not None])
            if None in batch:
                return

    def _write(self, pending: list[_Pending]) -> None:
        records: list[tuple[CallRecord, _Pending]] = []
        for p in pending:
            try:
                records.append((exchange_to_record(p.ex, p.key), p))
            except Exception as e:  # noqa: BLE001 - one odd call must not stop the writer
                self._reject(p, e)
            # Hand the GIL to the event loop between records: otherwise a waiting request
            # can sit out a whole switch interval (5 ms) behind the writer (bench: p99).
            time.sleep(0)
        try:
            self._insert(records)
        except Exception as e:  # noqa: BLE001 - a store outage must not stop the proxy
            self.counts["not_recorded"] += len(records)
            log.error(
                "%d call(s) not recorded, the store failed (%s); they stay in the journal for"
                " the next start",
                len(records),
                e,
            )

    def _insert(self, records: list[tuple[CallRecord, _Pending]]) -> None:
        """Insert as one transaction; if a record in it cannot be serialized, each alone."""
        if not records:
            return
        try:
            _retrying(lambda: self._add([r for r, _ in records], [p for _, p in records]))
        except Exception as e:
            if _store_failure(e) or len(records) == 1:
                if not _store_failure(e):
                    self._reject(records[0][1], e)
                    return
                raise
            for one in records:  # isolate the poisoned record(s)
                self._insert([one])
            return
        self.counts["recorded"] += len(records)
        self.counts["failed"] += sum(r.status == "error" for r, _ in records)
        for _, p in records:
            self._done(p)

    def _add(self, records: list[CallRecord], pending: list[_Pending]) -> None:
        _, dups = self.store.add_calls(records)
        if dups:
            again = _rekeyed(records, pending, dups, self.store)
            if again:
                self.store.add_calls(again)

    def _reject(self, p: _Pending, e: BaseException) -> None:
        from slmify.callparse import as_reject

        self.counts["not_recorded"] += 1
        reason = str(as_reject(e.__cause__ or e))
        log.warning("call not recorded: %s", reason)
        row = {"source": p.ex.source, "started": p.ex.started.isoformat(), "reason": reason}
        try:
            with self.rejects_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            log.error("cannot write %s: %s", self.rejects_path, err)
        self._done(p)

    def _done(self, p: _Pending) -> None:
        if p.seg is not None:
            self.journal.done(p.seg)


@dataclass
class _Pending:
    ex: Exchange
    key: str  # the record's id when the upstream gave none
    seg: int | None  # its journal segment (None: replayed, or not journaled)
    replay: bool = False


def _workspace_of(store: Any) -> Path:
    """The folder of a SQLite store, else the workspace (--workspace is not known here)."""
    if getattr(store, "dialect", None) == "sqlite":
        return Path(store.location).parent
    from slmify.workspace import Workspace

    return Workspace.resolve().root


def _to_entry(ex: Exchange, key: str) -> bytes:
    meta = {
        "key": key,
        "source": ex.source,
        "started": ex.started.isoformat(),
        "session_id": ex.session_id,
        "agent": ex.agent,
        "status": ex.status,
        "stream": ex.stream,
        "latency_ms": ex.latency_ms,
        "error": ex.error,
        "metadata": ex.metadata,
        "request_bytes": len(ex.request_body),
    }
    head = json.dumps(meta).encode()
    return len(head).to_bytes(4, "big") + head + ex.request_body + ex.body


def _from_entry(entry: bytes) -> tuple[Exchange, str]:
    size = int.from_bytes(entry[:4], "big")
    meta = json.loads(entry[4 : 4 + size])
    cut = 4 + size + meta.pop("request_bytes")
    key = meta.pop("key")
    started = datetime.fromisoformat(meta.pop("started"))
    body = entry[cut:]
    return Exchange(request_body=entry[4 + size : cut], body=body, started=started, **meta), key


def _store_failure(e: BaseException) -> bool:
    """An error of the store (locked, unreachable), not of the record being inserted."""
    import sqlite3

    return isinstance(e, sqlite3.Error) or type(e).__module__.startswith("psycopg")


def _retrying(fn: Callable[[], None], attempts: int = 6, first_wait_s: float = 0.5) -> None:
    """`fn()`, retried with backoff (about 30 s in all) while the store fails."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _store_failure(e) or attempt == attempts - 1:
                raise
            log.warning("store failed (%s), retrying", e)
            time.sleep(first_wait_s * 2**attempt)


def _rekeyed(
    records: list[CallRecord], pending: list[_Pending], dups: list[str], store: Any
) -> list[CallRecord]:
    """New ids for the records an id clash kept out of the store.

    Each proxied call is a distinct event, but some upstreams reuse response ids (Ollama
    draws them from 999 values); the upstream id stays in `response.response_id`. The new
    id is drawn from the call's journal key, so a replay finds it; a replayed call already
    stored under its id (same start time) is not stored again.
    """
    left = Counter(dups)
    out = []
    # add_calls keeps the first of an id, skips the rest
    for r, p in reversed(list(zip(records, pending, strict=True))):
        if left[r.id]:
            left[r.id] -= 1
            if p.replay:
                stored = store.get_call(r.id)
                if stored is not None and stored.record.timestamp == r.timestamp:
                    continue
            out.append(r.model_copy(update={"id": f"{r.id}-{p.key[:12]}"}))
    return out
