"""How late a heartbeat arrives: a lower bound, from the registrant's own clock.

A heartbeat can reach the registry long after it was sent: held in a kernel
buffer through a partition and retransmitted after the heal, or queued in
the registry's own socket buffers while the registry was frozen (SIGSTOP, a
stalled VM).  Taken as news, it revives an instance whose registrant may
have been dead all that time (the nemesis's seed 3: served 23.5 s after its
registrant froze, against a bound of 6.4 s).

Each heartbeat carries the registrant's monotonic clock (``sent``: the
clock's random name, chosen per process, and its reading).  For each
(instance, clock) the registry keeps the smallest ``received - sent`` seen,
its *base* (one-way delay plus the clocks' offset); a heartbeat's
``received - sent - base`` is then a lower bound of how much later than the
quickest one it arrived.  It never overstates: a heartbeat on time has
lateness near zero, whatever the clocks' offset.  The base is let rise by
:data:`DRIFT` per second, far more than two quartz clocks drift apart, so
drift never accumulates into lateness.  A heartbeat without ``sent`` (an
older registrant) is on time, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DRIFT = 1e-3  # s/s the base may rise: quartz clocks drift by 1e-5 to 1e-4
FORGET = 600.0  # s after which a clock not heard from is forgotten
MAX_CLOCKS = 100_000  # clocks remembered at most (a flood of new names forgets the oldest)


class Lateness:
    """Per (instance id, clock name): the base, and when it was last set."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.bases: dict[tuple[str, str], tuple[float, float]] = {}

    def of(self, inst_id: str, sent: tuple[str, float] | None) -> float:
        """Seconds (>= 0) the heartbeat of *inst_id* that carried *sent* is late at least."""
        if sent is None:
            return 0.0
        now = self.clock()
        key = (inst_id, sent[0])
        offset = now - sent[1]
        known = self.bases.get(key)
        base = offset if known is None else min(offset, known[0] + DRIFT * (now - known[1]))
        self.bases.pop(key, None)  # re-inserted last: the dict stays in order of use
        self.bases[key] = (base, now)
        if len(self.bases) > MAX_CLOCKS or next(iter(self.bases.values()))[1] < now - FORGET:
            self._forget(now)
        return offset - base

    def _forget(self, now: float) -> None:
        for key in list(self.bases):
            if len(self.bases) <= MAX_CLOCKS and self.bases[key][1] >= now - FORGET:
                break
            del self.bases[key]
