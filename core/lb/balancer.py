"""Choosing an instance per request, and keeping score of their health.

One :class:`Balancer` holds the live instances (:class:`Backend`) of a
service, as the caller and the broker know them, and picks one per request
with a strategy:

- ``round-robin`` -- each in turn;
- ``weighted`` -- in proportion to the registry weight (smooth weighted
  round-robin, as nginx does: exact shares, no bursts);
- ``least-conn`` -- the fewest requests in flight (ties in turn);
- ``random`` -- uniformly at random;
- ``p2c`` -- power of two choices: two at random, the one with fewer in flight.

Health is passive, from the outcome of requests (:meth:`Balancer.finished`):

- **outlier ejection**: *eject_after* consecutive failures (timeouts,
  deaths, error replies) eject an
  instance for ``eject_base * 2**k`` seconds (k: how many times it was
  ejected since its last success), capped at *eject_max*;
- **slow start**: an instance that appears or comes back from ejection
  ramps its effective weight linearly over *slow_start* seconds (from 10%);
- **panic threshold**: when fewer than *panic* percent of the instances are
  healthy (not ejected), balance over all of them rather than pile
  everything onto the few left, as Envoy does.

Instances of weight 0 (draining in the registry) are never picked.  The
class is pure (no I/O); time comes from *clock* and chance from *rng*, so
tests drive both.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("round-robin", "weighted", "least-conn", "random", "p2c")
SLOW_START_FLOOR = 0.1  # share of its weight an instance starts with under slow start


@dataclass(eq=False)
class Backend:
    """One instance as the balancer sees it; *data* is the user's (endpoint, socket...)."""

    key: str
    weight: int = 1
    data: Any = None
    inflight: int = 0
    requests: int = 0  # picked
    failures: int = 0  # completed with a failure
    consecutive: int = 0  # failures since the last success
    ejections: int = 0  # times ejected since the last success
    ejected_until: float = 0.0
    warm_from: float = 0.0  # slow start began here
    current: float = field(default=0.0, repr=False)  # smooth weighted round-robin state

    def state(self, now: float) -> str:
        return "ejected" if self.ejected_until > now else "healthy"


