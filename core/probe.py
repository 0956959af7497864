"""Is a ZeroMQ peer listening there?  A TCP connect and the first byte of the ZMTP
greeting, for many endpoints at once and bounded in time (used by discovery before
anyone connects to an announced endpoint, and by clients to pass over a dead cached
server)."""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Iterable

from .endpoint import Endpoint

__all__ = [
    "MAX_PROBES",
    "PROBE_TIMEOUT",
    "QUICK_PROBE_TIMEOUT",
    "ZMTP_SIGNATURE_START",
    "probe",
    "probeable",
]

PROBE_TIMEOUT = 0.25  # a TCP connect and a ZMTP greeting on a LAN take a millisecond
QUICK_PROBE_TIMEOUT = 0.05  # for an endpoint that was silent a moment ago
ZMTP_SIGNATURE_START = b"\xff"  # ZMTP 3 (RFC 23): every greeting starts with this byte
MAX_PROBES = 64  # endpoints probed at once


def probeable(endpoint: str) -> Endpoint | None:
    """*endpoint* (``tcp://HOST:PORT``) if it can be probed: a numeric address,
    IPv4 or IPv6 (a name to resolve could block)."""
    where = Endpoint.from_peer(endpoint) if endpoint.startswith("tcp://") else None
    return where if where is not None and where.is_literal else None


def probe(
    endpoints: Iterable[str],
    timeout: float = PROBE_TIMEOUT,
    quick: Iterable[str] = (),
    quick_timeout: float = QUICK_PROBE_TIMEOUT,
) -> dict[str, bool | None]:
    """Check that a ZeroMQ peer listens at each endpoint, all at once.

    True: it accepted a TCP connection and sent the first byte of a ZMTP
    greeting (libzmq sends it at once, even when the program is busy).
    False: refused, unreachable, closed, or not ZMTP.  None: no answer in
    time (a stalled process, a lost packet, or a port that is not eda's).
    Takes at most *timeout* seconds however many endpoints there are (at
    most :data:`MAX_PROBES`; the rest are reported None); the *quick* ones
    (silent last time) get only *quick_timeout*.
    """
    result: dict[str, bool | None] = {}
    hurried = set(quick)
    connecting: dict[socket.socket, str] = {}
    greeting: dict[socket.socket, str] = {}
    try:
        for endpoint in dict.fromkeys(endpoints):
            where = probeable(endpoint)
            if where is None:
                result[endpoint] = False
                continue
            if len(connecting) >= MAX_PROBES:
                result[endpoint] = None
                continue
            sock = socket.socket(
                socket.AF_INET6 if where.is_ipv6 else socket.AF_INET, socket.SOCK_STREAM
            )
            sock.setblocking(False)
            code = sock.connect_ex(where.sockaddr)
            if code in (0, errno.EINPROGRESS):
                connecting[sock] = endpoint
            else:
                sock.close()
                result[endpoint] = False
        start = time.monotonic()
        deadline, quick_deadline = start + timeout, start + min(timeout, quick_timeout)
        while connecting or greeting:
            now = time.monotonic()
            if now >= quick_deadline:  # give up on the hurried ones
                for pending in (connecting, greeting):
                    for sock in [k for k, e in pending.items() if e in hurried]:
                        result[pending.pop(sock)] = None
                        sock.close()
                if not (connecting or greeting):
                    break
            left = (deadline if now >= quick_deadline else quick_deadline) - now
            if now >= deadline:
                break
            readable, writable = _wait(greeting, connecting, left)
            for sock in writable:
                endpoint = connecting.pop(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    greeting[sock] = endpoint
                else:
                    result[endpoint] = False
                    sock.close()
            for sock in readable:
                try:
                    first = sock.recv(1)
                except OSError:
                    first = b""
                result[greeting.pop(sock)] = first == ZMTP_SIGNATURE_START
                sock.close()
    finally:
        for sock, endpoint in [*connecting.items(), *greeting.items()]:
            result[endpoint] = None
            sock.close()
    return result


def _wait(
    readers: Iterable[socket.socket], writers: Iterable[socket.socket], timeout: float
) -> tuple[list[socket.socket], list[socket.socket]]:
    """The *readers* readable and *writers* writable (or failed: the caller reads
    SO_ERROR) within *timeout* seconds.

    poll(), not select(): a busy process (a publisher with many subscribers)
    holds descriptors numbered beyond select()'s 1024.
    """
    poller = select.poll()
    watched: dict[int, tuple[socket.socket, bool]] = {}
    for sock in readers:
        poller.register(sock, select.POLLIN)
        watched[sock.fileno()] = (sock, False)
    for sock in writers:
        poller.register(sock, select.POLLOUT)
        watched[sock.fileno()] = (sock, True)
    readable: list[socket.socket] = []
    writable: list[socket.socket] = []
    for fd, _events in poller.poll(max(0.0, timeout) * 1000):
        sock, writer = watched[fd]
        (writable if writer else readable).append(sock)
    return readable, writable
