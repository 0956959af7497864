"""The data plane of ``eda-lb tcp``: one epoll loop moving bytes between clients and instances.

:class:`DataPlane` is the per-request hot path.  One epoll loop over
non-blocking sockets; each proxied connection is a pair of file descriptors
in a few dicts keyed by fd (no object per connection on the byte path:
``os.read`` then ``os.write`` to the peer).  A partial write parks the rest
and stops reading from the other side until it is flushed (so memory per
connection is bounded by one read); an EOF is passed on as a half-close; a
reset closes both sides.  New sockets are only created after an epoll batch
has been handled, so a recycled fd number never receives a stale event.

It reads its instructions (backend set, drain) as JSON lines from a control
pipe, so it runs the same in a thread of the proxy (``--workers 0``) or in a
process of its own.  A data-plane process is a fresh interpreter::

    python -m eda.core.lb.dataplane LISTEN_FD CONTROL_FD SETTINGS_JSON

started by core/lb/planes.py with the listening socket and the control
pipe's read end passed by file descriptor, never a fork of the proxy: the
proxy runs threads (the registry feed, zeroconf's), and a fork would inherit
whatever lock one of them held at that moment.  Its warnings are written as
lines on its stdout, which the proxy reads and reports as its own.

The strategies (``round-robin``, ``weighted``, ``least-conn``, ``random``,
``p2c``) are the shared balancer's (core/lb/balancer.py), choosing per
connection among the instances that are up; with several data-plane
processes each balances its own connections (counts are local).

This module is imported by a data-plane process at start: it imports nothing
beyond the standard library, the balancer and the error classes.  That is also
why it is about 600 lines in one module: the whole byte path and what a fresh
interpreter needs to start it, read in one place, with no import on the way.
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
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..endpoint import Endpoint
from ..errors import UsageError
from .balancer import STRATEGIES, Balancer
from .balancer import Backend as Slot

Log = Callable[[str], None]

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR, EPOLLHUP = select.EPOLLERR, select.EPOLLHUP
READ_SIZE = 65536  # one read: also the most a connection ever holds back per direction
# struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked, lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv
TCP_INFO_SIZE, TCP_INFO_IDLE_AT = 104, 8 + 9 * 4
TCP_INFO_IDLE = struct.Struct("=I4xI")  # last_data_sent, (last_ack_sent), last_data_recv
# ... then (Linux 4.1+) u64 bytes_acked at 120, bytes_received at 128: the bytes a socket
# received, counted by the kernel, so that the byte path counts nothing
TCP_INFO_BYTES_SIZE, TCP_INFO_RECEIVED_AT = 136, 128
TCP_INFO_RECEIVED = struct.Struct("=Q")
STATS_LINE = "\x1e"  # starts a data-plane process's figures line on its stdout (not a warning)
MAX_COUNTED = 4096  # instances a data plane keeps figures for (those gone are dropped past it)
ACCEPT_BATCH = 64


def _quiet(_message: str) -> None:
    pass


def received_bytes(sock: Any, ended: bool) -> int:
    """Bytes *sock* has received (TCP_INFO; 0 where the kernel does not say).

    The kernel's count takes in the peer's FIN (one sequence number): left out
    when the end was read (*ended*).
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES_SIZE)
        count = int(TCP_INFO_RECEIVED.unpack_from(info, TCP_INFO_RECEIVED_AT)[0])
    except (OSError, struct.error):
        return 0
    return count - 1 if count and ended else count


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

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)


# -- choosing an instance ----------------------------------------------------------------
def balancer_for(strategy: str) -> Balancer:
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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


