"""The bus's clients' connections: one ROUTER socket, what came from where, hanging up.

The bus reads each message frame by frame so that it knows the TCP
connection it came from (:attr:`ClientLinks._sender`): to cut off a
subscriber that does not read (its connection closed, which frees what libzmq
queued for it), and to accept admin requests only from the bus's own host.
On a secure bus with an ACL, the key the CURVE handshake proved for that
connection says what the client may do (:meth:`ClientLinks._access`).  A
socket monitor counts connections; beyond ``max_connections`` a new one is
closed at once.  Sending never blocks: a client whose queue is full is
skipped (:meth:`ClientLinks._send` says so).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from .. import security
from ..daemon import DRAIN_LIMIT, Daemon, received
from ..sockets import parse_monitor
from .acl import Access, Acl

MAX_ACCESSES = 4096  # clients' rights remembered between two looks at the ACL and the keys


@dataclass
class Connection:
    """The TCP connection a client's requests come from (to cut it off)."""

    fd: int
    peer: Any  # getpeername() when first seen: a reused descriptor is not cut by mistake


class ClientLinks(Daemon):
    """The connections half of :class:`.server.BusServer` (see the module docstring)."""

    sock: zmq.Socket[bytes]  # the ROUTER every client talks to
    max_connections: int
    connections: set[int]  # descriptors of the TCP connections open now
    _sender: zmq.Frame | None  # a frame of the message being handled
    _own: set[str]  # this host's addresses, as last read
    _monitor: zmq.Socket[bytes]
    acl: Acl | None  # who may do what (secure mode's --acl); None: every client, everything
    _accesses: dict[str, Access]  # by proven key; emptied when the ACL or the keys may change
    _readers: dict[bytes, str]  # the proven key of each subscription (by client), with an ACL

    def _send(self, ident: bytes, frames: list[bytes], route: Sequence[bytes] = ()) -> bool:
        """Send to one client without ever blocking; False when its queue is full or it is gone.

        *route* is the rest of a REQ client's envelope (up to its empty delimiter).
        """
        try:
            self.sock.send_multipart([ident, *route, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _incoming(self) -> Iterator[list[bytes]]:
        """The messages waiting (as :func:`~eda.core.daemon.received`), each noting
        in :attr:`_sender` the frame that tells where it came from."""
        sock = self.sock
        for _ in range(DRAIN_LIMIT):
            try:
                frames = [sock.recv(zmq.NOBLOCK)]
            except zmq.Again:
                return
            if sock.getsockopt(zmq.RCVMORE):
                kind = sock.recv(copy=False)
                self._sender = kind  # the routing id frame carries no properties
                frames.append(kind.bytes)
                while sock.getsockopt(zmq.RCVMORE):
                    frames.append(sock.recv())
            yield frames
            self._sender = None

    def _connection(self, known: Connection | None) -> Connection | None:
        """The connection the message being handled came from (*known* if the same)."""
        try:
            fd = int(self._sender.get(zmq.SRCFD)) if self._sender is not None else -1
        except zmq.ZMQError:
            fd = -1
        if fd < 0:
            return known
        if known is not None and known.fd == fd:
            return known
        return Connection(fd, _peer_of(fd))

    def _access(self) -> Access:
        """What the client whose message is being handled may do (the bus has an
        ACL): the rights of the trusted name of the key its CURVE handshake proved
        (the ZAP User-Id of the frame, never a name a message claims)."""
        return self._access_for(self._sender_key())

    def _sender_key(self) -> str:
        """The key the CURVE handshake proved for the message being handled ("" if none)."""
        return security.peer_key(self._sender) if self._sender is not None else ""

    def _access_for(self, key: str) -> Access:
        """The rights of the proven *key* (Z85; "" for none: nothing), by its trusted name."""
        assert self.acl is not None
        access = self._accesses.get(key)
        if access is None:
            secure = security.active()
            name = secure.trusted.name_of(key.encode()) if secure is not None and key else None
            access = self.acl.access(name)
            if len(self._accesses) < MAX_ACCESSES:
                self._accesses[key] = access
        return access

    def _hang_up(self, conn: Connection | None) -> None:
        """Close a client's connection (libzmq frees what it queued for it)."""
        if conn is not None and conn.peer is not None and _peer_of(conn.fd) == conn.peer:
            _shutdown(conn.fd)

    def _from_own_host(self) -> bool:
        """Whether the request being handled came from this host (loopback or one of its
        addresses); a transport without addresses (ipc, inproc) is this host's."""
        if self._sender is None:
            return True
        try:
            address = str(self._sender.get("Peer-Address"))
        except zmq.ZMQError:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or str(ip) in self._own:
            return True
        self._own = _own_addresses()  # addresses change (DHCP): read again before refusing
        return str(ip) in self._own

    def _watch_connections(self) -> None:
        """Count TCP connections (socket monitor); beyond :attr:`max_connections` a new
        one is closed at once, so idle connections cannot take every descriptor."""
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        self._monitor = self.sock.get_monitor_socket(events)
        self._sockets.append(self._monitor)
        self.watch(self._monitor, "connections", self._connection_events)

    def _connection_events(self) -> None:
        for frames in received(self._monitor):
            event = parse_monitor(frames)
            if event is None:
                continue
            fd = event.value
            if event.event == zmq.EVENT_ACCEPTED:
                if len(self.connections) >= self.max_connections:
                    self.limited("connections", f"too many connections ({self.max_connections})"
                                 "; closing new ones")  # fmt: skip
                    _shutdown(fd)
                else:
                    self.connections.add(fd)
            else:
                self.connections.discard(fd)


def _peer_of(fd: int) -> Any:
    """The peer address of connected socket *fd*, or None."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.getpeername()
    except OSError:
        return None


def _shutdown(fd: int) -> None:
    """End the connection on *fd* without closing the descriptor libzmq owns."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _own_addresses() -> set[str]:
    import ifaddr

    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.add(ip.ip if isinstance(ip.ip, str) else ip.ip[0].split("%")[0])
    return found
