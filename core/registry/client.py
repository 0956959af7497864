"""Talking to registries: where they are, and what a registry's hello means.

Where the registry is, in order: endpoints given explicitly (``--registry``
or ``EDA_REGISTRY``); else the endpoints that answered last time (a cache
file, checked with one TCP connect before use, so a dead entry costs a
millisecond, not a timeout); else a one-shot mDNS query for
``_eda-registry._tcp``.  Every registry that answers ``hello`` also names
its live peers, which become failover candidates: when a request gets no
answer in time the client moves on to the next registry by itself.

Finding, request ids, timeouts and the failover loop are
:class:`eda.core.reqrep.Client`'s; this module says where registries are
and what a registry's hello means.  Secure mode is the client base's too:
each registry is used under its pinned, trusted key (announced, cached, or
given as ``NAME@tcp://HOST:PORT``), and a hello names the peers with their
keys (``KEY@tcp://HOST:PORT``, :func:`named_peer`).
"""

from __future__ import annotations

import socket
from typing import Any

from .. import reqrep
from ..endpoint import Endpoint
from ..errors import EdaError
from . import protocol
from .model import InvalidRecord, validate_registry_id


class NoRegistry(reqrep.NoServer):
    """No registry is known: none given, none cached, none answering mDNS."""


class RegistryUnavailable(reqrep.Unavailable):
    """Registries are known but none of them answered in time."""


CACHE_KEY = "registry-endpoints"  # in the shared discovery cache
MAX_LEARNED = 32  # failover candidates learned from registries' hellos


def local_address_towards(endpoint: Endpoint) -> str:
    """The local address this host uses to reach *endpoint* (no packet is sent)."""
    family = socket.AF_INET6 if endpoint.is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        host = endpoint.host if endpoint.is_literal else socket.gethostbyname(endpoint.host)
        sock.connect((host, 9))
        return str(sock.getsockname()[0])
    except OSError:
        return "::1" if endpoint.is_ipv6 else "127.0.0.1"
    finally:
        sock.close()


def named_peer(text: object) -> Endpoint | None:
    """A registry a registry's hello names (``tcp://HOST:PORT``; secure mode:
    ``KEY@tcp://HOST:PORT``, the key trusted here, then pinned), or None: malformed,
    or one this process may not use (secure and plain never mix)."""
    return reqrep.from_cache_entry(text) if isinstance(text, str) else None


class Client(reqrep.Client):
    """Requests to a registry, moving to another one when it stops answering."""

    what = "registry"
    cache_key = CACHE_KEY
    service_type = protocol.REGISTRY_TYPE

    def __init__(
        self,
        endpoints: list[str] | tuple[str, ...] = (),
        *,
        interface: str | None = None,
        use_mdns: bool = True,
        timeout: float = 1.0,
        discover_timeout: float = 0.15,
    ) -> None:
        super().__init__(endpoints, timeout=timeout, use_mdns=use_mdns, interface=interface,
                         discover_timeout=discover_timeout)  # fmt: skip
        self.registry_id = ""

    def connect(self, endpoint: Endpoint) -> None:
        super().connect(endpoint)
        self.registry_id = ""  # learned again by hello()

    def none_found(self) -> EdaError:
        if self.unreachable:
            return NoRegistry(f"{self.down_message()}; start it or give --registry")
        return NoRegistry(
            "no registry found; start one with 'eda-registry serve' or give --registry"
        )

    def down_message(self) -> str:
        """What :attr:`unreachable` means, in words: the registries seen before are down."""
        listed = ", ".join(e.zmq for e in self.unreachable[:3])
        more = ", ..." if len(self.unreachable) > 3 else ""
        return f"the registry seen before ({listed}{more}) does not answer: it refuses connections"

    def none_answered(self, tried: set[Endpoint]) -> EdaError:
        return RegistryUnavailable(f"no registry answered (tried {reqrep.listed(tried)})")

    def hello(self) -> dict[str, Any]:
        """Greet the registry; remember its id and the peers it names for failover.

        The reply is checked: a registry id, a change-stream port and at most
        :data:`MAX_LEARNED` well-formed peer endpoints (the rest are ignored).
        """
        reply = self.request({"op": "hello"})
        try:
            self.registry_id = validate_registry_id(reply.get("registry", ""))
        except InvalidRecord:
            raise protocol.RemoteError("the registry sent a malformed hello") from None
        peers = reply.get("peers", [])
        for text in peers if isinstance(peers, list) else []:
            if len(self.learned) >= MAX_LEARNED:
                break
            endpoint = named_peer(text)
            if endpoint is not None and endpoint not in self.learned:
                self.learned.append(endpoint)
        return reply

    def pub_endpoint(self, reply: dict[str, Any]) -> Endpoint:
        """The change stream's endpoint from a hello reply."""
        assert self.current is not None
        port = reply.get("pub_port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise protocol.RemoteError("the registry sent a malformed hello (pub_port)")
        return self.current.with_port(port)
