"""eda-lb's figures: what a broker's ``T`` answer carries, and asking instances for theirs.

A broker answers S with :func:`broker_figures` (its totals and one entry per
worker); a worker answers with its own (core/lb/worker.py).  Latency
percentiles are core/measure.py's, the same definition everywhere.
:func:`ask_stats` sends S to many endpoints at once (``eda-lb stats``); in secure
mode each with the key pinned for its endpoint (:mod:`.pins`), and an
instance refusing this key is told at once, not waited for.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import zmq

from .. import security
from ..daemon import received
from ..endpoint import Endpoint
from ..errors import UsageError
from ..measure import latency_ms
from ..reqrep import handshake_refusal, pinned_key
from ..sockets import connect, new_socket
from .protocol import STATS, STATS_QUERY, TAG

if TYPE_CHECKING:
    from .broker import Broker

MAX_LISTED = 2000  # workers listed in a T answer (about 200 bytes each)


def broker_figures(broker: Broker) -> dict[str, Any]:
    """What S answers: the broker's totals and one entry per worker (dead ones too)."""
    now = time.monotonic()
    workers = broker.members
    instances = [
        {
            "id": w.id,
            "state": workers.state(w, now),
            "requests": w.requests,
            "errors": w.errors,
            "inflight": len(w.inflight),
            "concurrency": w.concurrency,
            "weight": w.backend.weight,
            "latency_ms": latency_ms(w.latencies),
        }
        for w in [*workers.by_ident.values(), *workers.dead][:MAX_LISTED]
    ]
    return {
        "role": "broker",
        "service": broker.settings.service,
        "id": broker.id,
        "strategy": broker.settings.strategy,
        "requests": broker.requests,
        "answered": broker.answered,
        "errors": broker.errors,
        "refused": broker.refused,
        "retried": broker.retried,
        "expired": broker.expired,
        "inflight": broker.inflight,
        "queued": len(broker.queue),
        "queued_bytes": broker.queue.bytes,
        "unread_bytes": broker.outbox.bytes,  # replies waiting for callers that do not read
        "unsent": broker.outbox.refused + broker.outbox.lost,  # replies over a bound, or lost
        "malformed": broker.malformed,
        "workers": len(broker.workers),
        "instances": instances,
    }


# -- asking for figures ------------------------------------------------------------------------
MAX_STATS = 1 << 20  # bytes of one T answer
ASK_AT_ONCE = 256  # instances asked at once (each costs a socket; ZeroMQ allows ~1000)


Refusal = Callable[[str, str], None]  # (endpoint, why): an instance refused this key


def ask_stats(
    endpoints: Iterable[str],
    timeout: float = 2.0,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    on_refused: Refusal | None = None,
) -> dict[str, dict[str, Any] | str]:
    """Send S to each endpoint, :data:`ASK_AT_ONCE` at a time, each batch waiting
    *timeout* at most; each one's T object, or why there is none.

    An answer that is not a JSON object (or too large, or not a T) is an
    error string for that endpoint, never an exception.  Secure mode: an
    instance whose handshake fails (it refuses this key) is that string at
    once, and told to *on_refused*.
    """
    listed = list(dict.fromkeys(endpoints))
    results: dict[str, dict[str, Any] | str] = {}
    for start in range(0, len(listed), ASK_AT_ONCE):
        results.update(_ask(listed[start : start + ASK_AT_ONCE], timeout, context, on_refused))
    return results


def _ask(
    endpoints: list[str],
    timeout: float,
    context: zmq.Context[zmq.Socket[bytes]] | None,
    on_refused: Refusal | None,
) -> dict[str, dict[str, Any] | str]:
    ctx = context or zmq.Context.instance()
    socks: dict[zmq.Socket[bytes], str] = {}
    monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}  # secure mode: monitor -> sock
    results: dict[str, dict[str, Any] | str] = {}
    poller = zmq.Poller()
    secure = security.active() is not None
    try:
        for endpoint in endpoints:
            parsed = Endpoint.from_peer(endpoint)
            if parsed is None:
                results[endpoint] = "malformed endpoint"
                continue
            sock = new_socket(zmq.DEALER, context=ctx, max_message=MAX_STATS + 4096)
            socks[sock] = endpoint
            results[endpoint] = "no answer"
            if secure:  # before connecting: no handshake event is missed
                monitor = sock.get_monitor_socket(security.FAILURE_EVENTS)
                monitors[monitor] = sock
                poller.register(monitor, zmq.POLLIN)
            try:
                connect(sock, parsed, pinned_key(parsed))
            except UsageError as exc:  # secure mode: no key known for it
                results[endpoint] = str(exc)
                continue
            # no room: its secure handshake failed already (the monitor says why)
            with contextlib.suppress(zmq.Again):
                sock.send_multipart([TAG, STATS_QUERY], zmq.NOBLOCK)
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        waiting = {s for s in socks if results[socks[s]] == "no answer"}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(int(left * 1000) + 1):
                if sock in monitors:
                    why = handshake_refusal(sock)
                    asked = monitors[sock]
                    if why is not None and asked in waiting:
                        poller.unregister(sock)
                        results[socks[asked]] = why
                        waiting.discard(asked)
                        poller.unregister(asked)
                        if on_refused is not None:
                            on_refused(socks[asked], why)
                    continue
                for msg in received(sock, 16):
                    answer = _stats_answer(msg)
                    if answer is not None:
                        results[socks[sock]] = answer
                        waiting.discard(sock)
                        poller.unregister(sock)
                        break
    finally:
        for monitor, sock in monitors.items():
            sock.disable_monitor()
            monitor.close(0)
        for sock in socks:
            sock.close()
    return results


def _stats_answer(msg: list[bytes]) -> dict[str, Any] | str | None:
    if len(msg) < 2 or msg[:2] != [TAG, STATS]:
        return None  # something else (a late pong...): keep waiting
    if len(msg) != 3:
        return "malformed stats answer (frames)"
    if len(msg[2]) > MAX_STATS:
        return "stats answer too large"
    try:  # a broker's answer may be larger than protocol.MAX_JSON: parsed here
        data = json.loads(msg[2], parse_constant=_not_a_number)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "malformed stats answer (not JSON)"
    if not isinstance(data, dict):
        return "malformed stats answer (not an object)"
    return data


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
