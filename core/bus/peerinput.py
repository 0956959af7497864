"""What a client of the bus may send in a request: checked here, refused with
:class:`~eda.core.errors.ProtocolError` (garbage from a peer: exit 1), so the
request handlers (:mod:`.requests`) only see typed, bounded values
(CONVENTIONS §7)."""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from ..topics import validate_pattern
from . import protocol as p
from .streams import MAX_NAME, MAX_SEQ


def integer(value: Any, what: str) -> int:
    """*value* if it is an integer in the range of bus sequences and counts, [0, 2**63 - 1]
    (what SQLite stores), else :class:`ProtocolError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ProtocolError(f"{what} must be an integer from 0 to {MAX_SEQ}")
    return value


def ranges(msg: dict[str, Any], seq: int) -> list[tuple[int, int]]:
    """The acknowledgement's ``ranges`` (``[[first, last], ...]``, first <= last, at most
    MAX_ACK_RANGES); without them, one: everything up to *seq* (a client before them)."""
    given = msg.get("ranges")
    if given is None:
        return [(0, seq)]
    if not isinstance(given, list) or not 0 < len(given) <= p.MAX_ACK_RANGES:
        raise ProtocolError(f"ranges must be a list of 1 to {p.MAX_ACK_RANGES} [first, last]")
    out = []
    for pair in given:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProtocolError("each of ranges must be [first, last]")
        first, last = integer(pair[0], "range first"), integer(pair[1], "range last")
        if first > last:
            raise ProtocolError(f"range {first}-{last} ends before it begins")
        out.append((first, last))
    return out


def patterns(msg: dict[str, Any]) -> list[str]:
    """The request's ``patterns``: a list of 1 to MAX_PATTERNS valid patterns."""
    given = msg.get("patterns")
    if (
        not isinstance(given, list)
        or not 0 < len(given) <= p.MAX_PATTERNS
        or not all(isinstance(x, str) for x in given)
    ):
        raise ProtocolError(f"patterns must be a list of 1 to {p.MAX_PATTERNS} strings")
    for pattern in given:
        validate_pattern(pattern)
    return given


def pattern(msg: dict[str, Any], key: str) -> str:
    """The request's *key*: one valid topic pattern."""
    value = msg.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a topic pattern")
    validate_pattern(value)
    return value


def name(msg: dict[str, Any], key: str) -> str | None:
    value = msg.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise ProtocolError(f"{key} must be a printable name of 1 to {MAX_NAME} characters")
    return value


def number(msg: dict[str, Any], key: str) -> float | None:
    value = msg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e18:
        raise ProtocolError(f"{key} must be a non-negative number")
    return float(value)
