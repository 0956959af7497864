"""The built-in TCP proxy: a data plane per CPU, fed by the registry and active health checks.

Layout (one module, three parts):

- :class:`DataPlane` -- the per-request hot path.  One epoll loop over
  non-blocking sockets; each proxied connection is a pair of file
  descriptors in a few dicts keyed by fd (no object per connection on the
  byte path: ``os.read`` then ``os.write`` to the peer).  A partial write
  parks the rest and stops reading from the other side until it is flushed
  (so memory per connection is bounded by one read); an EOF is passed on as a
  half-close; a reset closes both sides.  New sockets are only created after
  an epoll batch has been handled, so a recycled fd number never receives a
  stale event.  It reads its instructions (backend set, drain) as JSON lines
  from a control pipe, so it runs the same in a forked worker process or in
  a thread.
- :class:`Health` -- active TCP checks (a connect within the timeout) with
  rise/fall.  A new instance starts up (traffic flows at once) until its
  first check; then ``fall`` failures take it down and ``rise`` successes
  bring it back.
- :class:`TcpProxy` -- binds the listener, forks the data planes (or runs
  one in a thread with ``workers=0``), runs the health checks, pushes the
  set of instances that are up to every data plane, restarts a data plane
  that died, and drains on request: stop accepting, let open connections
  finish until a deadline.

The strategies (``round-robin``, ``weighted``, ``least-conn``, ``random``,
``p2c``) are the shared balancer's (core/lb/balancer.py), choosing per
connection among the instances that are up; with several data-plane
processes each balances its own connections (counts are local).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import EdaError, UsageError
from ..limits import raise_fd_limit
from ..registry.model import HOST_RE
from .balancer import STRATEGIES, Balancer
from .balancer import Backend as Slot
from .selfloop import as_ip, reaches

Log = Callable[[str], None]

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR, EPOLLHUP = select.EPOLLERR, select.EPOLLHUP
READ_SIZE = 65536  # one read: also the most a connection ever holds back per direction
# struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked, lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv
TCP_INFO_SIZE, TCP_INFO_IDLE_AT = 104, 8 + 9 * 4
TCP_INFO_IDLE = struct.Struct("=I4xI")  # last_data_sent, (last_ack_sent), last_data_recv
ACCEPT_BATCH = 64


def _quiet(_message: str) -> None:
    pass


class ProxyError(EdaError):
    """The proxy cannot run (the listen address is taken, no data plane starts)."""


@dataclass(frozen=True)
class Backend:
    """One instance traffic may go to, its address already resolved."""

    id: str
    host: str  # numeric address
    port: int
    weight: int = 1

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (every address) or ``[V6]:PORT`` as (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "0.0.0.0"
    if (
        not sep
        or not port_text.isascii()
        or not port_text.isdigit()
        or not 0 <= int(port_text) <= 65535
        or not HOST_RE.fullmatch(host)
    ):
        raise UsageError(f"bad listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port_text)


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


# -- choosing an instance ----------------------------------------------------------------
def _balancer(strategy: str) -> Balancer:
    """The shared balancer (core/lb/balancer.py) as the data plane uses it: the
    strategy per connection, and passive ejection of an instance whose connects
    keep failing (between two active checks)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    return Balancer(strategy, eject_after=3, eject_base=1.0, eject_max=30.0)


def update_balancer(balancer: Balancer, backends: Iterable[Backend]) -> None:
    """Make *balancer* hold exactly *backends* (instances that stay keep their counts)."""
    wanted = {b.id: b for b in backends}
    for old in list(balancer):
        new = wanted.get(old.key)
        if new is None or old.data[1] != (new.host, new.port):
            balancer.remove(old.key)
    for backend in wanted.values():
        # data: (the Backend, its address, its family) -- read on every connect
        data = (backend, (backend.host, backend.port), backend.family)
        balancer.add(backend.id, backend.weight, data if backend.id not in balancer else None)


