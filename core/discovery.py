"""Zero-configuration discovery: DNS-SD over mDNS, plus a cache for short-lived commands.

Long-running programs (subscribers, streaming publishers) start a zeroconf
stack, announce themselves and browse continuously.  Short-lived ones ask
once (:func:`eda.core.mdns.one_shot_query`), helped by a cache of the names
that answered last time: when all of them answer again the query ends early.
The cache only shortens the wait; it is never used in place of asking, so a
peer that is up is never missed because of it.

Service types are standard DNS-SD, so ``avahi-browse -r _eda-sub._tcp``
shows them.  TXT keys: ``id`` (peer id), ``p`` (space-separated patterns, or
the topic for a publisher), ``v`` (wire version).
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import codec, mdns
from .cache import cached, remember
from .errors import UsageError

SUB_TYPE = "_eda-sub._tcp.local."
PUB_TYPE = "_eda-pub._tcp.local."
TXT_LIMIT = 200  # RFC 6763 6.2: keep each TXT string well under 255 bytes


@dataclass(frozen=True)
class Peer:
    """A discovered eda process: its id, where to connect and what it carries."""

    id: str
    endpoint: str
    patterns: tuple[str, ...]
    name: str


def resolve_interface(value: str | None) -> str | None:
    """Map an interface name or IPv4 address to the IPv4 address to use."""
    if not value:
        return None
    with contextlib.suppress(OSError):
        socket.inet_aton(value)
        return value
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", value.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])  # SIOCGIFADDR
    except OSError:
        raise UsageError(f"no IPv4 address on interface {value!r}") from None
    finally:
        sock.close()


def _peer_from_instance(inst: mdns.Instance) -> Peer | None:
    peer_id = inst.txt.get("id")
    address = inst.best_address()
    if not peer_id or not address or not inst.port:
        return None
    patterns = tuple(inst.txt.get("p", "").split())
    return Peer(peer_id, f"tcp://{address}:{inst.port}", patterns, inst.name)


def find_once(
    service_type: str, *, interface: str | None = None, timeout: float = 0.15
) -> list[Peer]:
    """Peers of *service_type* answering a one-shot query right now."""
    expected = set(cached(service_type))
    found = mdns.one_shot_query(service_type, interface=interface, timeout=timeout, expect=expected)
    peers = [p for p in map(_peer_from_instance, found) if p is not None]
    remember(service_type, sorted(p.name for p in peers))
    return peers


def txt_patterns(patterns: list[str]) -> str:
    """Patterns for a TXT record, cut to the RFC 6763 size advice."""
    text = " ".join(patterns)
    return text if len(text) <= TXT_LIMIT else text[:TXT_LIMIT].rsplit(" ", 1)[0]


class Discovery:
    """One zeroconf stack per process: announce this process, browse for peers."""

    def __init__(self, interface: str | None = None) -> None:
        from zeroconf import InterfaceChoice, IPVersion, Zeroconf

        self._interface = interface
        self._zc = Zeroconf(
            interfaces=[interface] if interface else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        self._infos: list[Any] = []
        self._browsers: list[Any] = []
        self._closed = False

    def _addresses(self) -> list[bytes]:
        if self._interface:
            return [socket.inet_aton(self._interface)]
        import ifaddr

        found = [
            ip.ip
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if isinstance(ip.ip, str)
        ]
        return [socket.inet_aton(a) for a in found] or [socket.inet_aton("127.0.0.1")]

    def announce(
        self,
        service_type: str,
        peer_id: str,
        port: int,
        patterns: list[str],
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Register this process under *service_type*; probing runs in the background."""
        from zeroconf import ServiceInfo

        kind = service_type.split(".")[0].lstrip("_")
        host = socket.gethostname().split(".")[0] or "eda"
        info = ServiceInfo(
            service_type,
            f"{kind}-{host}-{peer_id}.{service_type}",
            port=port,
            addresses=self._addresses(),
            properties={"id": peer_id, "p": txt_patterns(patterns), "v": str(codec.VERSION)},
            server=f"{host}-{peer_id}.local.",
        )
        self._infos.append(info)

        def register() -> None:
            with contextlib.suppress(Exception):
                self._zc.register_service(info, allow_name_change=True)
                if on_ready is not None:
                    on_ready()

        threading.Thread(target=register, name="eda-announce", daemon=True).start()

    def browse(self, service_type: str, on_peer: Callable[[Peer], None]) -> None:
        """Call *on_peer* (from zeroconf's thread) for each peer that appears."""
        from zeroconf import ServiceBrowser, ServiceStateChange

        def changed(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if state_change is ServiceStateChange.Removed:
                return
            threading.Thread(
                target=self._resolve, args=(service_type, name, on_peer), daemon=True
            ).start()

        self._browsers.append(ServiceBrowser(self._zc, service_type, handlers=[changed]))

    def _resolve(self, service_type: str, name: str, on_peer: Callable[[Peer], None]) -> None:
        from zeroconf import ServiceInfo

        info = ServiceInfo(service_type, name)
        if self._closed or not info.request(self._zc, 3000):
            return
        txt = {
            k.decode(errors="replace").lower(): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        inst = mdns.Instance(name, info.port or 0, info.server or "", info.parsed_addresses(), txt)
        peer = _peer_from_instance(inst)
        if peer is not None and not self._closed:
            on_peer(peer)

    def close(self) -> None:
        """Withdraw announcements (goodbye packets) and stop browsing."""
        self._closed = True
        for browser in self._browsers:
            with contextlib.suppress(Exception):
                browser.cancel()
        with contextlib.suppress(Exception):
            self._zc.close()
