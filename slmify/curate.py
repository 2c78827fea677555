"""S2 curate: scrub PII, mark duplicates and failed calls, so only clean calls train.

Reads the calls not curated yet from the store, in insertion order; writes each back
scrubbed (the scrubbed record replaces the stored one, the raw record is kept in
`raw_record` only with `keep_raw`) with its `Curation`: replacements by type, the
first call it duplicates, or why it is excluded. `store.iter_calls(training_only=True)`
then yields only curated, non-duplicate, non-excluded calls. An audit report (JSON)
counts what was replaced by type and by field.

Incremental and idempotent: a run curates only calls with no curation yet, finds
duplicates against every call already curated, and a second run changes nothing.
Placeholders are consistent per session (`session_id`, else the call id), across runs
too: each value's placeholder is stored under an HMAC of the value (key: `scrub.key` in the
workspace, made at the first run), in the transaction of the chunk that introduced it, so
an incremental or interrupted run gives the value the same placeholder. Values are never
stored, only their keyed hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from slmify.schema import CallRecord, Curation
from slmify.scrub import Scrubber, SpanCache, highest_placeholders, masked
from slmify.store import Store

CHUNK = 500


def exclusion_reason(rec: CallRecord) -> str | None:
    """Why a call must not train a specialist, or None if it may."""
    if rec.status == "error":
        return "error"
    if rec.source.startswith("specialist:"):
        # Served by `slmify serve` from a specialist, not the LLM: training on it would
        # teach the specialist its own answers. It still counts for drift and shares.
        return "specialist-answer"
    if not rec.request.messages:
        return "empty-request"
    if rec.response is None:
        return "no-response"
    if rec.response.finish_reason == "length":
        return "truncated"
    if not rec.output_text().strip() and not rec.tool_calls():
        return "empty-output"
    return None


def masked_hash(rec: CallRecord) -> str:
    """The content hash of a scrubbed call with placeholder numbers dropped."""
    return hashlib.sha256(masked(_canonical_json(rec)).encode("utf-8")).hexdigest()


# Where orjson and `json.dumps` spell a float differently: only below 1e-4 (`1e-05` is
# `0.00001` to orjson, `1e-07` is `1e-7`), so never in text without one of these.
_FLOAT_SPELLING = re.compile(rb"\de-|0\.0000")


def _canonical_json(rec: CallRecord) -> str:
    """The request and answer as `json.dumps(..., sort_keys=True, ensure_ascii=False,
    separators=(",", ":"))` of their `model_dump(mode="json")`, the text that stored hashes
    were made of; written by orjson from the models' fields (five times faster), which
    is the same text for JSON values, unless it may hold a float the two spell differently
    or a value that is not plain JSON (refused by the passthrough options)."""
    import orjson

    response = rec.response
    fields = {
        "request": rec.request.__dict__,
        "response": {k: v for k, v in response.__dict__.items() if k != "response_id"}
        if response
        else None,
    }
    plain_json_only = (
        orjson.OPT_SORT_KEYS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )
    try:
        blob = orjson.dumps(fields, option=plain_json_only)
        if not _FLOAT_SPELLING.search(blob):
            return blob.decode("utf-8")
    except TypeError:  # a value orjson refuses (an integer over 64 bits, a datetime...)
        pass
    part = {
        "request": rec.request.model_dump(mode="json"),
        "response": response.model_dump(mode="json", exclude={"response_id"}) if response else None,
    }
    return json.dumps(part, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class _Run:
    """One curation run: its scopes, the duplicate keys seen, and the audit counts."""

    def __init__(self, store: Store, keep_raw: bool, key: bytes):
        self.store = store
        self.key = key
        self.keep_raw = keep_raw
        self.scopes: dict[str, Scrubber] = {}
        self.spans = SpanCache()  # shared: sessions repeat each other's prompts
        self.scope_hashes: dict[str, str] = {}
        # The first call (by seq) of each masked hash, over everything already curated.
        self.first: dict[str, str] = {}
        for key, call_id in store.execute(
            "SELECT content_hash, id FROM calls"
            " WHERE curation IS NOT NULL AND duplicate_of IS NULL ORDER BY seq"
        ).fetchall():
            self.first.setdefault(key, call_id)
        self.by_field: Counter[tuple[str, str]] = Counter()
        self.excluded: Counter[str] = Counter()
        self.curated = self.scrubbed = self.duplicates = 0

    def scrubber(self, rec: CallRecord) -> Scrubber:
        scope = f"session:{rec.session_id}" if rec.session_id is not None else f"call:{rec.id}"
        if scope not in self.scopes:
            start: dict[str, int] = {}
            # The scope is stored hashed too: a session id can be an email.
            scope_hash = hmac.new(self.key, scope.encode(), hashlib.sha256).hexdigest()[:32]
            known = self.store.placeholders(scope_hash)
            if rec.session_id is not None:
                done = self.store.execute(
                    "SELECT record FROM calls WHERE session_id = ? AND curation IS NOT NULL",
                    (rec.session_id,),
                ).fetchall()
                start = highest_placeholders([row[0] for row in done] + list(known.values()))
            self.scopes[scope] = Scrubber(start, key=self.key, known=known, spans=self.spans)
            self.scope_hashes[scope] = scope_hash
        return self.scopes[scope]

    def new_placeholders(self) -> list[tuple[str, str, str]]:
        """(scope hash, value hash, placeholder) assigned since the last call."""
        rows = []
        for scope, scrubber in self.scopes.items():
            rows += [(self.scope_hashes[scope], h, p) for h, p in scrubber.assigned.items()]
            scrubber.assigned.clear()
        return rows

    def curate(self, stored: str) -> tuple[CallRecord, Curation, CallRecord | None]:
        """Curate one stored record (its JSON): the scrubbed record, the decision, and the
        raw record when it is kept."""
        rec = CallRecord.model_validate_json(stored)
        scrubber = self.scrubber(rec)
        excluded = exclusion_reason(rec)
        # The raw record is parsed a second time when kept, not copied: the record is
        # scrubbed in place.
        raw = CallRecord.model_validate_json(stored) if self.keep_raw else None
        before = scrubber.counts.copy()
        clean = scrubber.scrub(rec)
        replaced = scrubber.counts - before
        self.by_field.update(replaced)
        by_type: Counter[str] = Counter()
        for (_, kind), n in replaced.items():
            by_type[kind] += n
        key = masked_hash(clean)
        duplicate_of = self.first.get(key)
        if duplicate_of is None:
            self.first[key] = clean.id
        decision = Curation(
            scrubbed=bool(by_type),
            replacements=dict(sorted(by_type.items())),
            duplicate_of=duplicate_of,
            excluded=excluded,
            masked_hash=key,
        )
        self.curated += 1
        self.scrubbed += decision.scrubbed
        self.duplicates += duplicate_of is not None
        if decision.excluded:
            self.excluded[decision.excluded] += 1
        return clean, decision, raw

    def report(self, seconds: float) -> dict[str, Any]:
        by_type: Counter[str] = Counter()
        by_field: dict[str, dict[str, int]] = {}
        for (field, kind), n in sorted(self.by_field.items()):
            by_type[kind] += n
            by_field.setdefault(field, {})[kind] = n
        return {
            "curated": self.curated,
            "scrubbed_calls": self.scrubbed,
            "replacements": sum(by_type.values()),
            "replacements_by_type": dict(by_type.most_common()),
            "replacements_by_field": by_field,
            "duplicates": self.duplicates,
            "excluded": dict(self.excluded.most_common()),
            "raw_kept": self.keep_raw and self.curated > 0,
            "seconds": round(seconds, 2),
            "calls_per_s": round(self.curated / seconds, 1) if self.curated else None,
        }


def curate_store(
    store: Store, report_path: Path, keep_raw: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Curate every call not curated yet; returns the audit summary (also written to
    `report_path` when anything was curated)."""
    t0 = time.perf_counter()
    run = _Run(store, keep_raw, workspace_key(report_path.parent / "scrub.key"))
    pending = store.execute("SELECT COUNT(*) FROM calls WHERE curation IS NULL").fetchone()[0]
    bar = _progress(pending) if progress and pending else None
    last_seq = 0
    while True:
        # Chunks commit one by one: an interrupted run keeps its work and the next
        # run picks up the rest.
        rows = store.execute(
            "SELECT seq, record FROM calls WHERE curation IS NULL AND seq > ?"
            f" ORDER BY seq LIMIT {CHUNK}",
            (last_seq,),
        ).fetchall()
        if not rows:
            break
        last_seq = rows[-1][0]
        updates = [run.curate(r) for _, r in rows]
        store.save_curation(updates, run.new_placeholders())
        if bar is not None:
            bar.advance(bar.task_ids[0], len(rows))
    if bar is not None:
        bar.stop()
    summary = run.report(time.perf_counter() - t0)
    if run.curated:
        report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        summary["report"] = str(report_path)
    return summary


