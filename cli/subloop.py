"""eda-sub's receive loop: one stream of events from one or two sources.

A source is where events come from: brokerless publishers
(:class:`Brokerless`, an :class:`eda.core.pubsub.Subscriber`) or the bus
(:class:`Bus`, an :class:`eda.core.bus.client.BusSubscriber`).  ``eda-sub``
has one, ``eda-sub --bus`` the other, ``eda-sub --everywhere`` both.  One
loop (:func:`run`) drives them: it waits on all their sockets at once
(one ``zmq.Poller``), counts events across them (``-C``), keeps one idle
clock (``-W``), and hands what each source received to that source's
renderer; each source keeps its own accounting (brokerless gaps and
malformed messages, the bus's retention losses) and its own housekeeping
(discovery, heartbeats, looking for the bus again: ``--everywhere`` looks
for it in the background with :class:`eda.core.bus.finder.BusFinder`).

Apart from eda-sub's command module (options and output) because this is
what a reader of the loss and end-of-stream rules looks for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import zmq

from eda.cli.common import Context, Exit
from eda.cli.output import for_terminal
from eda.core.errors import EdaError, ExitStatus

if TYPE_CHECKING:
    from eda.core.bus.client import BusSubscriber, Delivery
    from eda.core.bus.finder import BusFinder
    from eda.core.codec import Batch
    from eda.core.envelope import RecentEvents
    from eda.core.pubsub import Subscriber


class Source:
    """One place events come from, as :func:`run` drives it.

    *render* writes a list of what :meth:`receive` returned; *give_up* says that
    nothing can ever arrive (every explicit publisher refused this key): exit 1.
    """

    every = 1.0  # s: :meth:`tick` runs at least this often

    def __init__(self, render: Callable[[list[Any]], None]) -> None:
        self.render = render
        self.give_up: Callable[[], bool] = lambda: False
        self.lost = 0  # events this source reported lost (--strict exits 5)
        self.ended = False  # nothing more will come (--until-end reached its end)

    def socket(self) -> zmq.Socket[bytes] | None:
        """The socket events arrive on (None: none now, e.g. no bus found yet)."""
        raise NotImplementedError

    def tick(self) -> None:
        """Housekeeping that must go on while nothing arrives (never blocks long)."""

    def receive(self) -> tuple[list[Any], bool]:
        """What waits now, without blocking: the items to render, and whether anything
        arrived at all (the idle clock restarts then)."""
        raise NotImplementedError

    def take(self, items: list[Any], n: int) -> tuple[list[Any], int]:
        """The first *n* events of *items*, and how many of *n* are left."""
        raise NotImplementedError

    def written(self, items: list[Any]) -> None:
        """*items* are written out (the bus acknowledges them)."""

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Held while output is written (a slow --exec job): what must go on meanwhile."""
        return contextlib.nullcontext()

    def report(self, final: bool = False) -> None:
        """Say on stderr what went wrong lately (rate-limited; everything when *final*)."""

    def close(self) -> None:
        raise NotImplementedError


def run(
    sources: list[Source],
    count: int | None,
    idle_timeout: float | None,
    strict: bool,
    ctx: Context,
    slow: bool = False,
) -> None:
    """Until *count* events are out (across every source), *idle_timeout* passed
    without one from any, a loss with *strict*, or a source's end.

    *slow*: writing out is slow per event (--exec), so each source's
    :meth:`Source.busy` is held meanwhile.
    """
    remaining = count
    tick_every = min(s.every for s in sources)
    poller = zmq.Poller()
    polled: list[zmq.Socket[bytes] | None] = []
    # the idle clock restarts once output is written: time blocked on a slow
    # reader is not time without events
    idle_since = time.monotonic()

    def wait(timeout: float | None) -> bool:
        """Until a message waits on some source (True) or *timeout* s passed (False)."""
        nonlocal poller, polled
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for source in sources:
                source.tick()
            if any(s.give_up() for s in sources):
                raise Exit(ExitStatus.ERROR)
            socks = [s.socket() for s in sources]
            if socks != polled:  # a bus found, or found elsewhere: a new socket
                poller = zmq.Poller()
                for sock in socks:
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
                polled = socks
            step = tick_every
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return False
            if poller.poll(max(1, int(step * 1000))):
                return True

    try:
        while remaining != 0:
            left = None if idle_timeout is None else idle_since + idle_timeout - time.monotonic()
            if left is None or left > 0:
                wait(left)
            heard = False
            for source in sources:
                items, arrived = source.receive()
                heard = heard or arrived
                if items and remaining is not None:
                    items, remaining = source.take(items, remaining)
                if items:
                    with _busy(sources) if slow else contextlib.nullcontext():
                        source.render(items)
                    source.written(items)
                source.report()
                if strict and source.lost:
                    raise Exit(ExitStatus.LOSS)
                if source.ended or remaining == 0:
                    return
            if heard:
                idle_since = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                # out of time, and nothing was queued either
                ctx.warn(f"no event for {idle_timeout:g} s (-W/--timeout): exiting with status 4")
                raise Exit(ExitStatus.TIMEOUT)
    finally:
        for source in sources:
            source.report(final=True)


