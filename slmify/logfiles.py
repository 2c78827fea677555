"""Reading agent log files record by record, for `slmify collect import`.

Reads a file line by line in binary (`.gz` transparently, never the whole file in memory,
except a pretty-printed JSON document, which has no line structure) and yields each
record parsed from JSON, or the error that kept it from being parsed, with its line
number. Writes nothing; slmify.collect converts and stores the records.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


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
