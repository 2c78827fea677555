"""S1 collect: import existing LLM call logs into the store.

Reads files line by line in binary (`.gz` transparently, never the whole file in memory,
except a pretty-printed JSON document, which has no line structure), detects each file's
format from its first record, converts every record to a `CallRecord` and inserts them in
batches of one transaction each (a second thread writes one batch while the next is
read). A record that cannot be used is written to the rejects file (JSONL: file, line
number, reason) and the import goes on. Every record read is
counted exactly once: read = imported + duplicates + conflicts + rejected, where a conflict
is an id already stored with different content (kept as stored, reported in rejects).
Any exception while reading, converting, validating, hashing or serializing one record
rejects that record alone: an odd line never stops an import. A reason names the field
and the rule broken, never a value or message text, and a re-import does not write the
same reject twice. A record is one JSONL line,
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

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from slmify.schema import CallRecord, ChatRequest, ChatResponse, Usage, content_hash
from slmify.store import Store, call_row

# Rows held before one transaction: a few MB of JSON for tool-heavy agents, and an
# interrupted import loses at most this many records, which a re-import adds back.
BATCH = 500
REQUEST_KEYS = {"model", "messages", "tools", "functions"}


class Reject(ValueError):
    """A record that cannot be imported; the message is the reason written to rejects."""


# -- reading --------------------------------------------------------------------------


def _gunzip_lines(f: Any) -> Iterator[bytes]:
    """The lines of a gzip file, without their b"\\n" (members one after another, as
    `cat a.gz b.gz` makes).

    zlib over 16 KiB reads rather than `gzip.open`, whose readline goes through a Python
    layer per 8 KiB and checksums in Python: a tenth of an import. Every complete line
    before a break is yielded, then EOFError (truncated) or zlib.error (corrupt) is raised.
    """
    z, pending, fed = zlib.decompressobj(31), b"", False
    for raw in iter(lambda: f.read(1 << 14), b""):
        while raw:
            if not fed:  # gzip allows zero padding between and after members
                raw = raw.lstrip(b"\0")
                if not raw:
                    break
            fed = True
            data, error = _inflate(z, raw)
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            yield from lines
            if error is not None:
                raise error
            raw = b""
            if z.eof:  # another member may follow in the rest of this read
                raw, z, fed = z.unused_data, zlib.decompressobj(31), False
    if fed:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")
    if pending:
        yield pending


def _inflate(z: Any, raw: bytes) -> tuple[bytes, zlib.error | None]:
    """(what `raw` decompresses to, the error it ends on): at a break (corrupt data, a bad
    checksum) the read is replayed from a copy of the state before it a byte at a time, so
    all that decompressed before the break is kept."""
    before = z.copy()
    try:
        return z.decompress(raw), None
    except zlib.error as e:
        out = []
        try:
            for i in range(len(raw)):
                out.append(before.decompress(raw[i : i + 1]))
        except zlib.error:
            pass
        return b"".join(out), e


def iter_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object, None) or (line number, None, error) per record.

    A corrupt or truncated gzip ends the file with one error at the line it broke on.
    """
    lineno = 0
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            for lineno, line in enumerate(_gunzip_lines(f) if gz else f, 1):  # noqa: B007
                if lineno == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                    if line.strip() in (b"{", b"["):
                        # A lone bracket is never a JSONL record: a pretty-printed document.
                        yield from _whole_document(path, gz)
                        return
                if not line.strip():
                    continue
                try:
                    yield lineno, orjson.loads(line), None
                except orjson.JSONDecodeError as e:
                    # orjson's message is a position, never the line's text.
                    yield lineno, None, f"malformed JSON: {e}"
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        yield lineno + 1, None, f"corrupt or truncated gzip after line {lineno}: {e}"


def _whole_document(path: Path, gz: bool) -> Iterator[tuple[int, Any, str | None]]:
    """The records of one JSON document: an object, or an array of objects (all at line 1)."""
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        text = f.read().removeprefix(b"\xef\xbb\xbf")
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        yield getattr(e, "lineno", 1), None, f"malformed JSON document: {e}"
        return
    except RecursionError:
        # The stdlib parser recurses per level: a document nested ~1,000 deep.
        yield 1, None, "malformed JSON document: nested too deeply"
        return
    for obj in doc if isinstance(doc, list) else [doc]:
        yield 1, obj, None


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


