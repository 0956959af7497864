"""The TCP proxy's instances kept in step with the registry, for both engines.

:class:`Follower` runs :func:`eda.core.lb.tcp.follow` (the passing instances
of a service, again after every change) in a thread of its own and hands
each new set to a callback: the built-in engine's ``set_candidates``.

:class:`HaproxyFollower` is ``eda-lb tcp --engine haproxy``: the same
following, with HAProxy as the data plane.  A registry snapshot arrives one
instance at a time, so changes are applied once they pause for 20 ms (and at
least twice a second under a flood of them); HAProxy starts with the
registry's first answer (waiting up to 3 s for it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from ..errors import EdaError
from ..registry.access import Access
from . import tcp
from .haproxy import HaproxyEngine, Server

Log = Callable[[str], None]

SETTLE_PAUSE = 0.02  # changes are applied once they pause this long...
SETTLE_MAX = 0.5  # ...or after this long under a flood of them
FIRST_ANSWER = 3.0  # how long HAProxy waits for the registry's first answer to start with


def _quiet(_msg: str) -> None:
    pass


class Follower:
    """:func:`tcp.follow` in a daemon thread: *on_change(backends)* after every change.

    When there is nothing to follow (no registry known and mDNS off), the
    error is kept in :attr:`failed` and *on_fail()* is called.
    """

    def __init__(
        self,
        service: str,
        access: Access,
        on_change: Callable[[list[tcp.Backend]], None],
        on_fail: Callable[[], None],
        warn: Log = _quiet,
    ) -> None:
        self.service, self.access, self.warn = service, access, warn
        self.on_change, self.on_fail = on_change, on_fail
        self.failed: EdaError | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="eda-lb-follow", daemon=True).start()

    def _run(self) -> None:
        try:
            for backends in tcp.follow(self.service, self.access, self.warn):
                self.on_change(backends)
        except EdaError as exc:  # no registry known and mDNS off: nothing to follow
            self.failed = exc
            self.on_fail()

    def check(self) -> None:
        """Raise what stopped the following, if anything did."""
        if self.failed is not None:
            raise self.failed


class HaproxyFollower:
    """HAProxy proxying *host*:*port* to the passing instances of *service*.

    :meth:`run` starts HAProxy and applies every change until :meth:`stop`
    (which a signal handler may call); it raises :class:`EdaError` when there
    is nothing to follow or HAProxy dies.  *on_start* is called once HAProxy
    runs.
    """

    def __init__(
        self,
        service: str,
        access: Access,
        host: str,
        port: int,
        settings: tcp.Settings,
        drain_timeout: float,
        log: Log = _quiet,
        warn: Log = _quiet,
    ) -> None:
        self.service, self.host, self.port, self.settings = service, host, port, settings
        self.log = log
        self.updates: queue.Queue[list[tcp.Backend]] = queue.Queue()
        self.stopping = threading.Event()
        self.follower = Follower(service, access, self.updates.put, self._failed, warn)
        self.engine = HaproxyEngine(
            host,
            port,
            settings.strategy,
            check_interval=settings.check_interval,
            rise=settings.rise,
            fall=settings.fall,
            log=log,
            drain_timeout=drain_timeout,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout or 86400.0 * 365,
        )

    def _failed(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop (from a signal handler too): HAProxy drains, :meth:`run` returns."""
        self.stopping.set()
        self.updates.put([])  # wakes the loop

    def _newest(self, wait: float) -> list[tcp.Backend] | None:
        """The newest set once changes pause (None: no change within *wait* seconds)."""
        try:
            latest = self.updates.get(timeout=wait)
        except queue.Empty:
            return None
        settle = time.monotonic() + SETTLE_MAX
        try:
            while time.monotonic() < settle:
                latest = self.updates.get(timeout=SETTLE_PAUSE)
        except queue.Empty:
            pass
        return latest

    def _servers(self, backends: list[tcp.Backend]) -> list[Server]:
        return [Server(b.id, b.host, b.port, b.weight) for b in backends]

    def run(self, on_start: Callable[[], None] = lambda: None) -> bool:
        """Proxy until stopped; False when stopped before HAProxy even started."""
        self.follower.start()
        current = self._newest(FIRST_ANSWER) or []  # so HAProxy starts with the first answer
        self.follower.check()
        if self.stopping.is_set():
            return False
        try:
            self.engine.start(self._servers(current))
            on_start()
            while not self.stopping.is_set():
                latest = self._newest(1.0)
                if latest is None:
                    if not self.engine.alive():
                        raise EdaError("haproxy stopped unexpectedly")
                    continue
                if not self.stopping.is_set() and latest != current:
                    current = latest
                    self.engine.update(self._servers(current))
                    self.log(f"{len(current)} instance(s): {', '.join(b.id for b in current)}")
        finally:
            self.engine.stop(drain=self.stopping.is_set() and self.follower.failed is None)
        self.follower.check()
        return True
