"""Named crash points, for recovery tests: ``EDA_CRASH_AT=coordinator:after-decision``.

A process calls :func:`point` at each place where a crash matters (after
logging a vote, before sending a decision...).  When ``EDA_CRASH_AT`` names
that point (``ROLE:POINT``, several separated by commas), the process kills
itself with SIGKILL on the spot: no cleanup, no flush, no exit handler -- as
a power cut or ``kill -9`` would.  ``EDA_CRASH_AT=ROLE:POINT@N`` crashes at
the N-th time the point is reached (1 = the first).
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def _armed() -> dict[str, int]:
    points: dict[str, int] = {}
    for item in os.environ.get("EDA_CRASH_AT", "").split(","):
        name, _, nth = item.strip().partition("@")
        if name:
            points[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return points


def point(role: str, name: str) -> None:
    """Crash now if ``EDA_CRASH_AT`` names ``role:name`` (and this is its N-th time)."""
    if "EDA_CRASH_AT" not in os.environ:
        return
    key = f"{role}:{name}"
    nth = _armed().get(key)
    if nth is None:
        return
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