# -- converters: one parsed record -> CallRecord(s) -----------------------------------


def parse_request(req: Any) -> ChatRequest:
    """A chat-completions request body as `ChatRequest` (the proxy records with it too)."""
    if not isinstance(req, dict):
        raise Reject("`request` is not an object")
    messages = req.get("messages")
    # An empty list is a real (if useless) call and is kept; curation excludes it.
    if not isinstance(messages, list):
        raise Reject("request has no `messages` list")
    if not all(isinstance(m, dict) and "role" in m for m in messages):
        raise Reject("a request message is not an object with a `role`")
    return ChatRequest.model_validate(
        {
            "model": req.get("model"),
            "messages": messages,
            "tools": req.get("tools"),
            "functions": req.get("functions"),
            "params": {k: v for k, v in req.items() if k not in REQUEST_KEYS},
        }
    )


def parse_response(resp: Any) -> tuple[ChatResponse | None, Usage, str | None]:
    """(response, usage, error message) from an OpenAI chat.completion object."""
    if not isinstance(resp, dict):
        raise Reject("record has no `response` object")
    usage = resp.get("usage") or {}
    # Provider extras (prompt_tokens_details...) are not part of `Usage`.
    usage = Usage.model_validate({k: v for k, v in usage.items() if k in Usage.model_fields})
    if "error" in resp and not resp.get("choices"):
        err = resp["error"]
        return None, usage, err.get("message") if isinstance(err, dict) else str(err)
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Reject("response has no `choices`")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise Reject("response choice has no `message`")
    response = {
        "model": resp.get("model"),
        "message": message,
        "finish_reason": choices[0].get("finish_reason"),
        "response_id": resp.get("id"),
    }
    return ChatResponse.model_validate(response), usage, None


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601, or epoch seconds / ms / µs / ns (a number or digits), told apart by size."""
    if value is None or value == "":
        return None
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        or (isinstance(value, str) and value.isdigit())
    ):
        seconds = float(value)
        for _ in range(3):  # ms, µs, ns at the finest
            if abs(seconds) <= 1e11:  # 1e11 s is the year 5138: larger numbers are finer units
                break
            seconds /= 1000
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError) as e:  # NaN, or before the year 1
            raise Reject("timestamp out of range") from e
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as e:
        raise Reject("unreadable timestamp (neither ISO 8601 nor epoch)") from e


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


def from_otlp(obj: dict[str, Any], source: str) -> list[CallRecord | Reject]:
    from slmify.otlp import calls_from_otlp  # imported here: slmify.otlp imports this module

    return calls_from_otlp(obj, source)


CONVERTERS: dict[str, Callable[[dict[str, Any], str], list[CallRecord | Reject]]] = {
    "openai-log": from_openai_log,
    "openai-finetune": from_finetune,
    "otlp": from_otlp,
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


def as_reject(e: BaseException) -> Reject:
    """The reject for an exception raised by one record, its reason free of the record's
    values: pydantic's messages quote the input, and a ValueError can quote anything."""
    from pydantic import ValidationError

    if isinstance(e, Reject):
        return e
    if isinstance(e, RecursionError):
        return Reject("invalid record: nested too deeply")
    if isinstance(e, ValidationError):
        errors = e.errors(include_url=False, include_input=False, include_context=False)
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])[:120]}: {err['msg'][:120]}"
            for err in errors[:3]
        )
        n = e.error_count()
        return Reject(
            f"invalid record: {n} validation error{'s' if n > 1 else ''} for {e.title}: {where}"
        )
    if isinstance(e, ValueError | TypeError) and (
        "Recursion limit" in str(e) or "depth exceeded" in str(e)
    ):  # orjson stops at 255 levels, pydantic's serializer at a few hundred
        return Reject("invalid record: nested too deeply to serialize")
    if isinstance(e, UnicodeError) or "surrogates not allowed" in str(e):
        return Reject("invalid record: text that is not valid Unicode (a lone surrogate)")
    return Reject(f"invalid record: {type(e).__name__} while converting it")


def _progress(paths: list[Path]):  # noqa: ANN202
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task(f"importing {len(paths)} file(s)", total=None)
    bar.start()
    return bar
