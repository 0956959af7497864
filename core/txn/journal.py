"""A durable log of JSON objects, one per line: what eda-txn remembers across crashes.

The coordinator, participants and the saga executor each keep one.  The rules:

- a record is one JSON object on one line, ending in a newline; the file reads
  well with ``jq`` and ``tail -f``;
- :meth:`Journal.append` buffers, :meth:`Journal.sync` writes and fsyncs
  everything buffered in one go (group commit: append the records of many
  concurrent transactions, then sync once); :meth:`Journal.write` is both;
- a record counts once :meth:`sync` has returned; what a crash cut short
  (a torn last line, garbage after the last good record) is detected on
  :func:`open_journal` and cut at the last good record, and the cut is
  reported in :attr:`Journal.repaired`.  A bad record *before* good ones is
  not a torn tail but a damaged file: :class:`CorruptJournal`, never silently
  dropped history.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import EdaError

MAX_RECORD = 1 << 20  # bytes in one record line


class CorruptJournal(EdaError):
    """A journal holds a bad record followed by good ones: damage, not a torn write."""


class Journal:
    """An open journal: the records it held when opened, and appends from now on."""

    def __init__(self, path: Path, records: list[dict[str, Any]], repaired: int) -> None:
        self.path = path
        self.records = records  # what the file held (good records), oldest first
        self.repaired = repaired  # bytes of torn tail cut off when opening
        self.fsyncs = 0
        self._pending: list[bytes] = []
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: Mapping[str, Any]) -> None:
        """Buffer *record*; it is durable only after the next :meth:`sync`."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        data = (line + "\n").encode()
        if len(data) > MAX_RECORD:
            raise EdaError(f"journal record of {len(data)} bytes is over {MAX_RECORD}")
        self._pending.append(data)

    @property
    def pending(self) -> int:
        """Records appended and not yet synced."""
        return len(self._pending)

    def sync(self) -> None:
        """Write and fsync every buffered record (one fsync for all of them)."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.fsyncs += 1

    def write(self, record: Mapping[str, Any]) -> None:
        """Append *record* and sync now."""
        self.append(record)
        self.sync()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def scan(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The good records of *data* and the offset where they end.

    Raises :class:`CorruptJournal` when a bad line is followed by a good one.
    """
    records: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    bad_at: int | None = None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:  # a last line without its newline: torn
            break
        record = _parse(data[pos:nl])
        if record is None:
            if bad_at is None:
                bad_at = pos
        elif bad_at is not None:
            line_no = data.count(b"\n", 0, bad_at) + 1
            raise CorruptJournal(f"bad record at line {line_no}, followed by good ones")
        else:
            records.append(record)
            good_end = nl + 1
        pos = nl + 1
    return records, good_end


def open_journal(path: str | os.PathLike[str]) -> Journal:
    """Open (creating) the journal at *path*, cutting a torn tail at the last good record."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        data = b""
    records, end = scan(data)
    repaired = len(data) - end
    if repaired:
        with open(file, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return Journal(file, records, repaired)


def read(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The good records of the journal at *path*, without repairing it (for ``status``)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return iter(())
    return iter(scan(data)[0])