def workspace_key(path: Path) -> bytes:
    """The workspace's secret for keyed value hashes: 32 random bytes, made once (0600)."""
    import os
    import secrets

    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent first run keeps its own
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def _progress(total: int):  # noqa: ANN202
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task("curating", total=total)
    bar.start()
    return bar


def print_stats(stats: dict[str, Any]) -> None:
    """Print `Store.stats()` as readable tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tokens = stats["tokens"]
    overview = Table(title="calls", show_header=False)
    for key in ("calls", "curated", "duplicates", "excluded"):
        overview.add_row(key, f"{stats[key]:,}")
    overview.add_row("prompt tokens", f"{tokens['prompt']:,}")
    overview.add_row("completion tokens", f"{tokens['completion']:,}")
    overview.add_row("calls without token counts", f"{tokens['calls_without_counts']:,}")
    console.print(overview)
    for key, title in (
        ("by_agent", "agent"),
        ("by_model", "model"),
        ("by_status", "status"),
        ("excluded_by_reason", "excluded because"),
        ("scrubbed_by_type", "scrubbed (replacements)"),
    ):
        if not stats[key]:
            continue
        table = Table(title=title)
        table.add_column(title)
        table.add_column("count", justify="right")
        for name, n in stats[key].items():
            table.add_row(str(name), f"{n:,}")
        console.print(table)
