"""The built-in TCP proxy of ``eda-lb tcp``, fed by the registry and active health checks.

The proxy is four parts, each in a module of its own:

- core/lb/dataplane.py: :class:`DataPlane`, the per-connection hot path
  (one epoll loop moving bytes), run in a thread or as a process of its own;
- core/lb/planes.py: :class:`~.planes.Planes` starts the data planes (fresh
  interpreters, never forks of this threaded process), sends them the
  instances that are up, starts a dead one again and drains them;
- core/lb/tcpcheck.py: :class:`~.tcpcheck.Health`, TCP connect checks with
  rise/fall (the one rule of core/measure.py);
- here: :class:`TcpProxy` binds the listeners, takes candidates from the
  registry (:func:`follow`), leaves out its own address, and runs the health
  checks, passing every change of the set that is up to the data planes,
  until drained: stop accepting, let open connections finish until a deadline.

Its figures (:meth:`TcpProxy.figures`, what ``eda-lb stats`` shows, served by
core/lb/proxystats.py): per instance, the data planes' counters summed and the
health checks' state and weight, like HAProxy's ``show stat``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..endpoint import Endpoint
from ..errors import EdaError, UsageError
from ..limits import raise_fd_limit
from .dataplane import Backend, DataPlane, Log, Settings, balancer_for, update_balancer
from .planes import COUNTERS, Planes
from .selfloop import as_ip, reaches
from .tcpcheck import Health

__all__ = [
    "Backend",
    "DataPlane",
    "ProxyError",
    "Settings",
    "TcpProxy",
    "follow",
    "instances_of",
    "parse_listen",
    "update_balancer",
]

EPOLLIN = select.EPOLLIN


def _quiet(_message: str) -> None:
    pass


class ProxyError(EdaError):
    """The proxy cannot run (the listen address is taken, no data plane starts)."""


def parse_listen(text: str) -> Endpoint:
    """``HOST:PORT``, ``:PORT`` or ``*:PORT`` (every address) or ``[V6]:PORT``."""
    try:
        listen = Endpoint.parse(text, "listen", default_host="0.0.0.0")
    except UsageError:
        raise UsageError(
            f"bad listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080"
        ) from None
    return listen.with_host("0.0.0.0") if listen.host == "*" else listen


def resolve(host: str, port: int) -> str | None:
    """A numeric address for *host* (None if it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for family, _type, _proto, _name, addr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return str(addr[0])
    return None


# -- the proxy ---------------------------------------------------------------------------
class TcpProxy:
    """Listeners, candidates, health checks and drain; the data planes are :class:`Planes`.

    Feed it candidates with :meth:`set_candidates` (thread-safe; e.g. from
    :func:`follow`), call :meth:`start` then :meth:`run`; :meth:`drain`
    (signal-safe) makes :meth:`run` return once the connections finished.
    """

    def __init__(
        self,
        listen: Endpoint,
        settings: Settings,
        log: Log = _quiet,
        warn: Log = _quiet,
    ) -> None:
        balancer_for(settings.strategy)  # refuse an unknown strategy now
        self.listen = listen
        self.settings = settings
        self.log, self.warn = log, warn
        self.listeners: list[socket.socket] = []  # one per data plane, on the same port
        self.health = Health(settings, warn)
        self.dataplanes = Planes(self.listeners, settings, warn, self.health.ep)
        self.lock = threading.Lock()
        self.candidates: list[Backend] | None = None  # new candidates, not yet applied
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.drain_timeout: float | None = None
        self.bound = listen  # the address listened on, its port known after start()
        self.warned_self: set[Backend] = set()  # instances at our own address, told once
        # the candidates and whether each is up, for figures(): replaced, never changed
        self.checked: dict[str, tuple[Backend, bool]] = {}

    @property
    def address(self) -> tuple[str, int]:
        name = self.listeners[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def planes(self) -> list[DataPlane]:
        """The data plane running in a thread (``workers=0``)."""
        return self.dataplanes.in_threads

    def start(self) -> None:
        """Bind and start the data planes.

        Each data-plane process gets a listening socket of its own on the same
        port (SO_REUSEPORT): the kernel spreads new connections evenly over
        them, where one shared socket hands most to whichever process is awake.
        """
        port = self.listen.port
        for _ in range(max(1, self.settings.workers)):
            self.listeners.append(self._bind(port))
            port = self.address[1]  # the port the first one got (port 0: ephemeral)
        self.bound = self.listen.with_port(port)
        raise_fd_limit()
        self.dataplanes.start()

    def _bind(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if self.listen.is_ipv6 else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.workers > 1:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            listener.bind((self.listen.host, port))
            listener.listen(4096)
        except (OSError, UnicodeError) as exc:
            listener.close()
            for other in self.listeners:
                other.close()
            self.listeners.clear()
            why = getattr(exc, "strerror", None) or exc
            raise ProxyError(f"cannot listen on {self.listen.with_port(port)}: {why}") from None
        return listener

    def set_candidates(self, backends: list[Backend]) -> None:
        """The instances to check and use (thread-safe).

        An instance at the proxy's own listen address is left out with a warning:
        proxying to it would connect the proxy to itself, each connection opening
        another until --max-conn and the backlog are full of the loop.
        """
        kept = []
        for backend in backends:
            if self._is_self(backend):
                if backend in self.warned_self:
                    continue
                self.warned_self.add(backend)
                self.warn(
                    f"instance {backend.id} ({backend.endpoint}) is this proxy's "
                    "own listen address: ignored"
                )
            else:
                kept.append(backend)
        with self.lock:
            self.candidates = kept
        self._wake()

    def _is_self(self, backend: Backend) -> bool:
        """Whether connecting to *backend* would reach this proxy's listener (in any
        spelling: 0.0.0.0, ::, 127.0.0.2, ::ffff:127.0.0.1, an interface's address)."""
        if self.listeners:
            host, port = self.address
        else:
            host, port = self.listen.sockaddr
            host = resolve(host, port) or host
        return reaches(as_ip(host), port, backend.host, backend.port)

    def drain(self, timeout: float) -> None:
        """Stop accepting; :meth:`run` returns once connections end or *timeout* passes."""
        self.drain_timeout = timeout
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"x")

    def run(self) -> None:
        """Health checks and updates until drained."""
        self.health.ep.register(self.wake_r, EPOLLIN)
        try:
            while self.drain_timeout is None:
                with self.lock:
                    candidates, self.candidates = self.candidates, None
                changed = candidates is not None and self.health.set_candidates(candidates)
                changed |= self.health.step(1.0)
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
                self.dataplanes.read_reports()
                self.dataplanes.send_asks()
                if changed or not self.dataplanes.last_sent:
                    self._publish()
                self.dataplanes.restart_dead()
            self.dataplanes.stop(self.drain_timeout)
        finally:
            self.health.close()

    def _publish(self) -> None:
        self.checked = {c.backend.id: (c.backend, c.up) for c in self.health.checks.values()}
        up = self.health.up()
        message = {"backends": [[b.id, b.host, b.port, b.weight] for b in up]}
        self.dataplanes.send(json.dumps(message).encode() + b"\n")
        self.log(f"{len(up)} instance(s) up: {', '.join(b.id for b in up) or 'none'}")

    def figures(self, timeout: float = 1.0) -> dict[str, Any]:
        """What ``eda-lb stats`` shows (any thread): per instance, the data planes'
        counters summed, its health (up, down; gone: no longer a candidate, counted
        before) and weight."""
        counted, answered, planes = self.dataplanes.collect(self._wake, timeout)
        checked = self.checked
        backends = []
        for inst_id in sorted(set(checked) | set(counted)):
            backend, up = checked.get(inst_id, (None, False))
            state = "gone" if backend is None else "up" if up else "down"
            entry: dict[str, Any] = {
                "id": inst_id,
                "address": str(backend.endpoint) if backend is not None else None,
                "state": state,
                "weight": backend.weight if backend is not None else None,
            }
            entry.update(counted.get(inst_id) or dict.fromkeys(COUNTERS, 0))
            backends.append(entry)
        return {
            "role": "proxy",
            "engine": "builtin",
            "listen": str(self.bound),
            "strategy": self.settings.strategy,
            "data_planes": planes,
            "answered": answered,
            "backends": backends,
        }

    def close(self) -> None:
        """Stop at once (no drain)."""
        if self.drain_timeout is None and self.dataplanes.running:
            self.dataplanes.stop(0.0)
        for listener in self.listeners:
            listener.close()
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- following the registry ----------------------------------------------------------------
def instances_of(records: Iterable[dict[str, Any]], warn: Log = _quiet) -> list[Backend]:
    """Backends (addresses resolved) of the passing records; in secure mode only those
    registered (or announced) under a trusted key: a forged record gets no traffic."""
    from .. import security

    secure = security.active() is not None
    found = []
    for record in records:
        if record.get("status") != "passing":
            continue
        meta = record.get("meta")
        if isinstance(meta, dict) and meta.get("role") == "proxy":
            continue  # a proxy's stats socket (core/lb/proxystats.py), never a backend
        if secure:
            key, why = security.admission(str(record.get("key", "")))
            if key is None:
                warn(f"warning: instance {record['id']}: {why}; left out")
                continue
        host = resolve(str(record["host"]), int(record["port"]))
        if host is None:
            warn(f"instance {record['id']}: cannot resolve host {record['host']!r}; left out")
            continue
        found.append(Backend(str(record["id"]), host, int(record["port"]), int(record["weight"])))
    return found


def follow(
    service: str, access: Any, warn: Log = _quiet, retry: float = 1.0
) -> Iterator[list[Backend]]:
    """The passing instances of *service*, again after every registry change, forever.

    A registry that does not answer at the start is asked again every *retry*
    seconds (once answering, the change stream itself survives restarts and
    failover).  Raises :class:`~eda.core.registry.client.NoRegistry` when no
    registry is known and mDNS is off: there is nothing to wait for.
    """
    from ..registry.access import changes
    from ..registry.client import NoRegistry
    from ..registry.store import DELETIONS

    warned = False
    while True:
        records: dict[str, dict[str, Any]] = {}
        try:
            for event in changes(service, access, snapshot=True, warn=warn):
                record = event.get("instance")
                if not isinstance(record, dict):
                    continue
                if event.get("type") in DELETIONS:
                    records.pop(str(record.get("id")), None)
                else:
                    records[str(record.get("id"))] = record
                yield instances_of(records.values(), warn)
        except NoRegistry:
            raise
        except EdaError as exc:
            if not warned:
                warn(f"warning: {exc}; still trying")
                warned = True
            time.sleep(retry)
