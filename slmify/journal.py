"""The recording journal: calls answered but not stored yet, kept on disk until they are.

The proxy and `slmify serve` append each exchange here (one `write()` of one framed
entry, on the event loop, before the answer leaves) and the writer thread marks entries
done once their transaction has committed. A process killed in between leaves its
segment files behind; the next writer to start on the same workspace replays them.

Layout: `<workspace>/recording-<writer>-<n>.journal`, a sequence of entries, each
`b"SLMJ" + len (4 bytes) + crc32 (4 bytes) + payload`. A writer holds an exclusive
`flock` on its open segments, so a live writer's files are never replayed by another; a
segment is deleted once every entry in it is done, and a new one is started then or
after SEGMENT_BYTES.

Window: entries reach the OS before the answer is sent, so a killed process loses
nothing; a power loss can lose what the OS had not written to disk (the journal is not
fsynced per call, like the store's `synchronous=NORMAL`).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

MAGIC = b"SLMJ"
HEADER = struct.Struct(">4sII")
# A segment is sealed after this many bytes, so a busy writer's files are deleted as the
# entries in them are stored instead of growing for as long as the process lives.
SEGMENT_BYTES = 64 * 2**20


class Journal:
    """One writer's segments: `append` from any thread, `done` from the writer thread."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._n = 0  # the current segment's number
        self._fd: int | None = None
        self._size = 0
        # segment number -> [path, fd, entries appended, entries done]; the fd (and its
        # lock) is kept until the file is deleted, so no other writer replays it meanwhile.
        self._segments: dict[int, list] = {}

    def append(self, payload: bytes) -> int:
        """Write one entry; returns the segment number to hand back to `done`."""
        entry = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self._fd is None:
                self._open()
            os.write(self._fd, entry)
            seg = self._segments[self._n]
            seg[2] += 1
            self._size += len(entry)
            n = self._n
            if self._size >= SEGMENT_BYTES:
                self._fd = None  # sealed: the next entry starts a new file
            return n

    def done(self, n: int, count: int = 1) -> None:
        """`count` entries of segment `n` are stored (or rejected for good)."""
        with self._lock:
            seg = self._segments[n]
            seg[3] += count
            if seg[3] >= seg[2]:
                if n == self._n:
                    self._fd = None  # idle, everything written is stored: a new file next
                Path(seg[0]).unlink(missing_ok=True)
                os.close(seg[1])
                del self._segments[n]

    def close(self) -> None:
        """Release this writer's segments; those with entries not done stay for replay."""
        with self._lock:
            for n, seg in list(self._segments.items()):
                if seg[3] >= seg[2]:
                    Path(seg[0]).unlink(missing_ok=True)
                os.close(seg[1])
                del self._segments[n]
            self._fd = None

    def _open(self) -> None:
        self._n += 1
        path = self.folder / f"recording-{self.name}-{self._n}.journal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd, self._size = fd, 0
        self._segments[self._n] = [str(path), fd, 0, 0]


def orphans(folder: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """(segment, its entries) for each segment left by a writer that is gone.

    The caller stores the entries, then deletes the file while still inside the loop
    (the segment's lock is held until the next one is read)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("recording-*.journal")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # replayed and deleted by another writer meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's segment
            if not path.exists():
                continue
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            yield path, list(read_entries(data))
        finally:
            os.close(fd)


def read_entries(data: bytes) -> Iterator[bytes]:
    """The entries of a segment, up to the first one cut short or corrupted by a crash."""
    pos = 0
    while pos + HEADER.size <= len(data):
        magic, size, crc = HEADER.unpack_from(data, pos)
        payload = data[pos + HEADER.size : pos + HEADER.size + size]
        if magic != MAGIC or len(payload) != size or zlib.crc32(payload) != crc:
            return
        yield payload
        pos += HEADER.size + size
