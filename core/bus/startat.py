"""Where a bus subscription starts: the one reading of ``--from-start``, ``--from-seq``,
``--since`` and ``--last`` (eda-sub) and of their HTTP query twins (``GET /events``).

The value is what a subscribe request carries as ``from`` (see
:meth:`eda.core.bus.requests.Answering._start`): ``"start"``, ``{"seq": N}``,
``{"last": N}``, ``{"time": T}``, or None (live, or a durable consumer's position).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from ..errors import UsageError

_AGE = re.compile(r"\s*\d+(?:\.\d+)?\s*[smhdwSMHDW]\s*")


def start_spec(
    from_start: bool,
    from_seq: int | None,
    since: str | None,
    last: int | None,
    prefix: str = "--",
) -> Any:
    """The starting point of a bus subscription (None: live, or a durable's position);
    *prefix* names the options in errors (``--`` on a command line, ``""`` in a query)."""
    given = [from_start, from_seq is not None, since is not None, last is not None]
    if sum(given) > 1:
        raise UsageError(f"choose one of {prefix}from-start, {prefix}from-seq, {prefix}since "
                         f"and {prefix}last")  # fmt: skip
    if from_start:
        return "start"
    if from_seq is not None:
        return {"seq": from_seq}
    if last is not None:
        return {"last": last}
    if since is not None:
        return {"time": since_time(since, f"{prefix}since")}
    return None


def since_time(since: str, what: str = "--since") -> float:
    """Unix seconds of *since*: RFC 3339, unix seconds, or an age (30m: that long ago)."""
    if _AGE.fullmatch(since):
        from .retention import parse_age

        try:
            return max(time.time() - parse_age(since), 0.0)
        except UsageError:
            raise UsageError(f"bad {what} {since!r}: an age must be positive") from None
    try:
        when = datetime.fromisoformat(since)
    except ValueError:
        try:
            return float(since)
        except ValueError:
            raise UsageError(
                f"bad {what} {since!r}: use RFC 3339 (2026-11-01T00:00Z), unix seconds"
                " or an age (30m, 1h, 2d)"
            ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
