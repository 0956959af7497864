"""Reading a SQLite write-ahead log to tell a torn last write from a clean crash.

SQLite itself ignores WAL frames that fail their checksum (and everything
after them) when it opens the database, so a torn write can never be read
back; but it does so silently.  The bus must say so, so before opening we
walk the WAL as SQLite will (format: https://sqlite.org/fileformat.html#the_write_ahead_log)
and report frames of the current generation that are damaged or cut short.

Frames with other salts are left over from before a WAL reset and are not
damage; valid frames after the last commit frame are an uncommitted
transaction (a crash mid-transaction), not damage either.  The checksum is
pure Python, so the cost is about 30 ms per MB of WAL; the engine keeps the
WAL small with frequent checkpoints, and a clean close removes it.
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


def _checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    m = 0xFFFFFFFF
    it = iter(words)
    for x0, x1 in zip(it, it, strict=True):
        s0 = (s0 + x0 + s1) & m
        s1 = (s1 + x1 + s0) & m
    return s0, s1


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
    ok_size = page_size >= 512 and page_size & (page_size - 1) == 0
    if magic not in _MAGIC or not ok_size or _checksum(data[:24], 0, 0, big) != (c1, c2):
        return WalScan(0, 0, len(data), 0)
    s0, s1 = c1, c2
    frame = _FRAME.size + page_size
    off = _HEADER.size
    frames = committed = 0
    torn = 0
    while off < len(data):
        if off + frame > len(data):
            # a partial frame: torn unless it is a left-over of an older generation
            salts = _FRAME.unpack_from(data, off)[2:4] if off + _FRAME.size <= len(data) else None
            torn = len(data) - off if salts in (None, (salt1, salt2)) else 0
            break
        _pgno, db_size, f1, f2, k1, k2 = _FRAME.unpack_from(data, off)
        if (f1, f2) != (salt1, salt2):
            break  # left over from before a WAL reset
        t0, t1 = _checksum(data[off : off + 8], s0, s1, big)
        t0, t1 = _checksum(data[off + _FRAME.size : off + frame], t0, t1, big)
        if (t0, t1) != (k1, k2):
            # damaged: this frame and the rest of its generation are unreachable
            start, off = off, off + frame
            while off < len(data):
                head = off + _FRAME.size <= len(data)
                if head and _FRAME.unpack_from(data, off)[2:4] != (salt1, salt2):
                    break
                off = min(off + frame, len(data))
            torn = off - start
            break
        s0, s1 = t0, t1
        frames += 1
        off += frame
        if db_size:
            committed = frames
    return WalScan(frames, committed, torn, frames - committed)
