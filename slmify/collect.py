"""S1 collect: import existing LLM call logs into the store.

Reads files record by record (slmify.logfiles: `.gz` transparently, never the whole file
in memory), detects each file's format from its first record, converts every record to a
`CallRecord` (requests and answers parsed by slmify.callparse, OTLP spans by slmify.otlp)
and inserts them into the store in batches of one transaction each (a second thread
writes one batch while the next is read). A record that cannot be used is written to the
rejects file (JSONL: file, line number, reason) and the import goes on. Every record read
is counted exactly once: read = imported + duplicates + conflicts + rejected, where a
conflict is an id already stored with different content (kept as stored, reported in
rejects). Any exception while reading, converting, validating, hashing or serializing one
record rejects that record alone: an odd line never stops an import. A reason names the
field and the rule broken, never a value or message text, and a re-import does not write
the same reject twice. A record is one JSONL line,
except in OTLP, where it is one LLM call span (a line can hold many).

Formats:
- `openai-log`: `{"request": {...}, "response": {...}}`, chat-completions shape, including
  the legacy `functions` / `function_call` API;
- `openai-finetune`: `{"messages": [...]}`, the last assistant turn is the response;
- `otlp`: OpenTelemetry GenAI spans exported as OTLP JSON (`resourceSpans`), read by the
  GenAI semantic conventions (`gen_ai.input.messages`, `gen_ai.output.messages`...);
- `flywheel`: NVIDIA data-flywheel log documents (`request`, `response`, `workload_id`,
  `client_id`, `timestamp`), bare or as an Elasticsearch hit (`_id`, `_source`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from slmify.callparse import Reject, as_reject, parse_request, parse_response, parse_timestamp
from slmify.logfiles import iter_records
from slmify.otlp import calls_from_otlp
from slmify.schema import CallRecord, content_hash
from slmify.store import Store, call_row

# Rows held before one transaction: a few MB of JSON for tool-heavy agents, and an
# interrupted import loses at most this many records, which a re-import adds back.
BATCH = 500


# -- formats and converters: one parsed record -> CallRecord(s) ------------------------


def detect_format(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise Reject("not a JSON object")
    if "resourceSpans" in obj:
        return "otlp"
    doc = obj["_source"] if isinstance(obj.get("_source"), dict) else obj
    if "request" in doc and ("workload_id" in doc or "client_id" in doc):
        return "flywheel"
    if "request" in obj:
        return "openai-log"
    if "messages" in obj:
        return "openai-finetune"
    raise Reject(
        "unknown format: expected an OpenAI log ({request, response}), fine-tuning "
        "({messages}), OTLP JSON ({resourceSpans}) or data-flywheel record"
    )


def from_openai_log(obj: dict[str, Any], source: str) -> list[CallRecord]:
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise Reject("`metadata` is not an object")
    meta = dict(meta)
    response, usage, error = parse_response(obj.get("response"))
    record = {
        "id": str(obj.get("id") or content_hash(obj)),
        "source": source,
        "timestamp": parse_timestamp(obj.get("timestamp") or meta.pop("timestamp", None)),
        "session_id": meta.pop("session_id", None),
        "agent": meta.pop("agent", None),
        "request": parse_request(obj.get("request")),
        "response": response,
        "usage": usage,
        "latency_ms": obj.get("latency_ms"),
        "status": "error" if error else "ok",
        "error": error,
        "metadata": meta,
    }
    return [CallRecord.model_validate(record)]


def from_flywheel(obj: dict[str, Any], source: str) -> list[CallRecord]:
    """A data-flywheel log document: what its apps write to Elasticsearch for the flywheel
    (`timestamp` in epoch seconds, the OpenAI request and response, the app's `client_id`
    and the `workload_id` of the agent step). Its response ids are not unique (the
    blueprint's loader writes `chatcmpl-<timestamp>`), so the id is the document's `_id`
    or a hash of the document."""
    doc_id = obj.get("_id")
    doc = obj["_source"] if isinstance(obj.get("_source"), dict) else obj
    response, usage, error = parse_response(doc.get("response"))
    extra = {k: v for k, v in doc.items() if k not in ("request", "response", "timestamp")}
    record = {
        "id": str(doc_id or content_hash(doc)),
        "source": source,
        "timestamp": parse_timestamp(doc.get("timestamp")),
        "session_id": doc.get("session_id"),
        "agent": doc.get("client_id"),
        "request": parse_request(doc.get("request")),
        "response": response,
        "usage": usage,
        "status": "error" if error else "ok",
        "error": error,
        # workload_id names the agent step (route, node) the flywheel distils per workload.
        "metadata": extra,
    }
    return [CallRecord.model_validate(record)]


def from_finetune(obj: dict[str, Any], source: str) -> list[CallRecord]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise Reject("`messages` is not a list of objects")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise Reject("no assistant turn after a prompt: nothing to use as the response")
    # `weight` is the fine-tuning API's per-turn training switch, not part of a message.
    turns = [{k: v for k, v in m.items() if k != "weight"} for m in messages[: last + 1]]
    answer = turns[-1]
    finish = "stop"
    if answer.get("tool_calls"):
        finish = "tool_calls"
    elif answer.get("function_call"):
        finish = "function_call"
    request = {k: v for k, v in obj.items() if k not in ("messages", "id", "metadata")}
    record = {
        "id": str(obj.get("id") or content_hash(obj)),
        "source": source,
        "request": parse_request({**request, "messages": turns[:-1]}),
        "response": {"message": answer, "finish_reason": finish},
        "metadata": obj.get("metadata") or {},
    }
    return [CallRecord.model_validate(record)]


CONVERTERS: dict[str, Callable[[dict[str, Any], str], list[CallRecord | Reject]]] = {
    "openai-log": from_openai_log,
    "openai-finetune": from_finetune,
    "otlp": calls_from_otlp,
    "flywheel": from_flywheel,
}


# -- the import loop ------------------------------------------------------------------


def import_files(
    store: Store, paths: list[Path], rejects_path: Path, progress: bool = False
) -> dict[str, Any]:
    """Import every record of `paths` into `store`; returns the summary counts."""
    totals = {"read": 0, "imported": 0, "duplicates": 0, "conflicts": 0, "rejected": 0}
    formats: dict[str, str] = {}
    bar = _progress(paths) if progress else None
    with RejectsFile(rejects_path) as rejects, BatchWriter(store, totals, rejects) as writer:
        for path in paths:
            batch: list[tuple[Any, ...]] = []
            where: list[int] = []  # the line of each row in `batch`
            refused: list[tuple[int, str]] = []  # (line, reason) among the batch's lines
            for lineno, result in _convert_file(path, formats):
                totals["read"] += 1
                if isinstance(result, Reject):
                    totals["rejected"] += 1
                    refused.append((lineno, str(result)))
                    continue
                batch.append(result)
                where.append(lineno)
                if len(batch) >= BATCH:
                    writer.submit(path, batch, where, refused)
                    batch, where, refused = [], [], []
                    if bar is not None:
                        bar.update(bar.task_ids[0], completed=totals["read"])
            writer.submit(path, batch, where, refused)
    if bar is not None:
        bar.stop()
    return {**totals, "formats": formats, "rejects": str(rejects_path), "store": store.location}


CONFLICT = "conflict: id already stored with different content"


class RejectsFile:
    """rejects.jsonl, appended to; a reject already written (same file, line and reason)
    is not written again, so re-importing a file does not grow it."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: set[tuple[str, int, str]] = set()
        if path.exists():
            with path.open("rb") as f:
                for line in f:
                    try:
                        r = orjson.loads(line)
                        self.seen.add((r.get("file"), r.get("line"), r.get("reason")))
                    except (orjson.JSONDecodeError, AttributeError):
                        continue  # a line cut by a crash: the reject is written again

    def __enter__(self) -> RejectsFile:
        self.f = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def add(self, file: str, line: int, reason: str, kind: str = "reject") -> None:
        if (file, line, reason) in self.seen:
            return
        self.seen.add((file, line, reason))
        row = {"file": file, "line": line, "reason": reason}
        if kind != "reject":
            row["kind"] = kind
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")


class BatchWriter:
    """Inserts each batch in a second thread while the next one is parsed: SQLite lets go
    of the GIL while it writes, which was a third of an import's time. One batch at most is
    in flight, and its outcome (counts, conflicts) is taken before the next is sent, so the
    connection is never used by both threads, rejects keep their order and a crash loses at
    most two batches (one being written, one being read), which a re-import adds back."""

    def __init__(self, store: Store, totals: dict[str, int], rejects: RejectsFile):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.totals, self.rejects = store, totals, rejects
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="slmify-import")
        self.in_flight: tuple[Any, Path, list[tuple[Any, ...]], list[int]] | None = None

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.settle()
            elif self.in_flight is not None:
                self.in_flight[0].exception()  # an interrupted import: let its batch commit
        finally:
            self.pool.shutdown(wait=True)

    def submit(
        self, path: Path, batch: list[tuple[Any, ...]], where: list[int], refused: list
    ) -> None:
        """Send `batch` (rows read from the lines `where`) once the previous one is settled;
        `refused` are the (line, reason) rejects read since, written after its conflicts."""
        self.settle()
        for line, reason in refused:
            self.rejects.add(str(path), line, reason)
        if batch:
            self.in_flight = (self.pool.submit(self.store.add_rows, batch), path, batch, where)

    def settle(self) -> None:
        """Wait for the batch in flight and count it: imported, duplicates, conflicts."""
        if self.in_flight is None:
            return
        future, path, batch, where = self.in_flight
        self.in_flight = None
        imported, dups = future.result()
        self.totals["imported"] += imported
        if dups:
            repeated = set(dups)
            rows = [(row, n) for row, n in zip(batch, where, strict=True) if row[0] in repeated]
            conflicts = _conflicts(self.store, rows)
            for line in conflicts:
                self.rejects.add(str(path), line, CONFLICT, "conflict")
            self.totals["conflicts"] += len(conflicts)
            self.totals["duplicates"] += len(dups) - len(conflicts)


