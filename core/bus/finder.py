"""Where the bus is, looked for in the background: ``eda-sub --everywhere``.

Brokerless events must never wait for a cache probe or an mDNS query, so
while no bus answers, a thread of its own looks again: after
:data:`LOOK_FIRST` seconds, then twice as long each time up to
:data:`LOOK_AT_MOST` (RFC 6762 §5.2's back-off for repeated queries).  The
receive loop takes what it found without waiting (:meth:`BusFinder.found`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LOOK_FIRST = 2.0  # s: a bus not found is looked for again after this long...
LOOK_AT_MOST = 30.0  # ...then twice as long each time, up to this (RFC 6762 §5.2)


class BusFinder:
    """Where the bus is, looked up on a thread of its own (``--everywhere``), so that
    brokerless events never wait for a cache probe or an mDNS query.

    :meth:`found` hands over a bus found since it was last called, and starts the
    next look when it is due; :meth:`relocate` is what a running bus subscriber
    calls when its bus stopped answering (the latest place found, a look started).
    """

    def __init__(self, find: Callable[[], str], last: str | None = None) -> None:
        self._find = find
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._new: str | None = None  # found, not yet taken by found()
        self._latest = last  # where the bus was found last
        self._due = time.monotonic() + LOOK_FIRST
        self._wait = LOOK_FIRST
        self._stopped = False

    def found(self) -> str | None:
        with self._lock:
            new, self._new = self._new, None
        if new is None and time.monotonic() >= self._due:
            self._look()
        return new

    def relocate(self) -> str:
        self._look()
        if self._latest is None:
            from .link import NoBus

            raise NoBus("no bus found")
        return self._latest

    def _look(self) -> None:
        with self._lock:
            if self._stopped or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._run, name="find-bus", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            endpoint: str | None = self._find()
        except Exception:  # none found, or the network failed: look again later
            endpoint = None
        with self._lock:
            if endpoint is not None:
                self._new = self._latest = endpoint
            self._wait = min(self._wait * 2, LOOK_AT_MOST)
            self._due = time.monotonic() + self._wait

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
