"""Reading a SQLite write-ahead log to tell a torn last write from damage in the middle.

SQLite itself ignores WAL frames that fail their checksum (and everything
after them) when it opens the database, so a torn write can never be read
back; but it does so silently, and it does the same to a log damaged in the
middle, deleting intact committed data.  So before opening we walk the WAL as
SQLite will (format: https://sqlite.org/fileformat.html#the_write_ahead_log)
and classify what follows the valid frames.

Frames with other salts are left over from before a WAL reset and are not
damage; valid frames after the last commit frame are an uncommitted
transaction (a crash mid-transaction), not damage either.

**Torn tail or damage: the rule.**  Each frame's checksum continues the one
stored in the frame before it, so a frame after a bad one can still be checked
on its own: it is *intact* if its salts are the log's and its checksum, seeded
with its predecessor's stored checksum, is the one it stores.  The bus commits
with ``synchronous=FULL``: the log is fsynced at every commit, before the next
transaction is written, so a crash can only tear the frames of the *last*
transaction (possibly out of order, some of its frames reaching the disk and
others not).  Hence, after the first bad frame (bad checksum, or foreign salts
while frames of this log follow), the damage is in the middle of the log, not a
torn tail, when an intact frame

* follows an intact commit frame that itself follows the bad frame (a later
  transaction was written after the damaged one had been committed), or
* holds a page already written by the bad frame's own transaction (a
  transaction writes each page once, so this frame belongs to a later one).

Otherwise every intact frame after the bad one may belong to the torn last
transaction, and the tail is torn (repaired by SQLite dropping it).  Damage in
the last transaction alone cannot be told from a torn write, and is treated as
one.  A bad log header followed by frames intact under its salts is damage too.
The bad frame's own header is never trusted for the rule (it may be the torn
part).

The checksum is pure Python, so the cost is about 30 ms per MB of WAL; the
engine keeps the WAL small with frequent checkpoints, and a clean close
removes it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

_MAGIC = (0x377F0682, 0x377F0683)  # checksums little-endian / big-endian
_HEADER = struct.Struct(">8I")
_FRAME = struct.Struct(">6I")


class WalScan(NamedTuple):
    frames: int  # valid frames of the current generation
    committed: int  # of which up to and including the last commit frame
    torn_bytes: int  # bytes of damaged or cut-short frames after the valid ones
    uncommitted: int  # valid frames after the last commit frame (discarded by SQLite)
    damaged_at: int = -1  # byte offset of a bad frame (0: the header) with intact frames after
    intact_after: int = 0  # those intact frames (SQLite would drop them): damage, not a torn tail


def _checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    m = 0xFFFFFFFF
    it = iter(words)
    for x0, x1 in zip(it, it, strict=True):
        s0 = (s0 + x0 + s1) & m
        s1 = (s1 + x1 + s0) & m
    return s0, s1


def _frame_checksum(
    data: bytes, off: int, size: int, seed: tuple[int, int], big: bool
) -> tuple[int, int]:
    t0, t1 = _checksum(data[off : off + 8], *seed, big)
    return _checksum(data[off + _FRAME.size : off + size], t0, t1, big)


def _intact_after(
    data: bytes,
    off: int,
    size: int,
    salts: tuple[int, int],
    seed: tuple[int, int],
    big: bool,
    pages: set[int],
) -> int:
    """Intact frames from *off* on that prove damage before them (the module's rule), else 0.

    *seed* is the checksum stored by the bad frame (or header) before *off*;
    *pages* the pages the bad frame's transaction wrote before it."""
    pages = set(pages)
    intact = 0
    later = False  # an intact frame proved to be written after the damaged transaction
    committed = False
    while off + size <= len(data):
        pgno, db_size, f1, f2, k1, k2 = _FRAME.unpack_from(data, off)
        if (f1, f2) == salts and _frame_checksum(data, off, size, seed, big) == (k1, k2):
            intact += 1
            later = later or committed or pgno in pages
            committed = committed or db_size != 0
            pages.add(pgno)
        seed = (k1, k2)
        off += size
    return intact if later else 0


def _bad_header(data: bytes) -> WalScan:
    """A log whose header fails its checks: damage when frames intact under it follow (any
    field may be the damaged one, so the others' values are tried), else a torn write."""
    magic, _version, page_size, _ckpt, salt1, salt2, c1, c2 = _HEADER.unpack_from(data)
    valid = 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0
    for size in [page_size] if valid else [512 << i for i in range(8)]:
        candidates = {(salt1, salt2)}
        if len(data) >= _HEADER.size + _FRAME.size:
            # the header's salts with a flipped bit, not a new header torn over old frames
            # (its salt1 is the old one plus 1, its salt2 random)
            f1, f2 = _FRAME.unpack_from(data, _HEADER.size)[2:4]
            if ((f1 ^ salt1).bit_count() + (f2 ^ salt2).bit_count()) <= 2:
                candidates.add((f1, f2))
        for salts in candidates:
            for big in (magic == _MAGIC[1], magic != _MAGIC[1]):  # the magic may be wrong
                frame = _FRAME.size + size
                if n := _intact_after(data, _HEADER.size, frame, salts, (c1, c2), big, set()):
                    return WalScan(0, 0, 0, 0, 0, n)
    return WalScan(0, 0, len(data), 0)


def scan(path: Path) -> WalScan | None:
    """What SQLite will keep of the WAL at *path*; None when there is no WAL."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None
    if len(data) < _HEADER.size:
        return WalScan(0, 0, len(data), 0)
    magic, _version, page_size, _ckpt, salt1, salt2, c1, c2 = _HEADER.unpack_from(data)
    big = magic == _MAGIC[1]
    salts = (salt1, salt2)
    ok_size = 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0
    frame = _FRAME.size + page_size
    if magic not in _MAGIC or not ok_size or _checksum(data[:24], 0, 0, big) != (c1, c2):
        return _bad_header(data)
    s0, s1 = c1, c2
    off = _HEADER.size
    frames = committed = 0
    torn = 0
    pages: set[int] = set()  # written by the transaction in progress
    while off < len(data):
        if off + frame > len(data):
            # a partial frame: torn unless it is a left-over of an older generation
            head = _FRAME.unpack_from(data, off)[2:4] if off + _FRAME.size <= len(data) else None
            torn = len(data) - off if head in (None, salts) else 0
            break
        pgno, db_size, f1, f2, k1, k2 = _FRAME.unpack_from(data, off)
        good = (f1, f2) == salts
        t0, t1 = _frame_checksum(data, off, frame, (s0, s1), big) if good else (0, 0)
        if not good or (t0, t1) != (k1, k2):
            n = _intact_after(data, off + frame, frame, salts, (k1, k2), big, pages)
            if n:
                return WalScan(frames, committed, 0, frames - committed, off, n)
            if not good:
                break  # left over from before a WAL reset
            # damaged: this frame and the rest of its generation are unreachable
            start, off = off, off + frame
            while off < len(data):
                head_ok = off + _FRAME.size <= len(data)
                if head_ok and _FRAME.unpack_from(data, off)[2:4] != salts:
                    break
                off = min(off + frame, len(data))
            torn = off - start
            break
        s0, s1 = t0, t1
        frames += 1
        off += frame
        pages.add(pgno)
        if db_size:
            committed = frames
            pages.clear()
    return WalScan(frames, committed, torn, frames - committed)
