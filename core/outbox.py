"""Bytes queued per peer: replies a peer does not read cost a bounded amount of memory.

ZeroMQ bounds what a socket queues for one peer in *messages* (its high-water
mark), not in bytes: 100,000 replies of 1 MiB to a caller that never reads is
100 GB.  A daemon answering peers on a ROUTER (or on a DEALER, one peer) sends
its replies through an :class:`Outbox` instead:

- the socket's pipe to each peer is deep in messages (:data:`HWM`: a burst of
  replies, up to a persistent process's whole depth, goes out in one go; a
  shallow pipe chops it into half-pipe pieces, each a wake-up of both
  threads and a smaller batch for the caller) and bounded in bytes two ways:
  replies up to :data:`LARGE` bytes fill it to at most ``HWM * LARGE`` bytes;
  larger ones are sent tracked (:class:`zmq.MessageTracker`: done when
  ZeroMQ has written them out) and go to the pipe only while those not yet
  written fit in :data:`LARGE_BYTES` per peer.  Together :data:`PIPE_BYTES`.
  The mark is set once, before the socket connects (lowering it on open
  pipes can stall them: the reader acknowledges reads at the old mark's
  pace); a ROUTER is made ``ROUTER_MANDATORY``, so that a full pipe says so
  (``EAGAIN``) instead of dropping the message;
- what the pipe cannot take now waits in the outbox, in order, counted in
  bytes per peer and in total, and goes out on :meth:`Outbox.flush` (after
  every batch of input, and on a timer);
- beyond the peer's bound or the total, a reply is refused: counted in
  :attr:`Outbox.refused`, never silently dropped; the daemon refuses the
  peer's further requests while :meth:`Outbox.full` (it is not reading);
- a peer that left (``EHOSTUNREACH``) has its waiting replies dropped at once,
  counted in :attr:`Outbox.lost`: its memory is released when it goes.

:class:`Pump` drives an outbox from a :class:`~eda.core.daemon.Daemon`'s loop:
while replies wait and the pipes move, it watches the sockets for POLLOUT
(a burst of replies to a caller that reads goes out at once); when a try
moved nothing (a ROUTER is writable when *any* of its peers' pipes has room,
so a peer that never reads would keep it awake), it tries again on a timer.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .limits import PeerBytes

if TYPE_CHECKING:
    from .daemon import Daemon, Timer

# what ZeroMQ may queue for one peer: HWM messages of up to LARGE bytes, and larger
# ones up to LARGE_BYTES.  A pipe shallower than a burst of replies costs throughput:
# it refills half a pipe at a time, each a wake-up of both threads (64 messages: a worker
# woke twice as often per request, and its caller got its replies in smaller batches;
# 16: eda-lb serve answered 40 % fewer requests a second in bench/bench_lb_broker.py)
HWM = 1000  # messages
LARGE = 32 << 10  # bytes: a reply over this is sent tracked, counted until written out
LARGE_BYTES = 16 << 20  # tracked bytes ZeroMQ may hold for one peer (32 MiB of 256 KiB
# replies to a caller that never reads stayed resident in a broker past 128 MiB, in CI)
PIPE_BYTES = HWM * LARGE + LARGE_BYTES  # at most, per peer (48 MiB)
RECV_HWM = 1000  # messages waiting to be read from one peer (was 100,000)
PEER_BYTES = 8 << 20  # replies waiting in an outbox for one peer, at most
TOTAL_BYTES = 64 << 20  # and for every peer together
OVERHEAD = 64  # bytes counted per frame beyond its payload (ZeroMQ's and Python's)
RELEASE_AFTER = 8 << 20  # bytes held at once after which emptying gives memory back
RETRY_EVERY = 0.005  # seconds between tries while no pipe moved

_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_SEND = zmq.backend.Socket.send

Key = tuple[zmq.Socket[bytes], bytes | None]  # (socket, ROUTER identity or None on a DEALER)


def bound_socket(sock: zmq.Socket[bytes]) -> None:
    """Set *sock*'s high-water marks (before it binds or connects) and make a ROUTER
    say when a peer's pipe is full."""
    sock.setsockopt(zmq.SNDHWM, HWM)
    # what arrives is read at once (and refused at once when over a bound): this pipe
    # fills only while the daemon is slower than the sender, and a small one costs
    # throughput (every refill is a wake-up of the I/O thread)
    sock.setsockopt(zmq.RCVHWM, RECV_HWM)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


