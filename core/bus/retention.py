"""Retention: which oldest batches go, by age and by size; and the ``7d`` / ``10GB`` syntax.

Retention only ever removes a prefix of the log (whole batches, oldest
first), so bus sequences stay contiguous from ``first_seq`` on and a reader
that asks for something older learns exactly how much it missed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from ..errors import UsageError

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
# a number, then a unit: "", b, k, kb, ki, kib, ... (decimal unless with an "i")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?")
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")


def parse_age(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` (or a plain number of seconds).

    The one parser of ages (``eda-bus --max-age``, ``eda-sub --since``); zero
    and negative ages are refused (UsageError), as a limit of nothing keeps nothing.
    """
    m = _AGE.fullmatch(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"invalid age {text!r}: use a positive number with s, m, h, d or w")
    return float(m.group(1)) * _AGE_UNITS[m.group(2) or "s"]


def format_age(seconds: float) -> str:
    """The inverse of :func:`parse_age`: ``7d`` for 604800, ``90m``, ``1.5s``, in the
    largest unit that holds *seconds* exactly (weeks are said in days)."""
    for unit in "dhm":
        count = seconds / _AGE_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


def parse_size(text: str) -> int:
    """Bytes in ``500MB``, ``10GB``, ``1GiB``, ``64k``, ``4096`` (decimal and binary units).

    The one parser of sizes (``eda-bus --max-bytes``, the queue limits,
    ``eda-lb --max-request``); sizes below one byte are refused (UsageError).
    """
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        raise UsageError(f"invalid size {text!r}: use a positive number with B, KB, MB, GB, MiB…")
    base = (1024 if m.group(3) else 1000) ** _SIZE_POWERS[m.group(2) or ""]
    size = int(float(m.group(1)) * base)
    if size < 1:
        raise UsageError(f"invalid size {text!r}: use a positive number with B, KB, MB, GB, MiB…")
    return size


class Cut(NamedTuple):
    """Remove every batch with a bus sequence below ``keep_from``."""

    keep_from: int
    events: int
    bytes: int


def cut(
    batches: Iterable[tuple[int, int, float, int]],
    total_bytes: int,
    max_age: float | None,
    max_bytes: int | None,
    now: float,
) -> Cut | None:
    """Where to cut a log given its batches ``(seq, count, stored time, bytes)``, oldest first.

    A batch goes when it was stored before ``now - max_age`` or while the
    bytes kept exceed *max_bytes*; None when nothing goes.
    """
    if (max_age or 0) < 0 or (max_bytes or 0) < 0:
        raise UsageError("retention limits must not be negative")
    oldest_kept = now - max_age if max_age is not None else None
    kept = total_bytes
    events = removed = 0
    keep_from: int | None = None
    for seq, count, stored, size in batches:
        too_old = oldest_kept is not None and stored < oldest_kept
        too_big = max_bytes is not None and kept > max_bytes
        if not (too_old or too_big):
            keep_from = seq
            break
        kept -= size
        removed += size
        events += count
        keep_from = seq + count
    if keep_from is None or events == 0:
        return None
    return Cut(keep_from, events, removed)
