"""Talking to registries: finding one, asking it, and failing over to another.

Where the registry is, in order: endpoints given explicitly (``--registry``
or ``EDA_REGISTRY``); else the endpoints that answered last time (a cache
file, checked with one TCP connect before use, so a dead entry costs a
millisecond, not a timeout); else a one-shot mDNS query for
``_eda-registry._tcp``.  Every registry that answers ``hello`` also names
its live peers, which become failover candidates: when a request gets no
answer in time the client moves on to the next registry by itself.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import zmq

from ..cache import cached, remember
from ..errors import EdaError, UsageError
from . import protocol
from .model import InvalidRecord, validate_registry_id
from .protocol import decode, encode, raise_for


class NoRegistry(EdaError):
    """No registry is known: none given, none cached, none answering mDNS."""


class RegistryUnavailable(EdaError):
    """Registries are known but none of them answered in time."""


CACHE_KEY = "registry-endpoints"  # in the shared discovery cache
MAX_LEARNED = 32  # failover candidates learned from registries' hellos
MAX_ANNOUNCED = 8  # registries found by mDNS that one request tries


def check_endpoint(endpoint: str) -> str:
    """*endpoint* if it looks like tcp://HOST:PORT, else :class:`UsageError`."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if (
        not endpoint.startswith("tcp://")
        or not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port[:6]) < 65536
        or len(endpoint) > 300
        or not endpoint.isprintable()
    ):
        raise UsageError(f"bad registry endpoint {endpoint!r}: use tcp://HOST:PORT")
    return endpoint


def _tcp_reachable(endpoint: str, timeout: float = 0.2) -> bool:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


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


class Client:
    """Requests to a registry, moving to another one when it stops answering."""

    def __init__(
        self,
        endpoints: list[str] | tuple[str, ...] = (),
        *,
        interface: str | None = None,
        use_mdns: bool = True,
        timeout: float = 1.0,
        discover_timeout: float = 0.15,
    ) -> None:
        self.explicit = [check_endpoint(e) for e in endpoints]
        self.interface = interface
        self.use_mdns = use_mdns
        self.timeout = timeout
        self.discover_timeout = discover_timeout
        self.learned: list[str] = []  # peers named by registries that answered
        self.current: str | None = None
        self.registry_id = ""
        self._zctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)

    # -- choosing a registry --------------------------------------------------------
    def _candidates(self, tried: set[str]) -> Any:
        """Endpoints to try next, lazily (mDNS is asked only when the rest failed)."""
        yield from (e for e in self.explicit if e not in tried)
        yield from (e for e in self.learned if e not in tried)
        if self.explicit:
            return
        for endpoint in cached(CACHE_KEY):
            if endpoint not in tried and _tcp_reachable(endpoint):
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
                if _tcp_reachable(endpoint):
                    yield endpoint

    def _connect(self, endpoint: str) -> None:
        self.disconnect()
        if self._zctx is None:
            self._zctx = zmq.Context()
        sock: zmq.Socket[bytes] = self._zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()  # an open socket would make close() wait forever in term()
            raise UsageError(f"bad registry endpoint {endpoint!r}: {exc}") from None
        self._sock, self.current = sock, endpoint
        self.registry_id = ""  # learned again by hello()

    def disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self.current = None, None

    # -- requests ----------------------------------------------------------------------
    def request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send *msg* to a registry and return its reply, failing over as needed."""
        tried: set[str] = set()
        candidates = None
        while True:
            if self._sock is None:
                if candidates is None:
                    candidates = self._candidates(tried)
                endpoint = next(candidates, None)
                if endpoint is None:
                    if tried:
                        raise RegistryUnavailable(
                            f"no registry answered (tried {', '.join(sorted(tried))})"
                        )
                    raise NoRegistry(
                        "no registry found; start one with 'eda-registry serve' or give --registry"
                    )
                self._connect(endpoint)
            assert self.current is not None
            reply = self._roundtrip(msg, self.timeout if timeout is None else timeout)
            if reply is not None:
                if not self.explicit:
                    known = [self.current, *[e for e in self.learned if e != self.current]]
                    remember(CACHE_KEY, known)
                return raise_for(reply)
            tried.add(self.current)
            self.disconnect()

    def _roundtrip(self, msg: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        assert self._sock is not None
        rid = next(self._rids)
        self._sock.send(encode({**msg, "rid": rid}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                return None
            try:
                reply = decode(self._sock.recv())
            except protocol.ProtocolError:
                continue
            if reply.get("rid") == rid:
                return reply

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

    def close(self) -> None:
        self.disconnect()
        if self._zctx is not None:
            self._zctx.term()
            self._zctx = None