# -- the data plane ------------------------------------------------------------------------
@dataclass
class Settings:
    strategy: str = "round-robin"
    retries: int = 2  # further instances tried when a connect fails
    connect_timeout: float = 2.0
    max_conns: int = 10000  # proxied connections per data plane
    idle_timeout: float = 600.0  # close a connection silent both ways this long (0: never)
    check_interval: float = 1.0
    check_timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    workers: int = 0  # data-plane processes; 0: one data plane in a thread of this process


class DataPlane:
    """One epoll loop proxying connections accepted on *listener*.

    Instructions arrive as JSON lines on *control* (a pipe's read end):
    ``{"backends": [[id, host, port, weight], ...]}`` and ``{"drain": seconds}``.
    :meth:`run` returns when drained (or when the control pipe closes).
    """

    def __init__(
        self, listener: socket.socket, control: int, settings: Settings, log: Log = _quiet
    ) -> None:
        self.listener = listener
        self.lfd = listener.fileno()
        self.control = control
        self.settings = settings
        self.log = log
        self.balancer = _balancer(settings.strategy)
        self.ep = select.epoll()
        self.peer: dict[int, int] = {}  # fd -> the other side of its connection
        self.pending: dict[int, bytes] = {}  # fd -> bytes still to be written to it
        self.eof: set[int] = set()  # fds whose reading side has ended
        self.socks: dict[int, Any] = {}  # fd -> socket object (owns the fd)
        self.slot_of: dict[int, Slot] = {}  # client fd -> instance it goes to
        # backend fd being connected -> (client fd, instance, ids tried, deadline)
        self.connecting: dict[int, tuple[int, Slot, tuple[str, ...], float]] = {}
        self.later: list[tuple[int, tuple[str, ...]]] = []  # connects to start after a batch
        self.shut_soon: list[int] = []  # fds whose EOF is passed on after this batch
        self.accept_now = False
        self.accepting = False
        self.conns = 0
        self.drain_deadline: float | None = None
        self.control_buf = b""
        self.counts = dict.fromkeys(("accepted", "no_backend", "connect_failed", "idle_closed"), 0)
        self.idle_ms = settings.idle_timeout * 1000
        # idle connections are found by the kernel's own clocks, nothing on the byte path
        self.sweep_every = min(settings.idle_timeout / 4, 30.0)
        self.next_sweep = time.monotonic() + self.sweep_every
        self.paused = 0.0  # accepting paused until then (out of file descriptors)
        self.warned: dict[str, float] = {}

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        ep = self.ep
        listener = self.listener
        listener.setblocking(False)
        ep.register(self.control, EPOLLIN)
        self._listen(True)
        peer = self.peer
        read, write = os.read, os.write
        poll = ep.poll
        lfd, control = self.lfd, self.control
        try:
            while True:
                timed = self.connecting or self.paused or self.drain_deadline is not None
                sweeping = self.sweep_every > 0 and self.slot_of
                timeout = 0.25 if timed else self.sweep_every if sweeping else -1
                for fd, ev in poll(timeout):
                    other = peer.get(fd)
                    if other is not None:  # the hot path: bytes from one side to the other
                        if ev & EPOLLIN:
                            try:
                                data = read(fd, READ_SIZE)
                            except BlockingIOError:
                                continue
                            except OSError:
                                self._close(fd)
                                continue
                            if data:
                                try:
                                    n = write(other, data)
                                except BlockingIOError:
                                    n = 0
                                except OSError:
                                    self._close(fd)
                                    continue
                                if n != len(data):
                                    self._park(fd, other, data[n:])
                            else:
                                self._ended(fd, other)
                        elif ev & EPOLLOUT:
                            self._flush(fd, other)
                        elif ev & (EPOLLERR | EPOLLHUP):
                            self._close(fd)
                        continue
                    if fd == lfd:
                        self.accept_now = True
                    elif fd in self.connecting:
                        self._connected(fd, ev)
                    elif fd == control and not self._instructions():
                        return
                if self.shut_soon:
                    self._pass_ends()
                if (timed or sweeping) and not self._tick():  # may queue retries in later
                    return
                if self.accept_now:
                    self._accept()
                while self.later:  # a retry may fail at once and queue another (bounded)
                    later, self.later = self.later, []
                    for cfd, tried in later:
                        self._connect(cfd, tried)
        finally:
            self._close_all()

    def _tick(self) -> bool:
        """Timers: connect timeouts, accept pauses, idle connections, drain; False: stop."""
        now = time.monotonic()
        if self.connecting:
            self._expire_connects(now)
        if self.paused and now >= self.paused:
            self.paused = 0.0
            if self.drain_deadline is None and self.conns < self.settings.max_conns:
                self._listen(True)
        if self.sweep_every > 0 and now >= self.next_sweep:
            self.next_sweep = now + self.sweep_every
            self._sweep_idle()
        if self.drain_deadline is not None:
            if not self.conns and not self.connecting:
                return False
            if now >= self.drain_deadline:
                self.log(f"drain deadline reached: closing {self.conns} connection(s)")
                return False
        return True

    def _sweep_idle(self) -> None:
        """Close connections whose client moved no byte either way for the idle timeout.

        Every byte of a connection passes its client socket, whose TCP_INFO says
        how long ago data was last sent and received (milliseconds).
        """
        idle_ms, socks = self.idle_ms, self.socks
        for cfd in list(self.slot_of):
            try:
                info = socks[cfd].getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
                sent, received = TCP_INFO_IDLE.unpack_from(info, TCP_INFO_IDLE_AT)
            except (OSError, struct.error):
                continue
            if sent >= idle_ms and received >= idle_ms:
                self.counts["idle_closed"] += 1
                self._close(cfd)

    def _warn(self, key: str, message: str) -> None:
        """A warning, at most once a second per kind (a flood of failures is one line)."""
        now = time.monotonic()
        if now - self.warned.get(key, -2.0) >= 1.0:
            self.warned[key] = now
            self.log(message)

    # -- accepting and connecting ------------------------------------------------------------
    def _listen(self, on: bool) -> None:
        if on and not self.accepting:
            self.ep.register(self.lfd, EPOLLIN | select.EPOLLEXCLUSIVE)
        elif not on and self.accepting:
            self.ep.unregister(self.lfd)
        self.accepting = on

    def _accept(self) -> None:
        self.accept_now = False
        accept = self.listener._accept  # type: ignore[attr-defined]  # the fd, no socket object
        for _ in range(ACCEPT_BATCH):
            if self.conns >= self.settings.max_conns:
                self._listen(False)  # the kernel's backlog holds the rest
                return
            try:
                cfd, _addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and friends: pause, the backlog waits
                self._warn("accept", f"accept failed: {exc.strerror}; pausing 0.1 s")
                self._listen(False)
                self.paused = time.monotonic() + 0.1
                return
            self.counts["accepted"] += 1
            client = _socket.socket(self.listener.family, socket.SOCK_STREAM, 0, cfd)
            client.setblocking(False)
            self.socks[cfd] = client
            self.conns += 1
            self._connect(cfd, ())

    def _connect(self, cfd: int, tried: tuple[str, ...]) -> None:
        """Start connecting client *cfd* to an instance not in *tried*."""
        slot = self.balancer.pick(tried) if len(tried) <= self.settings.retries else None
        if slot is None:
            self.counts["no_backend"] += 1
            if not tried:
                self._warn("none", "no instance is up: connection refused")
            self._drop_client(cfd)
            return
        try:
            _b, addr, family = slot.data
            backend = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0)
        except OSError as exc:
            self.log(f"cannot open a socket to an instance: {exc}")
            self._drop_client(cfd)
            return
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bfd = backend.fileno()
        self.socks[bfd] = backend
        tried = (*tried, slot.key)
        self.balancer.started(slot)
        err = backend.connect_ex(addr)
        if err == 0:
            self._pair(cfd, bfd, slot)
        elif err == errno.EINPROGRESS:
            deadline = time.monotonic() + self.settings.connect_timeout
            self.connecting[bfd] = (cfd, slot, tried, deadline)
            self.ep.register(bfd, EPOLLOUT)
        else:
            self._connect_failed(bfd, cfd, slot, tried, registered=False)

    def _connected(self, bfd: int, ev: int) -> None:
        cfd, slot, tried, _deadline = self.connecting.pop(bfd)
        if ev & (EPOLLERR | EPOLLHUP):  # a failed connect says so (no SO_ERROR call needed)
            self._connect_failed(bfd, cfd, slot, tried, registered=True)
            return
        self.ep.modify(bfd, EPOLLIN)
        self._pair(cfd, bfd, slot, registered=True)

    def _pair(self, cfd: int, bfd: int, slot: Slot, registered: bool = False) -> None:
        slot.consecutive = slot.ejections = 0  # a connect that works: no longer an outlier
        self.peer[cfd] = bfd
        self.peer[bfd] = cfd
        self.slot_of[cfd] = slot
        self.ep.register(cfd, EPOLLIN)
        if not registered:
            self.ep.register(bfd, EPOLLIN)

    def _connect_failed(
        self, bfd: int, cfd: int, slot: Slot, tried: tuple[str, ...], registered: bool
    ) -> None:
        self.counts["connect_failed"] += 1
        _backend, (host, port), _family = slot.data
        self._warn("connect", f"connect to {slot.key} ({host}:{port}) failed: trying another")
        self.balancer.finished(slot, ok=False)
        if registered:
            self.ep.unregister(bfd)
        self.socks.pop(bfd).close()
        self.later.append((cfd, tried))  # a new socket only after this batch

    def _expire_connects(self, now: float) -> None:
        for bfd, (cfd, slot, tried, deadline) in list(self.connecting.items()):
            if now >= deadline:
                del self.connecting[bfd]
                self._connect_failed(bfd, cfd, slot, tried, registered=True)

    def _drop_client(self, cfd: int) -> None:
        client = self.socks.pop(cfd)
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        client.close()  # a reset: the client knows at once that nothing is behind
        self._gone()

    def _gone(self) -> None:
        self.conns -= 1
        if not self.accepting and not self.paused and self.drain_deadline is None:
            self._listen(True)

    # -- moving bytes (the slow paths) ------------------------------------------------------
    def _mask(self, fd: int) -> int:
        mask = 0 if fd in self.eof or self.peer[fd] in self.pending else EPOLLIN
        return mask | EPOLLOUT if fd in self.pending else mask

    def _park(self, src: int, dst: int, rest: bytes) -> None:
        """*dst* did not take all of it: keep the rest, stop reading *src* meanwhile."""
        self.pending[dst] = rest
        self.ep.modify(dst, self._mask(dst))
        self.ep.modify(src, self._mask(src))

    def _flush(self, fd: int, other: int) -> None:
        data = self.pending[fd]
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            return
        except OSError:
            self._close(fd)
            return
        if n != len(data):
            self.pending[fd] = data[n:]
            return
        del self.pending[fd]
        if other in self.eof:  # its EOF waited for these bytes
            self._shut(fd)
            if fd in self.eof:
                self._close(fd)
                return
        self.ep.modify(fd, self._mask(fd))
        self.ep.modify(other, self._mask(other))

    def _ended(self, fd: int, other: int) -> None:
        """*fd* reached EOF: pass the half-close on, close both when both ended."""
        self.eof.add(fd)
        if other not in self.pending:
            if other in self.eof and fd not in self.pending:
                self._close(fd)  # both ended and all delivered: no half-close needed
                return
            # after this batch, unless the other side ends in it too (then both just close)
            self.shut_soon.append(fd)
            return
        self.ep.modify(fd, self._mask(fd))

    def _pass_ends(self) -> None:
        """Half-close the other side of connections that reached EOF in the last batch."""
        for fd in self.shut_soon:
            other = self.peer.get(fd)
            if other is not None:  # still open: the other side did not end meanwhile
                self._shut(other)
                self.ep.modify(fd, self._mask(fd))
        self.shut_soon.clear()

    def _shut(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            self.socks[fd].shutdown(socket.SHUT_WR)

    def _close(self, fd: int) -> None:
        """Close the connection *fd* belongs to, both sides."""
        other = self.peer.pop(fd)
        del self.peer[other]
        for side in (fd, other):
            self.pending.pop(side, None)
            self.eof.discard(side)
            self.socks.pop(side).close()
        slot = self.slot_of.pop(fd, None) or self.slot_of.pop(other, None)
        if slot is not None:
            self.balancer.released(slot)
        self._gone()

    def _close_all(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        self.ep.close()
        self.listener.close()

    # -- instructions ----------------------------------------------------------------------
    def _instructions(self) -> bool:
        """Apply what the control pipe says; False when it closed (stop now)."""
        try:
            data = os.read(self.control, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        lines = (self.control_buf + data).split(b"\n")
        self.control_buf = lines.pop()
        for line in lines:
            message = json.loads(line)
            if "backends" in message:
                update_balancer(self.balancer, (Backend(*item) for item in message["backends"]))
            if "drain" in message:
                self.drain_deadline = time.monotonic() + float(message["drain"])
                self._listen(False)
                self.listener.close()  # once every copy is closed, new connects are refused
        return True


# -- active health checks ----------------------------------------------------------------
@dataclass
class _Check:
    backend: Backend
    up: bool = True
    confirmed: bool = False  # a first check has passed
    ok: int = 0  # consecutive successes
    failed: int = 0  # consecutive failures
    due: float = 0.0
    sock: socket.socket | None = None
    deadline: float = 0.0


class Health:
    """TCP connect checks with rise/fall for every candidate instance."""

    def __init__(self, settings: Settings, log: Log = _quiet) -> None:
        self.settings = settings
        self.log = log
        self.checks: dict[str, _Check] = {}
        self.ep = select.epoll()
        self.by_fd: dict[int, _Check] = {}

    def set_candidates(self, backends: Iterable[Backend]) -> bool:
        """The instances the registry says are passing; True if the set that is up changed."""
        now = time.monotonic()
        wanted = {b.id: b for b in backends}
        changed = False
        for inst_id in list(self.checks):
            check = self.checks[inst_id]
            if wanted.get(inst_id) != check.backend:
                self._abort(check)
                del self.checks[inst_id]
                changed = changed or check.up
        for inst_id, backend in wanted.items():
            if inst_id not in self.checks:
                self.checks[inst_id] = _Check(backend, due=now)
                changed = True
        return changed

    def up(self) -> list[Backend]:
        return [c.backend for c in sorted(self.checks.values(), key=lambda c: c.backend.id) if c.up]

    def timeout(self) -> float:
        """Seconds until the next check starts or times out."""
        now = time.monotonic()
        times = [c.deadline if c.sock else c.due for c in self.checks.values()]
        return max(0.0, min(times) - now) if times else 1.0

    def step(self, wait: float) -> bool:
        """Run due checks, wait up to *wait* for answers; True if the set that is up changed."""
        changed = False
        now = time.monotonic()
        for check in self.checks.values():
            if check.sock is None and now >= check.due:
                changed |= self._start(check, now)
        for fd, _ev in self.ep.poll(min(wait, self.timeout())):
            answered = self.by_fd.get(fd)
            if answered is not None and answered.sock is not None:
                err = answered.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                changed |= self._result(answered, err == 0)
        now = time.monotonic()
        for check in list(self.by_fd.values()):
            if check.sock is not None and now >= check.deadline:
                changed |= self._result(check, False)
        return changed

    def _start(self, check: _Check, now: float) -> bool:
        backend = check.backend
        try:
            sock = socket.socket(backend.family, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors: this round is lost, not the proxy
            self.log(f"cannot check {backend.id}: {exc.strerror}")
            check.due = now + self.settings.check_interval
            return False
        sock.setblocking(False)
        err = sock.connect_ex((backend.host, backend.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            check.due = now + self.settings.check_interval
            return self._record(check, False)
        check.sock, check.deadline = sock, now + self.settings.check_timeout
        self.by_fd[sock.fileno()] = check
        self.ep.register(sock.fileno(), EPOLLOUT)
        return False

    def _abort(self, check: _Check) -> None:
        if check.sock is not None:
            self.by_fd.pop(check.sock.fileno(), None)
            self.ep.unregister(check.sock.fileno())
            check.sock.close()
            check.sock = None

    def _result(self, check: _Check, ok: bool) -> bool:
        self._abort(check)
        check.due = time.monotonic() + self.settings.check_interval
        return self._record(check, ok)

    def _record(self, check: _Check, ok: bool) -> bool:
        """Count one result; True when the instance went up or down."""
        name = f"{check.backend.id} ({check.backend.host}:{check.backend.port})"
        if ok:
            check.ok, check.failed = check.ok + 1, 0
            if not check.confirmed:
                check.confirmed = True
                if check.up:
                    return False
            if not check.up and check.ok >= self.settings.rise:
                check.up = True
                self.log(f"instance {name} is up ({check.ok} checks passed)")
                return True
            return False
        check.ok, check.failed = 0, check.failed + 1
        fall = self.settings.fall if check.confirmed else 1
        if check.up and check.failed >= fall:
            check.up = False
            self.log(f"instance {name} is down ({check.failed} checks failed)")
            return True
        return False

    def close(self) -> None:
        for check in self.checks.values():
            self._abort(check)
        self.ep.close()


# -- the proxy ---------------------------------------------------------------------------
class TcpProxy:
    """Listener, data planes, health checks and drain.

    Feed it candidates with :meth:`set_candidates` (thread-safe; e.g. from
    :func:`follow`), call :meth:`start` then :meth:`run`; :meth:`drain`
    (signal-safe) makes :meth:`run` return once the connections finished.
    """

    def __init__(
        self,
        host: str,
        port: int,
        settings: Settings,
        log: Log = _quiet,
        warn: Log = _quiet,
    ) -> None:
        _balancer(settings.strategy)  # refuse an unknown strategy now
        self.host, self.port = host, port
        self.settings = settings
        self.log, self.warn = log, warn
        self.listeners: list[socket.socket] = []  # one per data plane, on the same port
        self.health = Health(settings, warn)
        self.workers: dict[int, int] = {}  # data-plane pid -> its listener's index
        self.feeds: dict[int, int] = {}  # data-plane pid -> its control pipe's write end
        self.threads: list[tuple[threading.Thread, int]] = []
        self.planes: list[DataPlane] = []  # the data planes running in threads (workers=0)
        self.lock = threading.Lock()
        self.candidates: list[Backend] | None = None  # new candidates, not yet applied
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.drain_timeout: float | None = None
        self.last_sent = b""
        self.warned_self: set[Backend] = set()  # instances at our own address, told once

    @property
    def address(self) -> tuple[str, int]:
        name = self.listeners[0].getsockname()
        return str(name[0]), int(name[1])

    def start(self) -> None:
        """Bind and start the data planes (forked before any thread of ours exists).

        Each data-plane process gets a listening socket of its own on the same
        port (SO_REUSEPORT): the kernel spreads new connections evenly over
        them, where one shared socket hands most to whichever process is awake.
        """
        port = self.port
        for _ in range(max(1, self.settings.workers)):
            self.listeners.append(self._bind(port))
            port = self.address[1]  # the port the first one got (port 0: ephemeral)
        raise_fd_limit()
        if self.settings.workers == 0:
            self._start_thread()
        else:
            for slot in range(self.settings.workers):
                self._fork(slot)

    def _bind(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.workers > 1:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            listener.bind((self.host, port))
            listener.listen(4096)
        except (OSError, UnicodeError) as exc:
            listener.close()
            for other in self.listeners:
                other.close()
            self.listeners.clear()
            why = getattr(exc, "strerror", None) or exc
            raise ProxyError(f"cannot listen on {self.host}:{port}: {why}") from None
        return listener

    def _start_thread(self) -> None:
        control, feed = os.pipe()
        plane = DataPlane(self.listeners[0].dup(), control, self.settings, self.warn)
        thread = threading.Thread(target=plane.run, name="eda-lb-tcp", daemon=True)
        thread.start()
        self.planes.append(plane)
        self.threads.append((thread, feed))

    def _fork(self, slot: int) -> None:
        control, feed = os.pipe()
        pid = os.fork()
        if pid == 0:  # the data-plane process
            code = 0
            # forked while another thread (the registry feed) may hold the stderr
            # stream's lock: give this process streams of its own, so its first
            # warning cannot wait forever on a lock no thread here will release
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            try:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent tells it to drain
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                for fd in (feed, self.wake_r, self.wake_w, *self.feeds.values()):
                    os.close(fd)
                for n, other in enumerate(self.listeners):
                    if n != slot:
                        other.close()
                DataPlane(self.listeners[slot], control, self.settings, self.warn).run()
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    self.warn(f"data plane {os.getpid()} failed: {exc!r}")
                code = 1
            finally:
                os._exit(code)
        os.close(control)
        self.workers[pid] = slot
        self.feeds[pid] = feed
        if self.last_sent:
            self._send(feed, self.last_sent)

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
                    f"instance {backend.id} ({backend.host}:{backend.port}) is this proxy's "
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
            host, port = resolve(self.host, self.port) or self.host, self.port
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
                if changed or not self.last_sent:
                    self._publish()
                self._reap()
            self._finish(self.drain_timeout)
        finally:
            self.health.close()

    def _publish(self) -> None:
        up = self.health.up()
        message = {"backends": [[b.id, b.host, b.port, b.weight] for b in up]}
        self.last_sent = json.dumps(message).encode() + b"\n"
        for feed in self._feeds():
            self._send(feed, self.last_sent)
        self.log(f"{len(up)} instance(s) up: {', '.join(b.id for b in up) or 'none'}")

    def _feeds(self) -> list[int]:
        return [*self.feeds.values(), *(feed for _t, feed in self.threads)]

    @staticmethod
    def _send(feed: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(feed, data)  # a small message to a pipe the data plane reads at once

    def _reap(self) -> None:
        """Restart a data-plane process that died."""
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    os.close(self.feeds.pop(pid))
                    slot = self.workers.pop(pid)
                    self.warn(f"data plane {pid} ended (status {status}); starting another")
                    self._fork(slot)

    def _finish(self, timeout: float) -> None:
        """Drain every data plane and wait for them (a little past *timeout* at most)."""
        message = json.dumps({"drain": timeout}).encode() + b"\n"
        for feed in self._feeds():
            self._send(feed, message)
        for listener in self.listeners:
            listener.close()  # the data planes hold their own copies until drained
        deadline = time.monotonic() + timeout + 2.0
        for thread, _feed in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for pid in list(self.workers):
            while time.monotonic() < deadline:
                done, _status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.02)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for feed in self._feeds():
            os.close(feed)
        self.workers.clear()
        self.feeds.clear()
        self.threads.clear()

    def close(self) -> None:
        """Stop at once (no drain)."""
        if self.drain_timeout is None and (self.workers or self.threads):
            self._finish(0.0)
        for listener in self.listeners:
            listener.close()
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- following the registry ----------------------------------------------------------------
def instances_of(records: Iterable[dict[str, Any]], warn: Log = _quiet) -> list[Backend]:
    """Backends (addresses resolved) of the passing records."""
    found = []
    for record in records:
        if record.get("status") != "passing":
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
