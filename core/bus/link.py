"""Reaching eda-bus: where it is, the socket to it, looking again when it moved, requests.

Where the bus is, and the one-shot requests (stats, retain, drop), are
:class:`BusClient`'s: :class:`eda.core.reqrep.Client` (given, else cached
with a TCP probe, else mDNS) with the bus protocol's framing.  The publisher
(:mod:`.publisher`) and the subscriber (:mod:`.subscriber`) talk to the bus
on one DEALER socket each (:func:`dealer`), and find it again with
:func:`moved` when it stops answering.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import reqrep, security
from ..endpoint import Endpoint
from ..errors import EdaError, ExitStatus, NotFoundError, UsageError
from ..reqrep import client_endpoint
from ..sockets import connect, new_socket, parse_monitor, stop_monitor
from . import protocol as p

LOOK_AGAIN_AFTER = 2.0  # s without an answer: look for the bus again (it may have moved)


class NoBus(NotFoundError):
    """No bus is known: none given, none cached, none answering mDNS (exit 3: not found)."""


class ConfirmTimeout(EdaError):
    """The bus did not confirm every batch in time."""

    exit_code = ExitStatus.TIMEOUT


class BusClient(reqrep.Client):
    """Where the bus is (``--bus``, else ``EDA_BUS``, else the cached one, else
    mDNS), and its requests (stats, retain, drop) with :class:`reqrep.Client`'s
    round trip, framed as the bus protocol says (kind ``R``, answer ``A``)."""

    what = "bus"
    cache_key = p.CACHE_KEY
    service_type = p.BUS_TYPE
    request_frames = (p.REQUEST,)
    reply_frames = (p.ANSWER,)

    def none_found(self) -> EdaError:
        return NoBus("no bus found; start one with 'eda-bus serve' or give --bus tcp://HOST:PORT")

    def none_answered(self, tried: set[Endpoint]) -> EdaError:
        where = reqrep.listed(tried, limit=3)
        return ConfirmTimeout(f"the bus at {where} did not answer within {self.timeout:g}s")


def find_bus(
    endpoint: Endpoint | str | None = None,
    *,
    interface: str | None = None,
    use_mdns: bool = True,
    timeout: float = 0.3,
    on_ignored: Callable[[Any, str], None] | None = None,
) -> Endpoint:
    """The bus to use: *endpoint*, else ``EDA_BUS``, else the cached one, else mDNS.

    Secure mode: its key is pinned (:func:`reqrep.pinned_key`); *on_ignored* is told
    of announced buses skipped (untrusted key, or not secure), as (peer, why)."""
    explicit = endpoint or os.environ.get(p.ENV_BUS) or None
    client = BusClient([explicit] if explicit else [], use_mdns=use_mdns, interface=interface,
                       discover_timeout=timeout)  # fmt: skip
    client.on_ignored = on_ignored
    if client.explicit:
        return client.explicit[0]  # given: used as it is, even when it is down now
    return client.find()


REFUSAL_WAIT = 1.0  # s: secure mode waits this long at most for the bus to take this key


def dealer(endpoint: Endpoint) -> zmq.Socket[bytes]:
    """The publisher's or subscriber's socket to the bus at *endpoint*.

    Secure mode: connected with the bus's pinned key (:func:`reqrep.pinned_key`),
    and a bus that refuses this program's key is :class:`reqrep.Refused` at once
    (the handshake is awaited for :data:`REFUSAL_WAIT` at most; a bus that is
    down is not an error here, as without secure mode)."""
    sock, mon = watched_dealer(endpoint)
    if mon is not None:
        stop_monitor(sock, mon)
    return sock


def watched_dealer(endpoint: Endpoint) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes] | None]:
    """:func:`dealer`, and in secure mode the monitor of its handshakes, still open: a
    refusal later than :data:`REFUSAL_WAIT` (a loaded machine) is read from it with
    :func:`check_refused` for as long as the caller waits on the bus."""
    sock = new_socket(zmq.DEALER, sndhwm=1000, rcvhwm=0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if security.active() is None:
        connect(sock, endpoint)
        return sock, None
    mon = sock.get_monitor_socket(security.FAILURE_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        connect(sock, endpoint, reqrep.pinned_key(endpoint))
        why = _handshake(mon)
    except BaseException:
        stop_monitor(sock, mon)
        sock.close()
        raise
    if why is not None:
        stop_monitor(sock, mon)
        sock.close()
        raise refused(endpoint, why)
    return sock, mon


def refused(endpoint: Endpoint, why: str) -> reqrep.Refused:
    """The one-line refusal of a bus that did not take this program's key."""
    key = security.active().public_key  # type: ignore[union-attr]
    return reqrep.Refused(f"the bus at {endpoint.zmq} {why} (eda-keys show: {key})")


def check_refused(mon: zmq.Socket[bytes] | None, endpoint: Endpoint) -> None:
    """:class:`reqrep.Refused` if *mon* (of :func:`watched_dealer`) saw the bus at
    *endpoint* refuse this program's key since last asked (never waits)."""
    why = reqrep.handshake_refusal(mon)
    if why is not None:
        raise refused(endpoint, why)


def _handshake(mon: zmq.Socket[bytes]) -> str | None:
    """Why the handshake watched by *mon* failed, or None (it succeeded, or the bus did
    not answer within :data:`REFUSAL_WAIT`)."""
    deadline = time.monotonic() + REFUSAL_WAIT
    while (left := deadline - time.monotonic()) > 0 and mon.poll(int(left * 1000) + 1):
        event = parse_monitor(mon.recv_multipart())
        if event is None:
            continue
        if event.event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return None
        why = security.handshake_failure(event.event, event.value)
        if why is not None:
            return why
    return None


Relocate = Callable[[], Endpoint | str]


def moved(relocate: Relocate, endpoint: Endpoint) -> Endpoint | None:
    """Where *relocate* finds the bus now, if not at *endpoint* (None: it did not
    move, or none is found now)."""
    try:
        found = client_endpoint(relocate(), "bus")
    except EdaError:
        return None
    return None if found == endpoint else found


def request(endpoint: Endpoint | str, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to a bus (stats, retain, purge, drop): its reply, or an error."""
    client = BusClient([endpoint], timeout=timeout)
    try:
        return client.request(msg)
    except (reqrep.RemoteError, NotFoundError) as exc:  # a refusal is exit 1, as it always was
        if exc.exit_code == ExitStatus.USAGE:  # what the bus cannot do at all (purge on NATS)
            raise UsageError(str(exc)) from None
        raise EdaError(str(exc)) from None
    finally:
        client.close()
