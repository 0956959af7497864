"""A durable log of JSON objects, one per line: what eda-txn remembers across crashes.

The coordinator, participants and the saga executor each keep one.  The rules:

- a record is one JSON object on one line, ending in a newline; the file reads
  well with ``jq`` and ``tail -F``;
- :meth:`Journal.append` buffers, :meth:`Journal.sync` writes and fsyncs
  everything buffered in one go (group commit: append the records of many
  concurrent transactions, then sync once); :meth:`Journal.write` is both;
- a record counts once :meth:`sync` has returned.  A sync that fails (disk
  full, I/O error) cuts the file back to its last good record before raising
  :class:`JournalError`, so no later record ever follows a torn line; the
  records stay buffered and the next sync tries them again (or the owner
  takes some back with :meth:`Journal.withdraw`).  What a crash cut short
  (a torn last line, garbage after the last good record) is detected on
  :func:`open_journal` and cut at the last good record, and the cut is
  reported in :attr:`Journal.repaired`.  A bad record *before* good ones is
  not a torn tail but a damaged file: :class:`CorruptJournal`, never silently
  dropped history;
- opening reads the file stream-wise (memory does not grow with its size),
  handing each record to the owner's *fold* (or :meth:`Journal.replay`
  streams them again later);
- :meth:`Journal.compact` starts a new segment holding only what the owner
  still needs (a new file, fsynced, renamed over the old one: a crash leaves
  one or the other, never half of each), so a journal stays bounded while
  its daemon runs, as a WAL recycles its segments.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from ..errors import EdaError

MAX_RECORD = 1 << 20  # bytes in one record line
_CHUNK = 1 << 16


class CorruptJournal(EdaError):
    """A journal holds a bad record followed by good ones: damage, not a torn write."""


class JournalError(EdaError):
    """The journal cannot be written now (disk full, I/O error); what it held is intact."""


# one encoder for every record (json.dumps with options makes a new one per call)
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(record: Mapping[str, Any]) -> bytes:
    """*record* as one journal line."""
    data = (_encoder.encode(record) + "\n").encode()
    if len(data) > MAX_RECORD:
        raise EdaError(f"journal record of {len(data)} bytes is over {MAX_RECORD}")
    return data


def nothing(_record: dict[str, Any]) -> bool:
    """A *keep* for :meth:`Journal.compact` that keeps no record without a ``txn``."""
    return False


class Journal:
    """An open journal: the records it held when opened, and appends from now on."""

    def __init__(self, path: Path, size: int, count: int, repaired: int) -> None:
        self.path = path
        self.repaired = repaired  # bytes of torn tail cut off when opening
        self.size = size  # bytes of good records in the file
        self.count = count  # records in the file
        self.fsyncs = 0
        self.failed: str | None = None  # why the last write failed; None while it works
        self._opened = size  # the records replay() reads: those held when opened
        self._segment = 0  # compactions so far: replay() is for the first segment only
        self._pending: list[tuple[int, bytes]] = []  # (ticket, line)
        self._tickets = 0
        self._torn = False  # a failed write could not be cut back yet
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # -- reading ----------------------------------------------------------------------------
    def replay(self) -> Iterator[dict[str, Any]]:
        """The records the file held when opened, oldest first, read stream-wise
        (for the owner to fold into its state before anything is compacted)."""
        if self._segment:
            raise EdaError("replay() reads a journal as opened, before any compaction")
        return _records(open(self.path, "rb"), self._opened)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record held when opened, in a list (for small journals: a saga's)."""
        return list(self.replay())

    # -- writing ----------------------------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> int:
        """Buffer *record*; it is durable only after the next :meth:`sync`.

        Returns its ticket, for :meth:`withdraw`."""
        data = encode(record)
        self._tickets += 1
        self._pending.append((self._tickets, data))
        return self._tickets

    @property
    def pending(self) -> int:
        """Records appended and not yet synced."""
        return len(self._pending)

    def withdraw(self, tickets: Collection[int]) -> set[int]:
        """Take back the records of *tickets* still buffered (not durable); their tickets."""
        taken = {t for t, _ in self._pending if t in tickets}
        self._pending = [(t, d) for t, d in self._pending if t not in taken]
        return taken

    def sync(self) -> None:
        """Write and fsync every buffered record (one fsync for all of them).

        Raises :class:`JournalError` when the disk refuses: the file is cut back
        to its last good record and the records stay buffered."""
        if not self._pending:
            return
        data = b"".join(d for _, d in self._pending)
        try:
            if self._torn:
                self._cut()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            self._torn = True
            with contextlib.suppress(OSError):  # else cut before the next write, or on open
                self._cut()
            self.failed = exc.strerror or str(exc)
            raise JournalError(f"cannot write the journal {self.path}: {self.failed}") from None
        self.size += len(data)
        self.count += len(self._pending)
        self._pending.clear()
        self.failed = None
        self.fsyncs += 1

    def _cut(self) -> None:
        """Cut the file back to its last good record (a failed write's torn part)."""
        os.ftruncate(self._fd, self.size)
        os.fsync(self._fd)
        self._torn = False

    def write(self, record: Mapping[str, Any]) -> None:
        """Append *record* and sync now."""
        self.append(record)
        self.sync()

    # -- compaction -------------------------------------------------------------------------
    def compact(
        self,
        head: Iterable[Mapping[str, Any]],
        keep: Callable[[dict[str, Any]], bool],
        txns: Callable[[str], bool] | None = None,
    ) -> int:
        """Start a new segment: the records of *head*, then every record of the
        current segment that *keep* accepts, in order.  Returns the records it holds.

        With *txns*, a record with a ``txn`` is kept exactly when ``txns(txn)``
        says so (most lines then need no parsing: :meth:`append` writes that
        key first), and *keep* judges the others.  Buffered records are synced
        first.  Raises :class:`JournalError` when the new segment cannot be
        written: the journal then goes on in the old one."""
        self.sync()
        tmp = self.path.with_name(self.path.name + ".compact")
        size = count = 0
        try:
            with open(tmp, "wb") as out:
                for record in head:
                    data = encode(record)
                    out.write(data)
                    size, count = size + len(data), count + 1
                with open(self.path, "rb") as f:
                    for line in _kept(f, self.size, keep, txns):
                        out.write(line)
                        size, count = size + len(line), count + 1
                out.flush()
                os.fsync(out.fileno())
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise JournalError(f"cannot compact the journal {self.path}: {exc.strerror}") from None
        except BaseException:  # a record or a predicate that failed: no half segment left
            tmp.unlink(missing_ok=True)
            raise
        try:
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise JournalError(f"cannot compact the journal {self.path}: {exc.strerror}") from None
        os.close(self._fd)
        self._fd = fd  # the new segment, from now on
        self.size, self.count = size, count
        self._segment += 1
        try:
            _sync_dir(self.path.parent)  # the rename itself is durable
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise JournalError(f"cannot compact the journal {self.path}: {why}") from None
        return count

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


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _lines(f: IO[bytes], end: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(offset, line without its newline) for each whole line of *f* before *end*;
    None for a line over :data:`MAX_RECORD` (a bad one).  A last line without
    its newline is torn: not yielded."""
    pos = 0
    while end is None or pos < end:
        line = f.readline(MAX_RECORD + 1)
        if not line.endswith(b"\n"):
            if len(line) <= MAX_RECORD:
                return  # end of file: a torn last line, or nothing
            skipped = len(line)  # too long: skip to its end
            while True:
                more = f.readline(_CHUNK)
                skipped += len(more)
                if not more or more.endswith(b"\n"):
                    break
            if not more.endswith(b"\n"):
                return
            yield pos, None
            pos += skipped
            continue
        yield pos, line[:-1]
        pos += len(line)


Fold = Callable[[dict[str, Any]], None]


def scan(f: IO[bytes], fold: Fold | None = None) -> tuple[int, int]:
    """The offset where the good records of *f* end, and how many there are.

    Reads stream-wise, handing each good record to *fold*.  Raises
    :class:`CorruptJournal` when a bad line is followed by a good one."""
    good_end = count = 0
    bad_at: int | None = None
    for pos, line in _lines(f):
        record = _parse(line) if line is not None else None
        if record is None:
            if bad_at is None:
                bad_at = pos
        elif bad_at is not None:
            raise CorruptJournal(f"bad record at line {count + 1}, followed by good ones")
        else:
            count += 1
            good_end = pos + len(line or b"") + 1
            if fold is not None:
                fold(record)
    return good_end, count


def open_journal(path: str | os.PathLike[str], fold: Fold | None = None) -> Journal:
    """Open (creating) the journal at *path*, cutting a torn tail at the last good record.

    *fold*, when given, gets every good record, oldest first, as the file is
    read (one pass: what a daemon folds into its state on start)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(file, "rb") as f:
            end, count = scan(f, fold)
            length = f.seek(0, os.SEEK_END)
    except FileNotFoundError:
        end = count = length = 0
    repaired = length - end
    if repaired:
        with open(file, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return Journal(file, end, count, repaired)


def read(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The good records of the journal at *path*, without repairing it (for ``status``).

    Raises :class:`CorruptJournal` (before yielding anything) for a damaged file."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the generator)
    except FileNotFoundError:
        return iter(())
    try:
        end, _count = scan(f)
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return _records(f, end)


def _records(f: IO[bytes], end: int) -> Iterator[dict[str, Any]]:
    """The records of *f* before *end* (closing *f* at the end)."""
    with f:
        for _line, record in _good(f, end):
            yield record


_TXN_FIRST = b'{"txn":"'


def _kept(
    f: IO[bytes],
    end: int,
    keep: Callable[[dict[str, Any]], bool],
    txns: Callable[[str], bool] | None,
) -> Iterator[bytes]:
    """The lines (with their newlines) of the good records of *f* before *end*
    that *keep* or *txns* accept (see :meth:`Journal.compact`)."""
    for _pos, line in _lines(f, end):
        if line is None:
            continue
        if txns is not None and line.startswith(_TXN_FIRST):
            close = line.find(b'"', len(_TXN_FIRST))
            txn = line[len(_TXN_FIRST) : close]
            if close > 0 and b"\\" not in txn:  # a plain id: no escapes to decode
                if txns(txn.decode("utf-8", "replace")):
                    yield line + b"\n"
                continue
        record = _parse(line)
        if record is None:
            continue
        txn_id = record.get("txn")
        if txns is not None and isinstance(txn_id, str):
            if txns(txn_id):
                yield line + b"\n"
        elif keep(record):
            yield line + b"\n"


def _good(f: IO[bytes], end: int) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(line with its newline, record) for each good record of *f* before *end*."""
    for _pos, line in _lines(f, end):
        record = _parse(line) if line is not None else None
        if line is not None and record is not None:
            yield line + b"\n", record