def _conflicts(store: Store, rows: list[tuple[tuple[Any, ...], int]]) -> list[int]:
    """The lines of `rows` (whose ids are all stored now) whose content differs from the
    stored call's. A curated call's stored hash is of its scrubbed text, so the incoming
    record is scrubbed the same way first (a slow path, taken for repeated ids only)."""
    stored = store.stored_hashes([row[0] for row, _ in rows])
    out = []
    for row, line in rows:
        stored_hash, curated = stored[row[0]]
        mine = row[7]
        if curated:
            from slmify.curate import masked_hash
            from slmify.scrub import Scrubber

            mine = masked_hash(Scrubber().record(CallRecord.model_validate_json(row[8])))
        if mine != stored_hash:
            out.append(line)
    return out


def _convert_file(
    path: Path, formats: dict[str, str]
) -> Iterator[tuple[int, tuple[Any, ...] | Reject]]:
    """(line number, `calls` row or why the record was rejected) for every record of a file."""
    for lineno, obj, error in iter_records(path):
        if error:
            yield lineno, Reject(error)
            continue
        try:
            fmt = detect_format(obj)
            expected = formats.setdefault(str(path), fmt)
            if fmt != expected:
                raise Reject(f"a {fmt} record in a file of {expected} records")
            results = CONVERTERS[fmt](obj, f"{path}:{lineno}")
        except Exception as e:  # noqa: BLE001 - one record's failure must not end the import
            results = [as_reject(e)]
        for result in results:
            if isinstance(result, Reject):
                yield lineno, result
                continue
            try:
                # Hashing and serializing fail on what validation let through (orjson stops
                # at 255 levels of nesting, lone surrogates are not UTF-8).
                yield lineno, call_row(result)
            except Exception as e:  # noqa: BLE001
                yield lineno, as_reject(e)


def _progress(paths: list[Path]):  # noqa: ANN202
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task(f"importing {len(paths)} file(s)", total=None)
    bar.start()
    return bar
