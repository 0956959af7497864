"""The TCP proxy's figures on the network: the stats socket of ``eda-lb tcp``.

``eda-lb stats`` asks brokers and workers with the S frame (core/lb/stats.py's
:func:`~.stats.ask_stats`) and reads their T answer.  The TCP proxy, of either
engine, answers the same S on a small ZeroMQ ROUTER socket of its own
(:class:`StatsServer`, in a thread), registered as an instance of its service
with meta ``role=proxy`` (so callers, which take ``role=worker``, and the
proxies themselves, which leave ``role=proxy`` out, never send traffic to it).

Its T answer: ``{"role": "proxy", "engine": ..., "listen": ..., "backends":
[{id, address, state, weight, sessions, sessions_total, bytes_in, bytes_out,
connect_errors}, ...]}``, HAProxy's ``show stat`` per server (scur, stot,
bin, bout, econ, status, weight).  Anything else that arrives is dropped;
answers are rate-limited (:class:`~.protocol.Budget`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import zmq

from ..daemon import received
from ..endpoint import Endpoint
from ..sockets import bind, new_socket
from .protocol import STATS, STATS_QUERY, TAG, Budget

Log = Callable[[str], None]


def state_of(status: str) -> str:
    """HAProxy's server status as eda-lb says it: up, down, maint, drain (``UP 1/2``,
    going down, is still up; ``no check`` is up)."""
    word = status.split(" ", 1)[0].lower()
    return "up" if status == "no check" else word if word else "unknown"


def _quiet(_message: str) -> None:
    pass


class StatsServer:
    """Answers S with ``figures()`` on a ROUTER bound to *where* (port 0: any), in a
    daemon thread, until :meth:`close`."""

    def __init__(
        self, where: Endpoint, figures: Callable[[], dict[str, Any]], warn: Log = _quiet
    ) -> None:
        self.figures, self.warn = figures, warn
        self.sock = new_socket(zmq.ROUTER, max_message=4096)
        self.endpoint = bind(self.sock, where)
        self.budget = Budget()
        self.dropped = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="eda-lb-stats", daemon=True)

    @property
    def port(self) -> int:
        return self.endpoint.port

    def start(self) -> StatsServer:
        self.thread.start()
        return self

    def _serve(self) -> None:
        sock = self.sock
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                for msg in received(sock, 64):
                    if msg[1:] != [TAG, STATS_QUERY] or not self.budget.take():
                        self.dropped += 1  # not a question, or a flood of them
                        continue
                    answer = json.dumps(self.figures(), allow_nan=False).encode()
                    try:
                        sock.send_multipart([msg[0], TAG, STATS, answer], zmq.NOBLOCK)
                    except zmq.Again:  # an asker that does not read: its answer is dropped
                        self.dropped += 1
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                self.warn(f"warning: stats socket: {exc}; figures no longer served")
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(2.0)
        else:
            self.sock.close()


class PublishedFigures:
    """A proxy's :class:`StatsServer`, registered as an instance of *service* with
    meta ``role=proxy`` (where ``eda-lb stats`` finds it).

    Registering never holds the proxy up: it is tried in a thread, again every
    second until a registry (or mDNS) takes it, since the proxy itself waits for
    a registry that comes later.
    """

    RETRY = 1.0  # seconds between two attempts to register

    def __init__(
        self, service: str, access: Any, figures: Callable[[], Any], engine: str,
        log: Log = _quiet, warn: Log = _quiet,
    ) -> None:  # fmt: skip
        self.service, self.access, self.engine, self.log = service, access, engine, log
        self.server = StatsServer(Endpoint(access.interface or "0.0.0.0", 0), figures, warn)
        self._stop = threading.Event()
        self._presences: list[Any] = []
        self._thread = threading.Thread(
            target=self._register, name="eda-lb-stats-register", daemon=True
        )

    def start(self) -> PublishedFigures:
        self.server.start()
        self._thread.start()
        return self

    def _register(self) -> None:
        from ..errors import EdaError
        from ..presence import Presence
        from ..registry import access as reg

        record = reg.registration(
            self.service, self.server.port, meta=("role=proxy", f"engine={self.engine}"),
            interval=1.0,
        )  # fmt: skip
        told = False
        while not self._stop.is_set():
            try:
                presence = Presence(self.access, record, log=self.log, warn=self.log)
                inst = presence.start()
            except EdaError as exc:
                if not told:
                    self.log(f"figures not registered yet: {exc}; still trying")
                    told = True
                self._stop.wait(self.RETRY)
                continue
            self._presences.append(presence)
            self.log(f"figures of proxy {inst.id} on {self.server.endpoint.zmq}")
            return

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for presence in self._presences:
            presence.close()
        self.server.close()