def _libc_trim() -> Any:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


_TRIM = _libc_trim()


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: a burst of
    large messages would stay in the process's size after it is gone)."""
    if _TRIM is not None:
        _TRIM(0)


class Outbox:
    """Replies waiting for peers that do not read fast enough (see the module's doc)."""

    def __init__(self, peer_bytes: int = PEER_BYTES, total_bytes: int = TOTAL_BYTES) -> None:
        self.peer_bytes, self.total_bytes = peer_bytes, total_bytes
        self.waiting: dict[Key, collections.deque[list[bytes]]] = {}
        self.held = PeerBytes(peer_bytes, total_bytes)  # bytes waiting, per peer and in all
        self.refused = 0  # replies over a bound: not sent
        self.lost = 0  # replies to peers that left
        self.high = 0  # the most bytes waiting since memory was last given back
        self.kept = False  # something was kept since the last flush
        # replies over LARGE bytes that ZeroMQ still holds, per peer, and their bytes
        self.tracked: dict[Key, collections.deque[tuple[zmq.MessageTracker, int]]] = {}
        self.in_pipe: dict[Key, int] = {}

    @staticmethod
    def adopt(sock: zmq.Socket[bytes]) -> None:
        """Bound *sock* (before it binds or connects): see the module's doc."""
        bound_socket(sock)

    @staticmethod
    def size(frames: list[bytes]) -> int:
        return sum(len(f) for f in frames) + OVERHEAD * len(frames)

    def full(self, sock: zmq.Socket[bytes], ident: bytes | None) -> bool:
        """Whether replies to this peer wait already at its bound (it does not read)."""
        return self.held.full((sock, ident))

    def send(self, sock: zmq.Socket[bytes], ident: bytes | None, frames: list[bytes]) -> bool:
        """Send *frames* to the peer, or keep them for later; False: refused (counted)."""
        key = (sock, ident)
        if key not in self.waiting:  # the hot path: nothing waits for this peer
            try:
                if len(frames[-1]) <= LARGE:
                    _send_now(sock, ident, frames)
                    return True
                if self._send_large(key, frames):
                    return True
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno == errno.EHOSTUNREACH:  # it left
                    self.lost += 1
                    return False
                raise
        return self._keep(key, frames)

    def _keep(self, key: Key, frames: list[bytes]) -> bool:
        size = self.size(frames)
        if not self.held.fits(key, size):
            self.refused += 1
            return False
        self.waiting.setdefault(key, collections.deque()).append(frames)
        self.held.add(key, size)
        self.high = max(self.high, self.held.total)
        self.kept = True
        return True

    def flush(self) -> bool:
        """Send what waits, in order, as far as each peer's pipe takes it; True when
        something went (or something new was kept since the last flush)."""
        moved, self.kept = self.kept, False
        for key in list(self.waiting):
            sock, ident = key
            queue = self.waiting[key]
            sent = 0
            try:
                while queue:
                    if len(queue[0][-1]) <= LARGE:
                        _send_now(sock, ident, queue[0])
                    elif not self._send_large(key, queue[0]):
                        break  # the pipe holds LARGE_BYTES for it: on the timer, later
                    sent += self.size(queue.popleft())
            except zmq.Again:
                pass
            except zmq.ZMQError:  # it left (or its socket closed): drop what waits for it
                self.lost += len(queue)
                sent += sum(self.size(frames) for frames in queue)
                queue.clear()
            self.held.remove(key, sent)
            moved = moved or sent > 0
            if not queue:
                del self.waiting[key]
                self.held.forget(key)
        for key in list(self.tracked):  # written out: let go of their trackers
            self._in_pipe(key)
        if not self.waiting and self.high >= RELEASE_AFTER:
            self.high = 0
            release_memory()
        return moved

    def _send_large(self, key: Key, frames: list[bytes]) -> bool:
        """Send a reply over LARGE bytes, tracked, if the peer's tracked bytes still in
        ZeroMQ leave room for it (or none are); False: not now (zmq.Again: pipe full)."""
        size = len(frames[-1])
        for other in [k for k in self.tracked if k != key]:  # peers gone: let go of them
            self._in_pipe(other)
        held = self._in_pipe(key)
        if held and held + size > LARGE_BYTES:
            return False
        tracker = _send_now(key[0], key[1], frames, track=True)
        self.tracked.setdefault(key, collections.deque()).append((tracker, size))
        self.in_pipe[key] = held + size
        return True

    def _in_pipe(self, key: Key) -> int:
        """Bytes of the peer's large replies that ZeroMQ has not written out yet."""
        queue = self.tracked.get(key)
        if queue is None:
            return 0
        held = self.in_pipe[key]
        while queue and queue[0][0].done:  # written out in the order they were sent
            held -= queue.popleft()[1]
        if queue:
            self.in_pipe[key] = held
            return held
        del self.tracked[key], self.in_pipe[key]
        return 0

    def drop(self, sock: zmq.Socket[bytes]) -> None:
        """Forget every reply waiting on *sock* (it is being closed); counted as lost."""
        for key in [k for k in self.waiting if k[0] is sock]:
            self.lost += len(self.waiting.pop(key))
            self.held.forget(key)
        for key in [k for k in self.tracked if k[0] is sock]:
            del self.tracked[key], self.in_pipe[key]

    @property  # (last in the class: the name hides the builtin type below it)
    def bytes(self) -> int:
        """Bytes waiting for every peer together."""
        return self.held.total