class Balancer:
    """The instances of one service and how to choose among them."""

    def __init__(
        self,
        strategy: str = "round-robin",
        *,
        eject_after: int = 5,
        eject_base: float = 1.0,
        eject_max: float = 30.0,
        slow_start: float = 0.0,
        panic: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        rng: _random.Random | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.eject_after = max(1, eject_after)
        self.eject_base, self.eject_max = eject_base, eject_max
        self.slow_start = slow_start
        self.panic = panic
        self.clock = clock
        self.rng = rng or _random.Random()
        self._backends: dict[str, Backend] = {}
        self._order: list[Backend] = []  # insertion order, for turns
        self._turn = 0
        self._pickers: dict[str, Callable[[list[Backend]], Backend]] = {
            "round-robin": self._round_robin,
            "weighted": self._weighted,
            "least-conn": self._least_conn,
            "random": self._random,
            "p2c": self._p2c,
        }
        self._pick = self._pickers[strategy]
        self._live: list[Backend] | None = None  # instances of weight > 0, when nothing changes
        self._ejected = 0  # backends ejected now (maybe expired: checked lazily)
        self.ejections = 0  # ejections since start (--metrics)
        self._warming = 0  # backends possibly still in slow start

    # -- membership ----------------------------------------------------------------------------
    def add(self, key: str, weight: int = 1, data: Any = None, *, warm: bool = True) -> Backend:
        """Add *key* (or update its weight and data); new instances slow-start if *warm*."""
        self._live = None
        backend = self._backends.get(key)
        if backend is not None:
            backend.weight = max(0, weight)
            if data is not None:
                backend.data = data
            return backend
        backend = Backend(key, max(0, weight), data)
        if warm and self.slow_start > 0:
            backend.warm_from = self.clock()
            self._warming += 1
        else:
            backend.warm_from = -1e18
        self._backends[key] = backend
        self._order.append(backend)
        return backend

    def remove(self, key: str) -> Backend | None:
        self._live = None
        backend = self._backends.pop(key, None)
        if backend is not None:
            self._order.remove(backend)
        return backend

    def get(self, key: str) -> Backend | None:
        return self._backends.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._backends

    def __len__(self) -> int:
        return len(self._backends)

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._order))

    # -- choosing ---------------------------------------------------------------------------------
    def pick(self, exclude: Collection[str] = ()) -> Backend | None:
        """The instance for the next request (None when there is none to pick).

        Instances in *exclude* (those a retry already tried) are avoided while
        another one is available.  The pick is not counted as in flight until
        :meth:`started`.
        """
        if not exclude and not self._ejected and not self._warming:  # the common case
            live = self._live
            if live is None:
                live = self._live = [b for b in self._order if b.weight > 0]
            if len(live) > 1:
                return self._pick(live)
            return live[0] if live else None
        candidates = self._candidates()
        if exclude and candidates:
            others = [b for b in candidates if b.key not in exclude]
            if others:
                candidates = others
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return self._pick(candidates)

    def _candidates(self) -> list[Backend]:
        order = self._order
        if self._ejected:
            now = self.clock()
            healthy = [b for b in order if b.ejected_until <= now and b.weight > 0]
            if len(healthy) == len(order):  # every ejection is over
                self._ejected = 0
                return healthy
            live = [b for b in order if b.weight > 0]
            if live and len(healthy) * 100 < self.panic * len(live):
                return live  # panic: spread over all rather than crush the few left
            return healthy
        return [b for b in order if b.weight > 0]

    def effective_weight(self, backend: Backend, now: float | None = None) -> float:
        """*backend*'s weight scaled by slow start (for ``weighted``; 1 for the others)."""
        weight = float(backend.weight) if self.strategy == "weighted" else 1.0
        if not self._warming:
            return weight
        now = self.clock() if now is None else now
        elapsed = now - backend.warm_from
        if elapsed >= self.slow_start:
            return weight
        return weight * max(SLOW_START_FLOOR, elapsed / self.slow_start)

    def _weights(self, candidates: list[Backend]) -> list[float] | None:
        """Effective weights when slow start is in progress, else None (all equal/static)."""
        if not self._warming:
            return None
        now = self.clock()
        weights = [self.effective_weight(b, now) for b in candidates]
        if all(now - b.warm_from >= self.slow_start for b in self._order):
            self._warming = 0
        return weights

    def _round_robin(self, candidates: list[Backend]) -> Backend:
        if self._warming:
            return self._smooth(candidates)
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    def _weighted(self, candidates: list[Backend]) -> Backend:
        return self._smooth(candidates)

    def _smooth(self, candidates: list[Backend]) -> Backend:
        """Smooth weighted round-robin: each gets its weight added, the largest is
        chosen and pays the total back; shares are exact and interleaved."""
        weights = self._weights(candidates)
        if weights is None:
            weights = [float(b.weight) if self.strategy == "weighted" else 1.0 for b in candidates]
        total = 0.0
        best = candidates[0]
        best_current = -1e300
        for backend, weight in zip(candidates, weights, strict=True):
            backend.current += weight
            total += weight
            if backend.current > best_current:
                best, best_current = backend, backend.current
        best.current -= total
        return best

    def _least_conn(self, candidates: list[Backend]) -> Backend:
        weights = self._weights(candidates)
        n = len(candidates)
        self._turn += 1
        start = self._turn % n
        best = candidates[start]
        best_load = self._load(best, weights[start] if weights else 1.0)
        for i in range(1, n):
            j = (start + i) % n
            backend = candidates[j]
            load = self._load(backend, weights[j] if weights else 1.0)
            if load < best_load:
                best, best_load = backend, load
        return best

    @staticmethod
    def _load(backend: Backend, weight: float) -> float:
        return (backend.inflight + 1) / weight

    def _random(self, candidates: list[Backend]) -> Backend:
        weights = self._weights(candidates)
        if weights is None:
            return candidates[int(self.rng.random() * len(candidates))]
        return self.rng.choices(candidates, weights)[0]

    def _p2c(self, candidates: list[Backend]) -> Backend:
        n = len(candidates)
        i = int(self.rng.random() * n)
        j = int(self.rng.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        if self._warming:
            now = self.clock()
            load_a = self._load(a, self.effective_weight(a, now))
            load_b = self._load(b, self.effective_weight(b, now))
        else:
            load_a, load_b = a.inflight, b.inflight
        return b if load_b < load_a else a

    # -- outcomes --------------------------------------------------------------------------------
    def started(self, backend: Backend) -> None:
        """A request went to *backend*."""
        backend.inflight += 1
        backend.requests += 1

    def finished(self, backend: Backend, ok: bool = True) -> bool:
        """A request to *backend* ended; True when this failure ejected it.

        *ok* False is a failure: a timeout, a transport error, the instance
        died, or an error reply (as Envoy counts consecutive 5xx: an instance
        whose command keeps failing -- missing on its host, out of disk --
        is ejected; when every instance fails alike, the panic threshold keeps
        them all in use).  A busy reply should be reported with :meth:`released`.
        """
        backend.inflight = max(0, backend.inflight - 1)
        if ok:
            backend.consecutive = 0
            backend.ejections = 0
            return False
        return self.failed(backend)

    def released(self, backend: Backend) -> None:
        """A request left *backend* without a verdict (busy, or cancelled)."""
        backend.inflight = max(0, backend.inflight - 1)

    def failed(self, backend: Backend) -> bool:
        """Count one failure of *backend* (not in flight); True when it ejected it."""
        backend.failures += 1
        backend.consecutive += 1
        if backend.consecutive < self.eject_after:
            return False
        now = self.clock()
        if backend.ejected_until > now:
            return False  # already out: failures of requests sent before the ejection
        self.eject(backend, self.eject_base * 2**backend.ejections)
        return True

    def eject(self, backend: Backend, seconds: float) -> None:
        """Take *backend* out of the rotation for *seconds* (capped), then slow-start it."""
        seconds = min(seconds, self.eject_max)
        now = self.clock()
        backend.ejected_until = now + seconds
        backend.ejections += 1
        backend.consecutive = 0
        self._ejected += 1
        self.ejections += 1
        if self.slow_start > 0:
            backend.warm_from = backend.ejected_until
            self._warming += 1

    def healthy(self, now: float | None = None) -> list[Backend]:
        now = self.clock() if now is None else now
        return [b for b in self._order if b.ejected_until <= now]

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-instance figures (for stats output)."""
        now = self.clock()
        return [
            {
                "id": b.key,
                "weight": b.weight,
                "inflight": b.inflight,
                "requests": b.requests,
                "failures": b.failures,
                "state": b.state(now),
                "effective_weight": round(self.effective_weight(b, now), 3),
            }
            for b in self._order
        ]