@contextlib.contextmanager
def _busy(sources: list[Source]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for source in sources:
            stack.enter_context(source.busy())
        yield


class Brokerless(Source):
    """Events straight from their publishers: copies dropped, gaps reported as they
    are found (``lost N events from SOURCE``), malformed input counted."""

    every = 0.1  # discovered publishers are connected to this often

    def __init__(
        self,
        sub: Subscriber,
        render: Callable[[list[Batch]], None],
        recent: RecentEvents,
        ctx: Context,
        lost: list[int],
    ) -> None:
        super().__init__(render)
        self.sub = sub
        self.recent = recent
        self.ctx = ctx
        self._lost = lost  # counted by the subscriber's on_loss (gaps, ends of stream)
        self.reported_malformed = 0
        self.reported_copies = 0
        self.reported_evicted = 0
        self.reported_unaccounted = 0

    def socket(self) -> zmq.Socket[bytes]:
        return self.sub.sock

    def tick(self) -> None:
        self.sub.housekeeping()

    def receive(self) -> tuple[list[Batch], bool]:
        fresh = [piece for batch in self.sub.receive() for piece in self.recent.fresh(batch)]
        self.lost = self._lost[0]
        return fresh, bool(fresh)

    def take(self, items: list[Batch], n: int) -> tuple[list[Batch], int]:
        from eda.core import codec

        return codec.take(items, n)

    def report(self, final: bool = False) -> None:
        ctx, sub = self.ctx, self.sub
        malformed = sub.malformed - self.reported_malformed
        if malformed and (final or ctx.due("malformed")):
            ctx.warn(f"ignored {malformed} malformed message(s)")
            self.reported_malformed = sub.malformed
        copies = self.recent.dropped - self.reported_copies
        if copies and ctx.verbose and (final or ctx.due("copies")):
            ctx.debug(f"dropped {copies} event(s) delivered before (a loop or a copy)")
            self.reported_copies = self.recent.dropped
        evicted = sub.evicted - self.reported_evicted
        if evicted and ctx.verbose and (final or ctx.due("evicted")):
            ctx.debug(f"forgot {evicted} publisher id(s) or stream(s) (per-peer bound)")
            self.reported_evicted += evicted
        unknown = sub.unaccounted - self.reported_unaccounted
        if unknown and (final or ctx.due("unaccounted")):
            ctx.warn(
                f"warning: cannot tell whether {unknown} event(s) arrived: their streams"
                " were forgotten (more publishers and topics than a subscriber follows)"
            )
            self.reported_unaccounted += unknown

    def close(self) -> None:
        self.sub.close()


class Bus(Source):
    """Events from eda-bus: credit granted as they are taken, acknowledged once written
    out, losses to retention reported; with *until_end*, up to bus sequence *end* only.

    *connect* makes the subscriber for an endpoint; with no *endpoint* at first
    (``--everywhere`` and no bus found), *finder* keeps looking on a thread and the
    source is quiet meanwhile.
    """

    every = 1.0  # heartbeats, and looking for the bus (p.HEARTBEAT)

    def __init__(
        self,
        connect: Callable[[str], BusSubscriber],
        endpoint: str | None,
        render: Callable[[list[Delivery]], None],
        ctx: Context,
        *,
        durable: str | None = None,
        strict: bool = False,
        slow: bool = False,
        matcher: Callable[[str], bool] | None = None,
        end: int = 0,
        finder: BusFinder | None = None,
    ) -> None:
        super().__init__(render)
        self.connect = connect
        self.ctx = ctx
        self.durable = durable
        self.strict = strict
        self.slow = slow
        self.matcher = matcher  # with --until-end: every topic is read, the matching kept
        self.end = end
        self.finder = finder
        self.limit = 16 if slow else 1 << 16
        self.reported_lost = 0
        self.warned = False
        self.sub: BusSubscriber | None = None
        if endpoint is not None:
            self._refusable(lambda: self._start(endpoint))

    def _start(self, endpoint: str) -> None:
        self.sub = self.connect(endpoint)
        self.sub.subscribe()
        self.ctx.debug(f"subscribed to the bus at {endpoint}")

    def _refusable(self, step: Callable[[], None]) -> None:
        """Run *step*; a bus refusing this key (secure mode) ends the program, but
        with --everywhere (a *finder*) only this source: brokerless events go on."""
        from eda.core.reqrep import Refused

        try:
            step()
        except Refused as exc:
            if self.finder is None:
                raise
            self.ctx.error(str(exc))
            self._drop()

    def socket(self) -> zmq.Socket[bytes] | None:
        return None if self.sub is None else self.sub.sock

    def tick(self) -> None:
        if self.sub is not None:
            self._refusable(self.sub.housekeeping)  # heartbeats; a bus gone is looked for
        elif self.finder is not None:
            endpoint = self.finder.found()
            if endpoint is not None:
                self._refusable(lambda: self._start(endpoint))
                if self.sub is not None:
                    self.ctx.warn(f"found the bus at {endpoint}: its events are shown too")

    def _drop(self) -> None:
        if self.sub is not None:
            self.sub.close()
        self.sub = None
        if self.finder is not None:
            self.finder.stop()
        self.finder = None

    def receive(self) -> tuple[list[Delivery], bool]:
        sub = self.sub
        if sub is None:
            return [], False
        got = sub.receive(self.limit)
        if sub.errors:
            raise EdaError(f"the bus refused: {for_terminal(sub.errors[0])}")
        if sub.resumed is not None and self.durable is not None and not self.warned:
            _warn_resumed(self.ctx, self.durable, sub.patterns, *sub.resumed)
            self.warned = True
        if sub.lost > self.reported_lost:
            self.ctx.warn(
                f"lost {sub.lost - self.reported_lost} events (removed by the bus's retention"
                " before they were delivered)"
            )
            self.reported_lost = self.lost = sub.lost
            if self.strict:
                raise Exit(ExitStatus.LOSS)
        if not got or self.matcher is None:
            return got, bool(got)
        self.ended = sub.last >= self.end
        matcher, end = self.matcher, self.end
        return [d for d in got if d.busseq <= end and matcher(d.batch.topic)], True

    def take(self, items: list[Delivery], n: int) -> tuple[list[Delivery], int]:
        out = []
        for d in items:
            if n <= 0:
                break
            if d.batch.size > n:
                from eda.core import codec

                (part,), _ = codec.take([d.batch], n)
                d = d._replace(batch=part)
            out.append(d)
            n -= d.batch.size
        return out, n

    def written(self, items: list[Delivery]) -> None:
        if self.sub is not None and self.matcher is None:
            self.sub.written(items)

    def busy(self) -> contextlib.AbstractContextManager[None]:
        # a job may outlast the bus's patience (5 s): heartbeats go on from a thread
        if self.slow and self.sub is not None:
            return self.sub.busy()
        return contextlib.nullcontext()

    def report(self, final: bool = False) -> None:
        if final and self.sub is not None and self.sub.malformed:
            self.ctx.warn(f"ignored {self.sub.malformed} malformed message(s)")

    def close(self) -> None:
        self._drop()


def _warn_resumed(
    ctx: Context, name: str, patterns: list[str], at: int, old: list[str], asked: bool
) -> None:
    """A durable that already existed resumes at its position: say what was not done."""
    shown = for_terminal(name)
    if asked:
        ctx.warn(
            f"durable {shown!r} exists: resuming at seq {at}, the start asked for is ignored"
            f" (to move it: eda-sub --bus --durable {shown} --reset --from-seq N|--since T"
            "|--from-start, on the bus's host)"
        )
    if old != patterns:
        ctx.warn(
            f"durable {shown!r} had patterns {for_terminal(' '.join(old))}: now"
            f" {for_terminal(' '.join(patterns))} (resuming at seq {at})"
        )
