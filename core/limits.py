"""Bounds on what peers can make a process hold: descriptors, queued bytes, per-peer state.

A daemon raises its descriptor limit once (:func:`raise_fd_limit`) so that a
crowd of idle connections meets the hard limit, not a low default soft one.
:class:`PeerBytes` counts bytes per peer and in total, and says whether
more fit within both bounds (CONVENTIONS.md §7); it is the one such count:
:class:`QueuedBytes` (eda-bus: bytes sent to peers and not yet known to be
taken by them) and :class:`eda.core.outbox.Outbox` (replies that could not
be sent yet) count with it.
:class:`BoundedMap` and :class:`BoundedSet` hold state keyed by what peers
send (their ids, their topics) in a bounded number of keys, forgetting the
least recently used ones first and counting how many were forgotten.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")
_MISSING: Any = object()


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit; the new soft one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class PeerBytes:
    """Bytes held for each peer and for all of them, within a bound per peer and in total."""

    __slots__ = ("_held", "limit", "per_peer", "total")

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer, self.limit = per_peer, total
        self.total = 0
        self._held: dict[Hashable, int] = {}

    def held(self, peer: Hashable) -> int:
        return self._held.get(peer, 0)

    def fits(self, peer: Hashable, size: int) -> bool:
        """Whether *size* more bytes for *peer* stay within both bounds."""
        return self._held.get(peer, 0) + size <= self.per_peer and self.total + size <= self.limit

    def full(self, peer: Hashable) -> bool:
        """Whether *peer* holds its bound already."""
        return self._held.get(peer, 0) >= self.per_peer

    def add(self, peer: Hashable, size: int) -> None:
        self._held[peer] = self._held.get(peer, 0) + size
        self.total += size

    def remove(self, peer: Hashable, size: int) -> None:
        """*size* of *peer*'s bytes are no longer held (a peer left at 0 is forgotten)."""
        left = self._held.get(peer, 0) - size
        if left > 0:
            self._held[peer] = left
        else:
            self._held.pop(peer, None)
        self.total -= size

    def forget(self, peer: Hashable) -> int:
        """*peer* is gone, and its bytes with it; how many they were."""
        freed = self._held.pop(peer, 0)
        self.total -= freed
        return freed


