"""The one place ZeroMQ sockets are made: every eda socket comes from :func:`new_socket`.

It sets what every eda socket needs (linger, the message size limit, high
water marks), and applies the process's *socket policies* — functions that
configure a socket before it is used — so that a process-wide setting (secure
mode's CURVE keys, next) is added here once and reaches every socket of every
program.  :func:`connect` and :func:`bind` take a typed
:class:`~eda.core.endpoint.Endpoint` (IPv6 included: the socket's IPV6 option is
set when the endpoint needs it).

A socket made for a *long-lived link* (``liveness=LONG_LIVED``: the
connections eda keeps to a peer for the life of a program, listed in
ARCHITECTURE.md "Rules the code keeps", with why brokerless pub/sub's must not
have it) also gets ZeroMQ's own keep-alive,
:class:`Liveness`: a connection that hears nothing is dropped within seconds
and connected again with short, bounded tries, rather than held open through
a partition until TCP's retransmission back-off (which doubles up to minutes)
lets it speak again.  ``EDA_LIVENESS_SCALE`` (:data:`SCALE_ENV`) multiplies its
figures, read when a socket is made: tests shorten them so a partition longer
than the drop time costs seconds, not tens of seconds.

Plain TCP/UDP sockets (the TCP proxy's data plane, mDNS, DNS) are not ZeroMQ
sockets and are not made here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

import zmq

from .endpoint import Endpoint

Socket = zmq.Socket[bytes]
Context = zmq.Context[Socket]
Policy = Callable[[Socket, int], None]  # (socket, kind) -> None

_policies: list[Policy] = []


def add_policy(policy: Policy) -> None:
    """Apply *policy* to every socket made from now on (secure mode, tests)."""
    _policies.append(policy)


def remove_policy(policy: Policy) -> None:
    if policy in _policies:
        _policies.remove(policy)


@dataclasses.dataclass(frozen=True)
class Liveness:
    """How a long-lived link notices a silent peer and comes back after a heal (seconds).

    ZMTP heartbeats (``HEARTBEAT_IVL``/``_TIMEOUT``/``_TTL``) run in ZeroMQ's I/O
    thread, so a busy or starved program still answers them; a frozen or cut-off
    peer does not, and its connection is dropped. A connect then retries every
    *reconnect* s, doubling up to *reconnect_max* (``RECONNECT_IVL``/``_MAX``),
    and gives up on one try after *connect_timeout* (``CONNECT_TIMEOUT``): a SYN
    sent into a partition is not left to TCP's own back-off (1, 2, 4... s).
    """

    heartbeat: float  # a PING every this long
    timeout: float  # no traffic for this long after a PING: the connection is dropped
    ttl: float  # the other side is told to drop the connection after this long unheard
    connect_timeout: float
    reconnect: float
    reconnect_max: float

    @property
    def dropped_within(self) -> float:
        """A peer unheard for this long has been dropped (a PING, then the timeout)."""
        return self.heartbeat + self.timeout

    @property
    def reconnected_within(self) -> float:
        """Once the network is back, a dropped link is connected again within this long:
        the try under way times out, and the next one comes at most *reconnect_max* later."""
        return self.connect_timeout + self.reconnect_max

    def scaled(self, factor: float) -> Liveness:
        """These figures multiplied by *factor* (``EDA_LIVENESS_SCALE``, tests)."""
        if factor == 1.0:
            return self
        figures = {f.name: factor * getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **figures)

    def apply(self, sock: Socket) -> None:
        """Set these figures on *sock* (:func:`new_socket` scales them first)."""
        sock.setsockopt(zmq.HEARTBEAT_IVL, _ms(self.heartbeat))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ms(self.timeout))
        sock.setsockopt(zmq.HEARTBEAT_TTL, _ms(self.ttl))
        sock.setsockopt(zmq.CONNECT_TIMEOUT, _ms(self.connect_timeout))
        sock.setsockopt(zmq.RECONNECT_IVL, _ms(self.reconnect))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _ms(self.reconnect_max))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))  # (0 would mean "never" to ZeroMQ)


SCALE_ENV = "EDA_LIVENESS_SCALE"
SCALE_RANGE = (0.05, 10.0)  # ZMTP's TTL is carried in deciseconds, at most 6553 s


def liveness_scale() -> float:
    """``EDA_LIVENESS_SCALE``: the factor applied to every :class:`Liveness` (1 when
    unset); :class:`~eda.core.errors.ConfigError` when it is not a number in
    :data:`SCALE_RANGE`."""
    text = os.environ.get(SCALE_ENV, "").strip()
    if not text:
        return 1.0
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    low, high = SCALE_RANGE
    if not low <= factor <= high:  # (NaN too)
        from .errors import ConfigError

        raise ConfigError(f"{SCALE_ENV}={text[:40]!r}: not a number from {low:g} to {high:g}")
    return factor


# links that live as long as their process (ARCHITECTURE.md lists them): a silent peer
# is dropped within 4 s, and once the network heals it is connected again within 2 s
LONG_LIVED = Liveness(
    heartbeat=1.0, timeout=3.0, ttl=3.0, connect_timeout=1.0, reconnect=0.1, reconnect_max=1.0
)


def new_socket(
    kind: int,
    *,
    context: Context | None = None,
    linger: int = 0,
    max_message: int | None = None,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    liveness: Liveness | None = None,
) -> Socket:
    """A ZeroMQ socket of *kind* on *context* (the process-wide one by default).

    *linger* is in milliseconds (0: unsent messages are dropped at close);
    *max_message* bounds what a peer can make this socket take in one message
    (a bigger one drops the peer's connection); *liveness* (:data:`LONG_LIVED`)
    makes its connections keep themselves alive, as a long-lived link needs.
    """
    # scaled by EDA_LIVENESS_SCALE (a bad value raises here, before any socket is made)
    live = liveness.scaled(liveness_scale()) if liveness is not None else None
    ctx = context if context is not None else zmq.Context.instance()
    sock: Socket = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger)
    if max_message is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    if sndhwm is not None:
        sock.setsockopt(zmq.SNDHWM, sndhwm)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if live is not None:
        live.apply(sock)
    for policy in _policies:
        policy(sock, kind)
    return sock


def connect(sock: Socket, endpoint: Endpoint, server_key: bytes | None = None) -> str:
    """Connect *sock* to *endpoint*; the ``tcp://`` text connected to.

    A secure socket (CURVE keys set by secure mode's policy) is a CURVE client
    of the server whose public key is *server_key* (Z85); without one it is
    not connected: :class:`~eda.core.errors.UsageError` (secure mode pins
    every server's key).
    """
    if server_key is not None:
        sock.curve_serverkey = server_key
    elif sock.getsockopt(zmq.MECHANISM) == zmq.CURVE:
        from .errors import UsageError

        raise UsageError(f"secure mode: no public key known for the server at {endpoint.zmq}")
    if endpoint.is_ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    text = endpoint.zmq
    sock.connect(text)
    return text


def bind(sock: Socket, endpoint: Endpoint) -> Endpoint:
    """Bind *sock* to *endpoint* (port 0: any); the endpoint really bound.

    A secure socket is a CURVE server on this endpoint (its clients are
    admitted by secure mode's ZAP handler, :mod:`eda.core.security`).

    Raises :class:`zmq.ZMQError` as bind does; :meth:`eda.core.daemon.Daemon.bind`
    turns that into eda's errors.
    """
    if sock.getsockopt(zmq.MECHANISM) == zmq.CURVE:  # (secure mode) a CURVE server here,
        from . import security  # its clients admitted by the ZAP handler, started now

        security.serving(sock)
        sock.curve_server = True
    if endpoint.is_ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    sock.bind(endpoint.zmq)
    bound = Endpoint.from_peer(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    return bound if bound is not None else endpoint


class MonitorEvent(NamedTuple):
    """One socket monitor event: what happened, its value (fd, errno or ZAP status) and
    the endpoint it concerns."""

    event: int
    value: int
    endpoint: str


_MONITOR_HEAD = struct.Struct("=HI")  # libzmq: uint16 event, uint32 value


def parse_monitor(frames: list[bytes]) -> MonitorEvent | None:
    """A monitor socket's message as a :class:`MonitorEvent` (None if it is not one).

    Written here rather than taken from ``zmq.utils.monitor``, which imports
    ``zmq.asyncio`` and so all of asyncio: a one-shot command's start-up paid it.
    """
    if len(frames) != 2 or len(frames[0]) != _MONITOR_HEAD.size:
        return None
    event, value = _MONITOR_HEAD.unpack(frames[0])
    return MonitorEvent(event, value, frames[1].decode(errors="replace"))


def monitor_events(monitor: Socket | None) -> Iterator[MonitorEvent]:
    """The events *monitor* has received so far (none when it is None), without waiting."""
    while monitor is not None and monitor.poll(0):
        event = parse_monitor(monitor.recv_multipart())
        if event is not None:
            yield event


def stop_monitor(sock: Socket | None, monitor: Socket) -> None:
    """Stop the monitor of *sock* (None: already closed) and close *monitor* at once;
    the caller has taken *monitor* out of its poller first."""
    if sock is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
    monitor.close(0)
