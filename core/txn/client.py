"""Finding the 2PC coordinator to ask: ``--coordinator``, else the last one that
answered, else the registry or mDNS (:func:`.protocol.find_coordinators`).

The finding, caching and round trip are :class:`eda.core.reqrep.Client`'s;
this module says only where coordinators are.  A commit is not idempotent:
after a timeout the outcome is unknown, so it is never sent to a second
coordinator (:attr:`failover` is off); a coordinator remembered or found that
refuses connections is passed over before anything is sent.  Secure mode:
the coordinator's key is pinned as the client base does it (``--coordinator
NAME@tcp://...``, the cache, a trusted registry record or announcement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import reqrep
from ..endpoint import Endpoint
from ..errors import EdaError, NotFoundError, UsageError

CACHE_KEY = "txn-coordinator"  # in the shared discovery cache


class CoordinatorClient(reqrep.Client):
    """Requests to a coordinator, found as the module docstring says.

    *access* is the registry access of the command (None: neither a registry
    nor mDNS may be asked, so only *coordinator* or the cache can name one).
    """

    what = "coordinator"
    cache_key = CACHE_KEY
    failover = False

    def __init__(self, coordinator: Endpoint | str | None, access: Any, timeout: float) -> None:
        super().__init__([coordinator] if coordinator else [], timeout=timeout)
        self.access = access
        self.on_skipped: Callable[[str], None] | None = None  # an announcement left out

    def discover(self) -> list[Endpoint]:
        from .directory import find_coordinators

        if self.access is None:
            return []
        endpoints = find_coordinators(self.access, None, self.on_ignored, self.on_skipped)
        found = (Endpoint.from_peer(e) for e in endpoints)
        return [e for e in found if e is not None]

    def none_found(self) -> EdaError:
        if self.access is None:
            return UsageError("no coordinator: give --coordinator, or allow mDNS")
        return NotFoundError(
            "no coordinator found: start `eda-txn coordinator` or give --coordinator"
        )
