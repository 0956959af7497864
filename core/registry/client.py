"""Talking to registries: finding one, asking it, and failing over to another.

Where the registry is, in order: endpoints given explicitly (``--registry``
or ``EDA_REGISTRY``); else the endpoints that answered last time (a cache
file, checked with one TCP connect before use, so a dead entry costs a
millisecond, not a timeout); else a one-shot mDNS query for
``_eda-registry._tcp``.  Every registry that answers ``hello`` also names
its live peers, which become failover candidates: when a request gets no
answer in time the client moves on to the next registry by itself.

Request ids, timeouts and the failover loop are :class:`eda.core.reqrep.Client`'s;
this module says where registries are and what a registry's hello means.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from .. import reqrep
from ..cache import cached, remember
from ..errors import EdaError, UsageError
from ..reqrep import tcp_reachable as _tcp_reachable
from . import protocol
from .model import InvalidRecord, validate_registry_id


class NoRegistry(reqrep.NoServer):
    """No registry is known: none given, none cached, none answering mDNS."""


class RegistryUnavailable(reqrep.Unavailable):
    """Registries are known but none of them answered in time."""


CACHE_KEY = "registry-endpoints"  # in the shared discovery cache
MAX_LEARNED = 32  # failover candidates learned from registries' hellos
MAX_ANNOUNCED = 8  # registries found by mDNS that one request tries


def check_endpoint(endpoint: str) -> str:
    """*endpoint* if it looks like tcp://HOST:PORT, else :class:`UsageError`."""
    return reqrep.check_endpoint(endpoint, "registry")


def local_address_towards(endpoint: str) -> str:
    """The local IPv4 address this host uses to reach *endpoint* (no packet is sent)."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((socket.gethostbyname(host), 9))
        return str(sock.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        sock.close()


class Client(reqrep.Client):
    """Requests to a registry, moving to another one when it stops answering."""

    what = "registry"

    def __init__(
        self,
        endpoints: list[str] | tuple[str, ...] = (),
        *,
        interface: str | None = None,
        use_mdns: bool = True,
        timeout: float = 1.0,
        discover_timeout: float = 0.15,
    ) -> None:
        super().__init__(endpoints, timeout=timeout)
        self.interface = interface
        self.use_mdns = use_mdns
        self.discover_timeout = discover_timeout
        self.learned: list[str] = []  # peers named by registries that answered
        # registries known from the cache or mDNS that refused a TCP connect: a
        # registry that is down, which must not pass for an empty one
        self.unreachable: list[str] = []
        self.registry_id = ""

    # -- choosing a registry --------------------------------------------------------
    def candidates(self, tried: set[str]) -> Iterator[str]:
        """Endpoints to try next, lazily (mDNS is asked only when the rest failed)."""
        yield from (e for e in self.explicit if e not in tried)
        yield from (e for e in self.learned if e not in tried)
        if self.explicit:
            return
        for endpoint in cached(CACHE_KEY):
            if endpoint not in tried and self._reachable(endpoint):
                yield endpoint
        if self.use_mdns:
            from ..discovery import find_once

            peers = find_once(
                protocol.REGISTRY_TYPE, interface=self.interface, timeout=self.discover_timeout
            )
            # anyone can announce a registry: one that does not even accept a TCP
            # connection costs a refused connect (or 0.2 s), not a request timeout,
            # and at most MAX_ANNOUNCED of them are tried
            announced = [p.endpoint for p in peers if p.endpoint not in tried]
            for endpoint in announced[:MAX_ANNOUNCED]:
                if self._reachable(endpoint):
                    yield endpoint

    def _reachable(self, endpoint: str) -> bool:
        """Whether *endpoint* accepts a TCP connection (else noted in :attr:`unreachable`)."""
        if _tcp_reachable(endpoint):
            return True
        if endpoint not in self.unreachable:
            self.unreachable.append(endpoint)
        return False

    def connect(self, endpoint: str) -> None:
        super().connect(endpoint)
        self.registry_id = ""  # learned again by hello()

    def answered(self) -> None:
        """Cache the registry that answered (first) and the peers it named."""
        if not self.explicit and self.current is not None:
            known = [self.current, *[e for e in self.learned if e != self.current]]
            remember(CACHE_KEY, known)

    def none_found(self) -> EdaError:
        if self.unreachable:
            return NoRegistry(f"{self.down_message()}; start it or give --registry")
        return NoRegistry(
            "no registry found; start one with 'eda-registry serve' or give --registry"
        )

    def down_message(self) -> str:
        """What :attr:`unreachable` means, in words: the registries seen before are down."""
        listed = ", ".join(self.unreachable[:3]) + (", ..." if len(self.unreachable) > 3 else "")
        return f"the registry seen before ({listed}) does not answer: it refuses connections"

    def none_answered(self, tried: set[str]) -> EdaError:
        return RegistryUnavailable(f"no registry answered (tried {', '.join(sorted(tried))})")

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
        for endpoint in peers if isinstance(peers, list) else []:
            if len(self.learned) >= MAX_LEARNED:
                break
            if isinstance(endpoint, str) and endpoint not in self.learned:
                try:
                    self.learned.append(check_endpoint(endpoint))
                except UsageError:
                    continue
        return reply

    def pub_endpoint(self, reply: dict[str, Any]) -> str:
        """The change stream's endpoint from a hello reply."""
        assert self.current is not None
        port = reply.get("pub_port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise protocol.RemoteError("the registry sent a malformed hello (pub_port)")
        return f"{self.current.rsplit(':', 1)[0]}:{port}"
