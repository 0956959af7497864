"""The broker's requests: one :class:`Pending` per caller request until its reply
went out, and :class:`Waiting`, the bounded queue of those waiting for a free worker."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..outbox import RELEASE_AFTER, release_memory


@dataclass(eq=False, slots=True)
class Pending:
    """One caller's request, from its Q until its reply went out."""

    client: bytes  # the caller's identity on the frontend
    rid: bytes
    body: bytes
    deadline: float  # monotonic; math.inf without one
    attempts: int = 0  # times sent to a worker (busy answers not counted)
    busy: int = 0  # busy answers from workers
    running: int = 0  # workers running it now
    done: bool = False  # answered: later replies only free their slots
    tried: list[str] = field(default_factory=list)  # worker keys, in order


class Waiting:
    """The requests waiting for a free worker, in order; bounded in number and in
    bytes, and each caller to half of the places and half of the bytes, so that
    one caller cannot shut the others out."""

    def __init__(self, limit: int, limit_bytes: int) -> None:
        self.limit, self.limit_bytes = limit, limit_bytes
        self.per_caller = max(1, limit // 2)
        self.per_caller_bytes = max(1, limit_bytes // 2)
        self.items: deque[Pending] = deque()
        self.bytes = 0
        self.high = 0  # the most bytes waiting since memory was last given back
        self.by_caller: dict[bytes, int] = {}
        self.bytes_by_caller: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def fits(self, p: Pending) -> bool:
        return (
            len(self.items) < self.limit
            and self.bytes + len(p.body) <= self.limit_bytes
            and self.by_caller.get(p.client, 0) < self.per_caller
            and self.bytes_by_caller.get(p.client, 0) + len(p.body) <= self.per_caller_bytes
        )

    def push(self, p: Pending, first: bool = False) -> None:
        """Add *p* at the end (or *first*: a retry, accepted before, may exceed the bounds)."""
        if first:
            self.items.appendleft(p)
        else:
            self.items.append(p)
        self.bytes += len(p.body)
        self.high = max(self.high, self.bytes)
        self.by_caller[p.client] = self.by_caller.get(p.client, 0) + 1
        self.bytes_by_caller[p.client] = self.bytes_by_caller.get(p.client, 0) + len(p.body)

    def pop(self) -> Pending:
        p = self.items.popleft()
        self._gone(p)
        return p

    def _gone(self, p: Pending) -> None:
        self.bytes -= len(p.body)
        left = self.by_caller[p.client] - 1
        if left:
            self.by_caller[p.client] = left
            self.bytes_by_caller[p.client] -= len(p.body)
        else:
            del self.by_caller[p.client], self.bytes_by_caller[p.client]
        if not self.items and self.high >= RELEASE_AFTER:
            self.high = 0
            release_memory()  # a burst of large requests is gone: so is its memory

    def take_all(self) -> list[Pending]:
        """Empty the queue; what was in it."""
        items = list(self.items)
        self.items.clear()
        self.bytes = 0
        self.by_caller.clear()
        self.bytes_by_caller.clear()
        return items

    def take_expired(self, now: float) -> list[Pending]:
        """Remove and return the waiting requests whose deadline passed (and drop the
        answered ones)."""
        if not any(p.done or p.deadline < now for p in self.items):
            return []
        expired = []
        kept: deque[Pending] = deque()
        for p in self.items:
            if p.done or p.deadline < now:
                self._gone(p)
                if not p.done:
                    expired.append(p)
            else:
                kept.append(p)
        self.items = kept
        return expired
