"""Bounds on what peers can make a daemon hold: descriptors and queued bytes.

A daemon raises its descriptor limit once (:func:`raise_fd_limit`) so that a
crowd of idle connections meets the hard limit, not a low default soft one.
:class:`QueuedBytes` counts, per peer and in total, the bytes sent to peers
and not yet known to be taken by them, so that a daemon sends a peer more
only while both counts stay within their bounds (CONVENTIONS.md §7).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Hashable


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit; the new soft one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class QueuedBytes:
    """Bytes sent to each peer and not taken yet, bounded per peer and in total.

    What is sent is recorded with :meth:`add` as *units* (events, messages,
    bytes: whatever the peer reports taking) and their size in bytes; the peer
    taking units releases the oldest ones (:meth:`release`).  :meth:`room` says
    whether *size* more bytes may be sent: a peer holding nothing may always be
    sent one thing (so one large item never stalls a peer for good); otherwise
    its bytes and everyone's must stay within *per_peer* and *total*.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer, self.limit = per_peer, total
        self.total = 0
        self._held: dict[Hashable, int] = {}
        self._sent: dict[Hashable, deque[list[int]]] = {}  # [units, bytes], oldest first

    def held(self, peer: Hashable) -> int:
        return self._held.get(peer, 0)

    def room(self, peer: Hashable, size: int) -> bool:
        held = self._held.get(peer, 0)
        if held == 0:
            return True
        return held + size <= self.per_peer and self.total + size <= self.limit

    def add(self, peer: Hashable, units: int, size: int) -> None:
        self._sent.setdefault(peer, deque()).append([units, size])
        self._held[peer] = self._held.get(peer, 0) + size
        self.total += size

    def release(self, peer: Hashable, units: int) -> None:
        """*peer* took its oldest *units* (more than it was sent is ignored)."""
        sent = self._sent.get(peer)
        freed = 0
        while sent and units > 0:
            item = sent[0]
            if units >= item[0]:
                units -= item[0]
                freed += item[1]
                sent.popleft()
            else:  # part of one item: its bytes in proportion
                part = item[1] * units // item[0]
                item[0] -= units
                item[1] -= part
                freed += part
                units = 0
        if freed:
            self._held[peer] -= freed
            self.total -= freed
        if not sent:
            self.forget(peer)

    def forget(self, peer: Hashable) -> None:
        """*peer* is gone, and what was queued for it with it."""
        self._sent.pop(peer, None)
        self.total -= self._held.pop(peer, 0)