class QueuedBytes:
    """Bytes sent to each peer and not taken yet, bounded per peer and in total.

    What is sent is recorded with :meth:`add` as *units* (events, messages,
    bytes: whatever the peer reports taking) and their size in bytes; the peer
    taking units releases the oldest ones (:meth:`release`).  :meth:`room` says
    whether *size* more bytes may be sent: a peer holding nothing may always be
    sent one thing (so one large item never stalls a peer for good); otherwise
    its bytes and everyone's must stay within *per_peer* and *total*.
    :attr:`crowded` says that *total*, not its own bound, held a peer back (the
    caller resets it), and :meth:`untaken_since` since when a peer has left its
    oldest item untaken: the caller frees room for the peers that read by
    cutting off those that do not (eda-bus: :meth:`.BusServer._make_room`).
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self.bytes = PeerBytes(per_peer, total)
        self._sent: dict[Hashable, deque[list[float]]] = {}  # [units, bytes, sent at], oldest 1st
        self.crowded = False  # the total held back a peer within its own bound

    @property
    def total(self) -> int:
        return self.bytes.total

    def held(self, peer: Hashable) -> int:
        return self.bytes.held(peer)

    def room(self, peer: Hashable, size: int) -> bool:
        held = self.bytes.held(peer)
        if held == 0 or self.bytes.fits(peer, size):
            return True
        if held + size <= self.bytes.per_peer:
            self.crowded = True
        return False

    def add(self, peer: Hashable, units: int, size: int) -> None:
        self._sent.setdefault(peer, deque()).append([units, size, time.monotonic()])
        self.bytes.add(peer, size)

    def untaken_since(self, peer: Hashable) -> float | None:
        """When the oldest item still held for *peer* was sent (time.monotonic); None: none."""
        sent = self._sent.get(peer)
        return sent[0][2] if sent else None

    def release(self, peer: Hashable, units: int) -> None:
        """*peer* took its oldest *units* (more than it was sent is ignored)."""
        sent = self._sent.get(peer)
        freed = 0
        while sent and units > 0:
            item = sent[0]
            if units >= item[0]:
                units -= int(item[0])
                freed += int(item[1])
                sent.popleft()
            else:  # part of one item: its bytes in proportion
                part = int(item[1]) * units // int(item[0])
                item[0] -= units
                item[1] -= part
                freed += part
                units = 0
        if freed:
            self.bytes.remove(peer, freed)
        if not sent:
            self.forget(peer)

    def forget(self, peer: Hashable) -> None:
        """*peer* is gone, and what was queued for it with it."""
        self._sent.pop(peer, None)
        self.bytes.forget(peer)


class BoundedMap(Generic[K, V]):
    """A map of at most *limit* keys that forgets the least recently used ones first.

    Keys come from peers (ids, topics) and a hostile peer can invent any
    number of them (CONVENTIONS.md §7): this map stays within *limit* keys,
    and :attr:`evicted` counts the keys it forgot, for stats and ``-v``.
    Reading (:meth:`get`) or writing a key counts as using it.

    It keeps two generations of dicts: keys are added to the young one; when
    that holds half the limit, the old generation is forgotten (counted,
    passed to *on_evict*) and the young one becomes old; a key used while
    old moves back to the young one.  Every operation is O(1) (amortized)
    and a hit on a recently used key costs one dict lookup: a hot path may
    read :attr:`recent` (the young generation, always the same dict) first
    and call :meth:`get` only on a miss.
    """

    __slots__ = ("_half", "_old", "_young", "evicted", "limit", "on_evict")

    def __init__(self, limit: int, on_evict: Callable[[dict[K, V]], None] | None = None) -> None:
        if limit < 2:
            raise ValueError("a BoundedMap holds at least two keys")
        self.limit = limit
        self.on_evict = on_evict  # called with the keys (and values) forgotten at once
        self.evicted = 0
        self._half = limit // 2
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}

    @property
    def recent(self) -> dict[K, V]:
        """The recently used keys (read only; the same dict for the map's life)."""
        return self._young

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: Any = None) -> Any:
        """The value of *key* (now recently used), or *default*."""
        value = self._young.get(key, _MISSING)
        if value is not _MISSING:
            return value
        value = self._old.pop(key, _MISSING)
        if value is _MISSING:
            return default
        self._add(key, value)
        return value

    def __getitem__(self, key: K) -> V:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        young = self._young
        if key in young:
            young[key] = value
            return
        self._old.pop(key, None)
        self._add(key, value)

    def setdefault(self, key: K, default: V) -> V:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            self._add(key, default)
            return default
        return value

    def _add(self, key: K, value: V) -> None:
        young = self._young
        if len(young) >= self._half:
            forgotten, self._old = self._old, dict(young)
            young.clear()  # (the same dict: see recent)
            if forgotten:
                self.evicted += len(forgotten)
                if self.on_evict is not None:
                    self.on_evict(forgotten)
        young[key] = value

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: Any = None) -> Any:
        value = self._young.pop(key, _MISSING)
        if value is _MISSING:
            value = self._old.pop(key, default)
        return value

    def __delitem__(self, key: K) -> None:
        if self.pop(key, _MISSING) is _MISSING:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        """Whether *key* is held (a test only: it does not count as using it)."""
        return key in self._young or key in self._old

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first (a snapshot: safe to change the map)."""
        return iter([*self._old, *self._young])

    def keys(self) -> set[K]:
        return {*self._old, *self._young}

    def items(self) -> list[tuple[K, V]]:
        return [*self._old.items(), *self._young.items()]

    def values(self) -> list[V]:
        return [*self._old.values(), *self._young.values()]

    def clear(self) -> None:
        self._young.clear()
        self._old.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r}, limit={self.limit})"


class BoundedSet(BoundedMap[K, None]):
    """A set of at most *limit* members, forgetting the least recently added or
    tested (:meth:`touch`) first; :attr:`evicted` counts the forgotten ones."""

    __slots__ = ()

    def __init__(
        self,
        limit: int,
        members: Iterable[K] = (),
        on_evict: Callable[[dict[K, None]], None] | None = None,
    ) -> None:
        super().__init__(limit, on_evict)
        for member in members:
            self.add(member)

    def add(self, member: K) -> None:
        self[member] = None

    def touch(self, member: K) -> bool:
        """Whether *member* is held; if so, it counts as recently used."""
        return self.get(member, _MISSING) is not _MISSING

    def discard(self, member: K) -> None:
        self.pop(member, None)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BoundedSet):
            return self.keys() == other.keys()
        if isinstance(other, (set, frozenset)):
            return self.keys() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.keys()!r}, limit={self.limit})"
