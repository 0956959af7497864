"""The brokers a worker serves: those given (``--broker``) and those of its service
found in the registry (or by mDNS), meta ``role=broker``, at their ``backend`` port.

A broker that moves is found again: the lookup runs every three heartbeats
(1 to 3 s) off the worker's poll loop (:class:`~eda.core.presence.Finder`),
and the worker asks :class:`BrokerFinder` for news once per heartbeat.

Secure mode: only brokers whose key is trusted and allowed to call this
worker (``--allow``) are served, each pinned to its key (:func:`.pins.usable`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..endpoint import Endpoint, valid_host
from ..presence import Finder
from ..registry import access as reg
from ..registry.model import Instance
from .pins import Ignored, usable

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def backend_endpoint(inst: Instance) -> Endpoint | None:
    """Where a broker instance takes workers (its ``backend`` meta), or None when unusable."""
    backend = inst.meta.get("backend", "")
    if not (backend.isascii() and backend.isdigit() and 0 < int(backend) < 65536):
        return None
    if inst.host == "*" or not valid_host(inst.host):
        return None
    return Endpoint(inst.host, int(backend))


class BrokerFinder:
    """Endpoints of the brokers' backends: the *explicit* ones and those *finder* finds.

    Called, it returns every endpoint to serve now, or None when nothing new
    was found since the last call (the first call always answers).
    """

    def __init__(
        self, explicit: Sequence[Endpoint], finder: Finder | None, on_ignored: Ignored | None = None
    ) -> None:
        self.explicit, self.finder, self.first = list(explicit), finder, True
        self.on_ignored = on_ignored  # secure mode: brokers found and left out, and why

    def __call__(self) -> list[str] | None:
        found = self.finder.take() if self.finder is not None else None
        if found is None:
            if not self.first:
                return None
            found = []
        self.first = False
        endpoints = [e.zmq for e in self.explicit]
        for inst in usable(found, self.on_ignored, where=backend_endpoint, callers=True):
            backend = backend_endpoint(inst)
            if backend is not None:
                endpoints.append(backend.zmq)
        return endpoints

    def close(self) -> None:
        if self.finder is not None:
            self.finder.close()


def find_brokers(
    service: str,
    access: reg.Access,
    mode: str,
    explicit: Sequence[Endpoint],
    *,
    heartbeat: float = 1.0,
    warn: Log = _quiet,
    on_ignored: Ignored | None = None,
) -> BrokerFinder | None:
    """A started :class:`BrokerFinder` for the brokers of *service* (none looked up when
    the worker's presence *mode* is ``none``), or None when there is nothing to serve."""
    finder = None
    if mode != "none":
        finder = Finder(
            service,
            access,
            lambda i: i.meta.get("role") == "broker",
            # every 3 heartbeats (1 to 3 s): a broker that moved is found as soon as the
            # old one is known dead
            every=min(3.0, max(1.0, 3 * heartbeat)),
            warn=warn,
        )
        finder.start()
    if finder is None and not explicit:
        return None
    return BrokerFinder(explicit, finder, on_ignored)
