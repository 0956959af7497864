"""How `eda-txn commit` reaches a coordinator: the one given, else the last one
found (the cache, if it still listens), else discovery (registry, mDNS)."""

from __future__ import annotations

from typing import Any

from .. import cache
from ..errors import NotFoundError, UsageError
from ..reqrep import Client, tcp_reachable
from .protocol import find_coordinators


def coordinator_client(coordinator: str | None, access: Any, timeout: float) -> Any:
    """A client of the coordinator: --coordinator, else the last one found, else discovery."""
    if coordinator:
        return Client([coordinator], timeout=timeout)
    known = [e for e in cache.cached("txn-coordinator") if tcp_reachable(e)]
    if not known:
        if access is None:
            raise UsageError("no coordinator: give --coordinator, or allow mDNS")
        known = find_coordinators(access)
        if not known:
            raise NotFoundError(
                "no coordinator found: start `eda-txn coordinator` or give --coordinator"
            )
        cache.remember("txn-coordinator", known)
    return Client(known[:1], timeout=timeout)
