"""The workers connected to a broker's backend: who is ready, with how many free slots,
when each was last heard, and the dropped ones (kept for ``eda-lb stats``).

:class:`Workers` is bookkeeping only (no socket): the broker says what the
workers send (W, H) and sends what it decides (H, D, requests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..metrics import Histogram
from .balancer import Backend, Balancer
from .brokerqueue import Pending

MAX_WORKERS = 10_000  # workers one broker keeps (a flood of W is refused beyond)
DEAD_KEPT = 64  # dropped workers still listed by stats (state "dead")
LATENCIES = 2048  # latency samples per worker for the percentiles
MISSED = 3  # heartbeat intervals of silence after which a worker is dropped
DEFAULT_WORKER_HEARTBEAT = 1.0  # eda-lb worker --heartbeat's default
MAX_PERIOD = 60.0  # longest heartbeat interval learnt from a worker


@dataclass(eq=False)
class Worker:
    """A worker connected to the backend, with its figures."""

    ident: bytes
    id: str
    concurrency: int
    limit: int  # requests in flight at most: its capacity (or concurrency x pipeline)
    backend: Backend
    seen: float  # monotonic time of its last message
    period: float  # its heartbeat interval, as observed between two H
    inflight: dict[bytes, tuple[Pending, float]] = field(default_factory=dict)  # rid -> (p, t0)
    requests: int = 0  # answered (ok or err)
    errors: int = 0  # err replies, timeouts, bad replies, requests lost with it
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES))
    latency: Histogram = field(default_factory=Histogram)  # all of them (--metrics)
    dead: bool = False
    beat_at: float = 0.0  # monotonic time of its last H

    @property
    def free(self) -> bool:
        return len(self.inflight) < self.limit


class Workers:
    """The broker's workers, by their identity on the backend (see the module's doc)."""

    def __init__(self, balancer: Balancer, heartbeat: float, pipeline: int) -> None:
        self.balancer = balancer
        self.heartbeat, self.pipeline = heartbeat, pipeline
        self.by_ident: dict[bytes, Worker] = {}
        self.full: set[str] = set()  # keys of workers with no free slot
        self.dead: deque[Worker] = deque(maxlen=DEAD_KEPT)

    def __len__(self) -> int:
        return len(self.by_ident)

    def ready(self, ident: bytes, data: dict[str, Any], now: float) -> Worker | None:
        """A W (of the broker's service): the new worker, None when it was known (new
        figures, same requests in flight) or when there are too many already."""
        concurrency, weight = data["concurrency"], data["weight"]
        w = self.by_ident.get(ident)
        if w is not None:
            w.id, w.concurrency, w.seen = data["id"], concurrency, now
            w.limit = self._limit(data)
            self.balancer.add(w.backend.key, weight)
            self.fullness(w)
            return None
        if len(self.by_ident) >= MAX_WORKERS:
            raise OverflowError("too many workers")
        # a worker joining others ramps up (slow start); the first ones take all at once
        backend = self.balancer.add(ident.hex(), weight, warm=len(self.balancer) > 0)
        # until its second H, allow the default heartbeat of eda-lb workers
        period = max(self.heartbeat, DEFAULT_WORKER_HEARTBEAT)
        w = Worker(ident, data["id"], concurrency, self._limit(data), backend, now, period)
        backend.data = w
        self.by_ident[ident] = w
        return w

    def _limit(self, ready: dict[str, Any]) -> int:
        """Requests in flight at a worker at most: what its W says it takes, unless
        ``--pipeline`` says how many per slot."""
        pipeline = self.pipeline
        return int(ready["concurrency"] * pipeline if pipeline else ready["capacity"])

    def fullness(self, w: Worker) -> None:
        if w.free:
            self.full.discard(w.backend.key)
        else:
            self.full.add(w.backend.key)

    def beat(self, w: Worker, now: float) -> None:
        """A worker's H: its period is learnt, so that one whose heartbeat is slower than
        ours is not dropped between two of its H."""
        if w.beat_at:
            w.period = min(MAX_PERIOD, max(0.01, now - w.beat_at))
        w.beat_at = w.seen = now

    def silent(self, w: Worker, now: float) -> bool:
        return now - w.seen > MISSED * max(self.heartbeat, w.period)

    def remove(self, w: Worker) -> list[tuple[Pending, float]] | None:
        """Forget *w*: what it was running (None if it was not known)."""
        if self.by_ident.pop(w.ident, None) is None:
            return None
        self.balancer.remove(w.backend.key)
        self.full.discard(w.backend.key)
        w.dead = True
        self.dead.append(w)
        lost = list(w.inflight.values())
        w.inflight.clear()
        w.errors += len(lost)
        return lost

    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) for w in self.by_ident.values())

    @property
    def capacity(self) -> int:
        return sum(w.concurrency for w in self.by_ident.values())

    def state(self, w: Worker, now: float) -> str:
        """dead, ejected, slow-start or healthy."""
        b = w.backend
        if w.dead:
            return "dead"
        if b.ejected_until > now:
            return "ejected"
        if self.balancer.slow_start > 0 and now - b.warm_from < self.balancer.slow_start:
            return "slow-start"
        return "healthy"
