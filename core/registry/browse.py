"""Browsing any DNS-SD service type on the LAN (what ``avahi-browse -r`` shows).

Built on :class:`eda.core.discovery.Discovery`: its zeroconf stack, and its
bounded resolver pool (a flood of names that never resolve costs
:data:`~eda.core.discovery.RESOLVER_THREADS` threads and
:data:`~eda.core.discovery.MAX_PENDING` waiting names, not a thread each).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from .. import mdns
from ..discovery import Discovery
from ..errors import UsageError
from .store import iso


def address_order(address: str) -> tuple[int, str]:
    """Sort key: IPv4 before IPv6, global before link-local and loopback."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return (9, address)
    rank = 0 if ip.version == 4 else 2
    if ip.is_link_local or ip.is_loopback:
        rank += 1
    return (rank, address)


def full_type(service_type: str) -> str:
    """``_http._tcp`` -> ``_http._tcp.local.`` (validated)."""
    name = service_type.rstrip(".")
    if not name.endswith(".local"):
        name += ".local"
    parts = name.split(".")
    if len(parts) < 3 or not parts[0].startswith("_") or parts[-2] not in ("_tcp", "_udp"):
        raise UsageError(f"bad service type {service_type!r}: use e.g. _http._tcp")
    return name + "."


def browse(service_type: str, interface: str | None = None) -> Iterator[dict[str, Any] | None]:
    """Yield ``added``/``updated``/``removed`` items as services come and go, forever.

    Yields None when idle for a tenth of a second, so the caller can stop.
    An instance is ``added`` the first time it resolves (since it appeared or
    was last removed), ``updated`` after that.
    """
    stype = full_type(service_type)
    items: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    seen: set[str] = set()  # names reported and not removed since
    lock = threading.Lock()

    def item(event: str, name: str) -> dict[str, Any]:
        return {
            "event": event,
            "name": name.removesuffix("." + stype),
            "type": stype.removesuffix(".local."),
            "domain": "local",
        }

    def resolved(inst: mdns.Instance) -> None:
        with lock:
            kind = "updated" if inst.name.lower() in seen else "added"
            seen.add(inst.name.lower())
            items.put(
                item(kind, inst.name)
                | {
                    "host": inst.target.rstrip("."),
                    "addresses": sorted(inst.addresses, key=address_order),
                    "port": inst.port,
                    "txt": inst.txt,
                    "time": iso(time.time()),
                }
            )

    def gone(name: str) -> None:
        with lock:
            seen.discard(name.lower())
            items.put(item("removed", name) | {"time": iso(time.time())})

    found = Discovery(interface)
    try:
        found.browse_instances(stype, resolved, gone)
        while True:
            try:
                yield items.get(timeout=0.1)
            except queue.Empty:
                yield None
    finally:
        found.close()
