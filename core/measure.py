"""Measuring what happened: latency percentiles, and rise/fall debounce of check results.

Both are written once here because every component that reports or decides
on them must agree (``eda-lb stats`` shows the broker's and the workers'
figures side by side; a registry check and a TCP proxy's check go up and
down by the same rule).

Percentiles use the **nearest-rank** definition: the *q* percentile of *n*
samples is the smallest sample such that at least ``q * n`` of the samples
are no greater, i.e. the ``ceil(q * n)``-th smallest (the first for q = 0).
Every figure is a sample that was really observed (nothing interpolated),
p100 is the maximum, and the same samples always give the same figures.

Debounce (:class:`Debounce`): the reported status changes only after
``rise`` consecutive passing results, or ``fall`` consecutive results of
another status, so a flapping check does not flap what it decides.  Until
the first passing result, one result decides at once (as in Consul): a new
instance that fails its first check is out at once, and one that passes for
the first time is in at once, without waiting ``rise`` intervals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

S = TypeVar("S")

LATENCY_FIGURES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The *q* (0..1) percentile of the sorted samples *ordered*, by nearest rank
    (None when there is no sample)."""
    n = len(ordered)
    if not n:
        return None
    return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]


def latency_ms(
    seconds: Iterable[float], figures: Iterable[tuple[str, float]] = LATENCY_FIGURES
) -> dict[str, float | None]:
    """Percentiles of latencies in *seconds*, in milliseconds rounded to the microsecond,
    named as in *figures* ((name, q) pairs); None where there is no sample."""
    ordered = sorted(seconds)
    out: dict[str, float | None] = {}
    for name, q in figures:
        value = percentile(ordered, q)
        out[name] = None if value is None else round(value * 1000, 3)
    return out


class Debounce(Generic[S]):
    """Rise/fall counting over raw check results (see the module's doc).

    *good* is the result that counts as passing; every other result is failing.
    A run is a series of results that push the status the same way: passing
    ones, or failing ones (of any failing kind), so a check alternating between
    two failing results still falls after ``fall`` of them and then reports the
    latest.  :attr:`passes` and :attr:`fails` count the raw results in a row.
    """

    def __init__(self, rise: int, fall: int, good: S) -> None:
        self.rise, self.fall, self.good = rise, fall, good
        self.status: S | None = None  # None: no result yet
        self.passed = False  # has a result ever been passing?
        self.passes = 0  # passing results in a row
        self.fails = 0  # failing results in a row
        self._run_failing: bool | None = None  # which way the current run pushes
        self._count = 0

    def feed(self, result: S) -> bool:
        """Take one result; True when the reported status changed."""
        failing = result != self.good
        if failing:
            self.passes, self.fails = 0, self.fails + 1
        else:
            self.passes, self.fails = self.passes + 1, 0
        if self.status is None:  # the first result counts at once
            self.status, self.passed = result, not failing
            return True
        if not failing and not self.passed:  # starting up: the first pass counts at once
            self.status, self.passed, self._run_failing, self._count = result, True, None, 0
            return True
        if result == self.status:
            self._run_failing, self._count = None, 0
            return False
        if self._run_failing is not failing:
            self._run_failing, self._count = failing, 0
        self._count += 1
        if self._count >= (self.fall if failing else self.rise):
            self.status, self._run_failing, self._count = result, None, 0
            return True
        return False
