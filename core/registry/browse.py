"""Browsing any DNS-SD service type on the LAN (what ``avahi-browse -r`` shows)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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


RESOLVE_THREADS = 4
MAX_PENDING = 64  # names waiting to be resolved; a flood of announcements beyond is dropped


class Resolver:
    """Resolves announced names on a few threads, with a bounded backlog.

    Anyone on the LAN can announce thousands of names that never resolve;
    they cost at most :data:`RESOLVE_THREADS` threads and :data:`MAX_PENDING`
    waiting names (the rest are counted in :attr:`dropped`), not one thread each.
    """

    def __init__(self, resolve: Callable[[str, str], None]) -> None:
        self._resolve = resolve
        self._pool = ThreadPoolExecutor(RESOLVE_THREADS, thread_name_prefix="eda-resolve")
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self.dropped = 0

    def submit(self, name: str, kind: str) -> None:
        with self._lock:
            if name in self._pending:
                return
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.add(name)
        self._pool.submit(self._run, name, kind)

    def _run(self, name: str, kind: str) -> None:
        try:
            self._resolve(name, kind)
        finally:
            with self._lock:
                self._pending.discard(name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def full_type(service_type: str) -> str:
    """``_http._tcp`` -> ``_http._tcp.local.`` (validated)."""
    name = service_type.rstrip(".")
    if not name.endswith(".local"):
        name += ".local"
    parts = name.split(".")
    if len(parts) < 3 or not parts[0].startswith("_") or parts[-2] not in ("_tcp", "_udp"):
        raise UsageError(f"bad service type {service_type!r}: use e.g. _http._tcp")
    return name + "."


def browse(
    service_type: str, interface: str | None = None, resolve_timeout: float = 3.0
) -> Iterator[dict[str, Any] | None]:
    """Yield ``added``/``updated``/``removed`` items as services come and go, forever.

    Yields None when idle for a tenth of a second, so the caller can stop.
    """
    from zeroconf import (
        InterfaceChoice,
        IPVersion,
        ServiceBrowser,
        ServiceInfo,
        ServiceStateChange,
        Zeroconf,
    )

    stype = full_type(service_type)
    items: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    zc = Zeroconf(
        interfaces=[interface] if interface else InterfaceChoice.All, ip_version=IPVersion.V4Only
    )

    def resolve(name: str, kind: str) -> None:
        info = ServiceInfo(stype, name)
        if not info.request(zc, int(resolve_timeout * 1000)):
            return
        txt = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        items.put(
            {
                "event": kind,
                "name": name.removesuffix("." + stype),
                "type": stype.removesuffix(".local."),
                "domain": "local",
                "host": (info.server or "").rstrip("."),
                "addresses": sorted(info.parsed_addresses(), key=address_order),
                "port": info.port,
                "txt": txt,
                "time": iso(time.time()),
            }
        )

    def changed(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is ServiceStateChange.Removed:
            items.put(
                {
                    "event": "removed",
                    "name": name.removesuffix("." + stype),
                    "type": stype.removesuffix(".local."),
                    "domain": "local",
                    "time": iso(time.time()),
                }
            )
            return
        kind = "added" if state_change is ServiceStateChange.Added else "updated"
        resolver.submit(name, kind)

    resolver = Resolver(resolve)
    browser = ServiceBrowser(zc, stype, handlers=[changed])
    try:
        while True:
            try:
                yield items.get(timeout=0.1)
            except queue.Empty:
                yield None
    finally:
        browser.cancel()
        resolver.close()
        zc.close()