def _send_now(
    sock: zmq.Socket[bytes], ident: bytes | None, frames: list[bytes], track: bool = False
) -> Any:
    """Send *frames* (after *ident* on a ROUTER); with *track*, the last one's tracker."""
    if ident is not None:
        _SEND(sock, ident, _MORE)  # on a full pipe (ROUTER_MANDATORY): EAGAIN, nothing sent
    last = len(frames) - 1
    for i in range(last):
        _SEND(sock, frames[i], _MORE)
    if track:  # not copied: ZeroMQ lets go of it (and says so) once written out
        return _SEND(sock, frames[last], _LAST, False, True)
    return _SEND(sock, frames[last], _LAST)


class Pump:
    """Sends an :class:`Outbox`'s replies from *daemon*'s loop (see the module's doc).

    Sockets whose replies go through the outbox are watched with :meth:`watch`
    (instead of the daemon's own) and replies sent with :meth:`send`.
    """

    def __init__(self, daemon: Daemon, outbox: Outbox | None = None) -> None:
        self.daemon = daemon
        self.outbox = outbox or Outbox()
        self.inputs: dict[zmq.Socket[bytes], tuple[str, Callable[[], object]]] = {}
        self.writing: set[zmq.Socket[bytes]] = set()  # watched for POLLOUT too
        self.timer: Timer | None = None

    def watch(self, sock: zmq.Socket[bytes], what: str, on_input: Callable[[], object]) -> None:
        """Call *on_input* when *sock* is readable (and send its replies when writable)."""
        self.inputs[sock] = (what, on_input)
        self._events(sock, zmq.POLLIN)

    def send(self, sock: zmq.Socket[bytes], ident: bytes | None, frames: list[bytes]) -> bool:
        """:meth:`Outbox.send`; what had to wait goes out from the loop, soon."""
        outbox = self.outbox
        sent = outbox.send(sock, ident, frames)
        if outbox.kept and self.timer is None and not self.writing:
            self.timer = self.daemon.after(0.0, "replies", self._retry)  # after this batch
        return sent

    def forget(self, sock: zmq.Socket[bytes]) -> None:
        """*sock* is being closed: its waiting replies are dropped (counted as lost)."""
        self.outbox.drop(sock)
        self.inputs.pop(sock, None)
        self.writing.discard(sock)

    def _events(self, sock: zmq.Socket[bytes], events: int) -> None:
        what, on_input = self.inputs[sock]

        def handle(ready: int) -> None:
            if ready & zmq.POLLIN:
                on_input()
            if ready & zmq.POLLOUT:
                self.settle()

        self.daemon.watch_events(sock, what, handle, events)

    def settle(self) -> None:
        """Send what waits; watch for room while pipes move, else try again on a timer."""
        outbox = self.outbox
        moved = outbox.flush() if outbox.waiting else False
        wanted = {key[0] for key in outbox.waiting} if moved else set()
        wanted &= self.inputs.keys()
        for sock in self.writing - wanted:
            if sock in self.inputs and not sock.closed:
                self._events(sock, zmq.POLLIN)
        for sock in wanted - self.writing:
            self._events(sock, zmq.POLLIN | zmq.POLLOUT)
        self.writing = wanted
        if outbox.waiting and not moved and self.timer is None:
            self.timer = self.daemon.after(RETRY_EVERY, "replies", self._retry)

    def _retry(self) -> None:
        self.timer = None
        self.settle()