class DataPlane:
    """One epoll loop proxying connections accepted on *listener*.

    Instructions arrive as JSON lines on *control* (a pipe's read end):
    ``{"backends": [[id, host, port, weight], ...]}``, ``{"drain": seconds}`` and
    ``{"stats": N}``, answered by calling *figures* with N and :meth:`figures`.
    :meth:`run` returns when drained (or when the control pipe closes).
    """

    def __init__(
        self,
        listener: socket.socket,
        control: int,
        settings: Settings,
        log: Log = _quiet,
        figures: Callable[[int, dict[str, dict[str, int]]], None] | None = None,
    ) -> None:
        self.listener = listener
        self.lfd = listener.fileno()
        self.control = control
        self.settings = settings
        self.log = log
        self.balancer = balancer_for(settings.strategy)
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
        # per instance id: [sessions total, bytes in (from clients), bytes out (to clients),
        # connect errors], of connections that ended (open ones are added when asked)
        self.totals: dict[str, list[int]] = {}
        self.answer_figures = figures
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
        self._totals(slot.key)[0] += 1
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
        self._totals(slot.key)[3] += 1
        backend: Backend = slot.data[0]
        self._warn("connect", f"connect to {slot.key} ({backend.endpoint}) failed: trying another")
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
        cfd, bfd = (fd, other) if fd in self.slot_of else (other, fd)
        slot = self.slot_of.pop(cfd, None)
        if slot is not None:  # the kernel's byte counts, read once per connection
            totals = self._totals(slot.key)
            totals[1] += received_bytes(self.socks[cfd], cfd in self.eof)
            totals[2] += received_bytes(self.socks[bfd], bfd in self.eof)
        for side in (fd, other):
            self.pending.pop(side, None)
            self.eof.discard(side)
            self.socks.pop(side).close()
        if slot is not None:
            self.balancer.released(slot)
        self._gone()

    # -- figures ---------------------------------------------------------------------------
    def _totals(self, key: str) -> list[int]:
        totals = self.totals.get(key)
        if totals is None:
            if len(self.totals) >= MAX_COUNTED:
                self._forget_gone()
            totals = self.totals[key] = [0, 0, 0, 0]
        return totals

    def _forget_gone(self) -> None:
        """Drop the figures of instances no longer used, with no connection open."""
        open_keys = {slot.key for slot in self.slot_of.values()}
        for key in list(self.totals):
            if key not in self.balancer and key not in open_keys:
                del self.totals[key]

    def figures(self) -> dict[str, dict[str, int]]:
        """Per instance id: sessions (open now), sessions_total, bytes_in, bytes_out,
        connect_errors; the bytes of open connections included (asked of the kernel)."""
        out = {
            key: {
                "sessions": 0,
                "sessions_total": t[0],
                "bytes_in": t[1],
                "bytes_out": t[2],
                "connect_errors": t[3],
            }
            for key, t in self.totals.items()
        }
        for cfd, slot in self.slot_of.items():
            entry = out.get(slot.key)
            if entry is None:
                continue
            entry["sessions"] += 1
            bfd = self.peer[cfd]
            entry["bytes_in"] += received_bytes(self.socks[cfd], cfd in self.eof)
            entry["bytes_out"] += received_bytes(self.socks[bfd], bfd in self.eof)
        return out

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
            if "stats" in message and self.answer_figures is not None:
                self.answer_figures(int(message["stats"]), self.figures())
            if "drain" in message:
                self.drain_deadline = time.monotonic() + float(message["drain"])
                self._listen(False)
                self.listener.close()  # once every copy is closed, new connects are refused
        return True


# -- a data-plane process -------------------------------------------------------------------
def _report(message: str) -> None:
    """A warning, as one line on stdout: the proxy reads it and says it as its own."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(message.replace("\n", " ") + "\n")
        sys.stdout.flush()


def _report_figures(asked: int, figures: dict[str, dict[str, int]]) -> None:
    """The figures asked for, as one line on stdout marked :data:`STATS_LINE`."""
    line = STATS_LINE + json.dumps({"stats": asked, "backends": figures}) + "\n"
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(line)
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    """``python -m eda.core.lb.dataplane LISTEN_FD CONTROL_FD SETTINGS_JSON``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the proxy tells it to drain
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listen_fd, control, settings = int(argv[0]), int(argv[1]), Settings.from_json(argv[2])
    listener = socket.socket(fileno=listen_fd)
    try:
        DataPlane(listener, control, settings, _report, _report_figures).run()
    except Exception as exc:
        _report(f"data plane {os.getpid()} failed: {exc!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
