"""The base of every eda daemon: one thread, one poll loop, nothing that ends it.

A daemon owns ZeroMQ sockets and plain file descriptors, and runs timers;
:meth:`Daemon.serve` waits on all of them at once and calls the handler of
whatever is ready.  Being single-threaded, a daemon's state needs no locks
and the order of its events is the order of its changes.

Hostile peers and bugs alike must not stop a daemon (CONVENTIONS.md §7), so
every handler and timer runs *guarded*: whatever it raises is counted in
:attr:`Daemon.failures` and reported by a rate-limited warning, and the loop
goes on.  Handlers read in bounded batches (:func:`received`) so that one
busy socket cannot starve the others.

Sockets are made on a shared context (the process-wide one by default) and
closed one by one with their linger: closing a daemon never terminates a
context that other parts of the process (a client, a publisher) may use.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import zmq

from . import sockets
from .endpoint import Endpoint
from .errors import EdaError, UsageError
from .sockets import Liveness, new_socket

Log = Callable[[str], None]
WARN_EVERY = 10.0  # seconds between two warnings of the same kind
DRAIN_LIMIT = 1000  # messages one handler reads before the others get their turn
IDLE_WAIT = 0.1  # longest poll, so a stop predicate is seen promptly
# a bind that fails with one of these failed because of the machine (a port taken, an
# address or interface this host does not have), not because of the caller's syntax
_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.ENODEV)


class RateLimited:
    """A warning said at once, then at most every *every* seconds with a count."""

    def __init__(self, warn: Log, every: float = WARN_EVERY) -> None:
        self.warn, self.every = warn, every
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.every) < self.every:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        held = self.held.pop(kind, 0)
        self.last[kind] = now
        more = f" (and {held} more since the last warning)" if held else ""
        self.warn(f"warning: {message}{more}")


class BindError(EdaError):
    """An address to listen on is taken or unavailable: a runtime error, not a usage one."""


def bind_failed(what: str, err: int | None, reason: object) -> EdaError:
    """The error for a bind of *what* that failed with errno *err*.

    A taken or unavailable address is a :class:`BindError` (runtime, exit 1):
    another daemon holds the port, which no flag of ours can fix.  Anything
    else means the address itself is malformed (usage, exit 2).
    """
    kind = BindError if err in _BIND_ERRNOS else UsageError
    return kind(f"cannot bind {what}: {reason}")


def bind_socket(sock: zmq.Socket[bytes], endpoint: Endpoint | str) -> Endpoint:
    """Bind *sock* to *endpoint* (text is parsed first); the endpoint really bound.

    Malformed text is a :class:`~eda.core.errors.UsageError` (exit 2); a
    port in use, or an address or interface this host lacks, a
    :class:`BindError` (exit 1).
    """
    where = endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint, "bind")
    try:
        return sockets.bind(sock, where)
    except zmq.ZMQError as exc:
        raise bind_failed(where.zmq, exc.errno, exc) from None


def port_of(endpoint: Endpoint | str) -> int:
    """The port of a bound endpoint (``tcp://HOST:PORT`` or an :class:`Endpoint`)."""
    if isinstance(endpoint, Endpoint):
        return endpoint.port
    parsed = Endpoint.from_peer(endpoint)
    if parsed is None:
        raise ValueError(f"not a bound endpoint: {endpoint[:80]!r}")
    return parsed.port


def read_port(path: str) -> int | None:
    """The port a daemon's last run remembered in *path*, or None (none, or not a port)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(16).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) <= 65535 else None


def port_file(name: str, data: str | os.PathLike[str] | None = None, file: str = "port") -> str:
    """Where a daemon binding any port remembers it: *file* in its data directory
    *data*, else ``$XDG_STATE_HOME/eda/NAME.port`` (NAME as ``PROGRAM-NAME``)."""
    if data is not None:
        return os.path.join(data, file)
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "eda", f"{name}.port")


def write_port(path: str, port: int) -> None:
    """Remember *port* in *path* (atomically; best effort: a daemon runs on without it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(tmp, "w") as fh:
                fh.write(f"{port}\n")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@overload
def received(
    sock: zmq.Socket[bytes], limit: int = DRAIN_LIMIT, *, multipart: bool = True
) -> Iterator[list[bytes]]: ...
@overload
def received(
    sock: zmq.Socket[bytes], limit: int = DRAIN_LIMIT, *, multipart: bool = True,
    copy: Literal[False],
) -> Iterator[list[zmq.Frame]]: ...
def received(
    sock: zmq.Socket[bytes], limit: int = DRAIN_LIMIT, *, multipart: bool = True,
    copy: bool = True,
) -> Iterator[list[Any]]:
    """The messages waiting on *sock*, at most *limit*, without blocking.

    With *multipart* false each frame comes alone (as a one-item list), as
    :meth:`zmq.Socket.recv` reads them.  With *copy* false they come as
    :class:`zmq.Frame` objects, which also carry what ZAP proved about the
    connection (secure mode: :func:`eda.core.security.peer_key`).
    """
    for _ in range(limit):
        try:
            if multipart:
                yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            else:
                yield [sock.recv(zmq.NOBLOCK, copy=copy)]
        except zmq.Again:
            return


@dataclass(eq=False)
class Timer:
    """A step run every *interval* seconds (or once, when *interval* is None)."""

    what: str
    step: Callable[[], object]
    due: float
    interval: float | None
    cancelled: bool = field(default=False)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Watch:
    what: str
    handler: Callable[[int], object]


Target = Any  # a zmq socket, a file descriptor, or an object with fileno()


class Daemon:
    """A poll loop over sockets, descriptors and timers, every step guarded.

    Subclasses make sockets with :meth:`socket`, :meth:`bind` them, say what
    to do when they are readable with :meth:`watch`, add timers with
    :meth:`every` and :meth:`after`, and call :meth:`close` last.
    """

    def __init__(
        self,
        log: Log = lambda _msg: None,
        warn: Log | None = None,
        *,
        interface: str | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """*log* takes diagnostics (shown with -v), *warn* warnings (always shown)."""
        self.log = log
        self.warn: Log = warn or log
        self.limited = RateLimited(self.warn)
        self.interface = interface
        self.zctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context.instance()
        self.poller = zmq.Poller()
        self.failures = 0  # steps that raised
        self.malformed = 0  # inputs dropped as malformed
        self.discovery: Any = None
        self._sockets: list[zmq.Socket[bytes]] = []
        self._watched: dict[Any, _Watch] = {}
        self._timers: list[Timer] = []
        self._stopping = False

    # -- sockets -----------------------------------------------------------------------
    def socket(
        self,
        kind: int,
        *,
        linger: int = 0,
        max_message: int | None = None,
        liveness: Liveness | None = None,
    ) -> zmq.Socket[bytes]:
        """A socket this daemon closes (with *linger* ms) in :meth:`close`."""
        sock = new_socket(
            kind, context=self.zctx, linger=linger, max_message=max_message, liveness=liveness
        )
        self._sockets.append(sock)
        return sock

    @overload
    def bind(self, sock: zmq.Socket[bytes], endpoint: Endpoint) -> Endpoint: ...
    @overload
    def bind(self, sock: zmq.Socket[bytes], endpoint: str) -> str: ...
    def bind(self, sock: zmq.Socket[bytes], endpoint: Endpoint | str) -> Endpoint | str:
        """Bind *sock*; the endpoint really bound (any port resolved), as an
        :class:`Endpoint` when given one, else as ``tcp://HOST:PORT`` text.

        A port in use is a :class:`BindError` (a runtime error, exit 1), a
        malformed endpoint a :class:`~eda.core.errors.UsageError`.
        """
        bound = bind_socket(sock, endpoint)
        return bound if isinstance(endpoint, Endpoint) else bound.zmq

    @overload
    def bind_remembered(
        self, sock: zmq.Socket[bytes], endpoint: Endpoint, state: str | None
    ) -> Endpoint: ...
    @overload
    def bind_remembered(self, sock: zmq.Socket[bytes], endpoint: str, state: str | None) -> str: ...
    def bind_remembered(
        self, sock: zmq.Socket[bytes], endpoint: Endpoint | str, state: str | None
    ) -> Endpoint | str:
        """Bind *sock* like :meth:`bind`; an endpoint with any port (``0`` or ``*``)
        takes the port remembered in the file *state* (:func:`port_file`) by the last
        run, so a daemon restarted with the same command comes back where its clients
        expect it.  When that port is taken, another is bound (with a warning).  The
        port bound is remembered (best effort)."""
        where = endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint, "bind")
        bound = None
        if state is None or where.port != 0:
            bound = bind_socket(sock, where)
        else:
            port = read_port(state)
            if port:
                try:
                    bound = bind_socket(sock, where.with_port(port))
                except BindError:
                    self.warn(f"warning: port {port} of the last run is taken: binding another")
            if bound is None:
                bound = bind_socket(sock, where)
            write_port(state, bound.port)
        return bound if isinstance(endpoint, Endpoint) else bound.zmq

    def close_socket(self, sock: zmq.Socket[bytes]) -> None:
        """Stop watching *sock* and close it (with the linger it was made with)."""
        self.forget(sock)
        with contextlib.suppress(ValueError):
            self._sockets.remove(sock)
        sock.close()

    # -- what the loop waits on ----------------------------------------------------------
    @staticmethod
    def _key(target: Target) -> Any:
        # the poller reports zmq sockets as themselves and everything else by fd
        if isinstance(target, zmq.Socket | int):
            return target
        return target.fileno()

    def watch(self, target: Target, what: str, handler: Callable[[], object]) -> None:
        """Call *handler* (guarded, as *what*) whenever *target* is readable."""
        self.watch_events(target, what, lambda _events: handler(), zmq.POLLIN)

    def watch_events(
        self, target: Target, what: str, handler: Callable[[int], object], events: int
    ) -> None:
        """Call *handler(ready_events)* when any of *events* (POLLIN, POLLOUT) is
        ready on *target*; watching it again replaces the handler and events."""
        key = self._key(target)
        if key in self._watched:
            self.poller.modify(key, events)
        else:
            self.poller.register(key, events)
        self._watched[key] = _Watch(what, handler)

    def forget(self, target: Target) -> None:
        """Stop watching *target* (no error if it was not watched)."""
        key = self._key(target)
        if self._watched.pop(key, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.poller.unregister(key)

    def every(
        self, interval: float, what: str, step: Callable[[], object], *, first: float = 0.0
    ) -> Timer:
        """Run *step* (guarded) every *interval* seconds, the first time after *first*."""
        timer = Timer(what, step, time.monotonic() + first, interval)
        self._timers.append(timer)
        return timer

    def after(self, delay: float, what: str, step: Callable[[], object]) -> Timer:
        """Run *step* (guarded) once, *delay* seconds from now."""
        timer = Timer(what, step, time.monotonic() + delay, None)
        self._timers.append(timer)
        return timer

    # -- the loop --------------------------------------------------------------------------
    def serve(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run until *until* returns true, :meth:`stop` is called, or a signal
        raises out of the poll (KeyboardInterrupt and SystemExit are never caught)."""
        self._stopping = False
        while not self._stopping and not until():
            ready = self.poller.poll(self._wait_ms())
            for key, events in ready:
                watched = self._watched.get(key)
                if watched is not None:  # an earlier handler may have forgotten it
                    self.guarded(watched.what, watched.handler, events)
            self._run_timers()

    def stop(self) -> None:
        """End :meth:`serve` after the current step (safe from a handler or signal)."""
        self._stopping = True

    def _wait_ms(self) -> int:
        self._timers = [t for t in self._timers if not t.cancelled]
        now = time.monotonic()
        wait = min([now + IDLE_WAIT, *(t.due for t in self._timers)])
        # rounded up, never past the due time; 0 when a timer is due (``after(0)``: the
        # group commit, replies, the outbox pump run at once, not a millisecond later)
        return math.ceil(max(0.0, wait - now) * 1000)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for timer in list(self._timers):
            if timer.cancelled or now < timer.due:
                continue
            if timer.interval is None:
                timer.cancelled = True
            else:
                timer.due = now + timer.interval
            self.guarded(timer.what, timer.step)

    def guarded(self, what: str, step: Callable[..., object], *args: Any) -> bool:
        """Run one step of the loop; whatever it raises, the daemon goes on serving.

        False when it raised (counted in :attr:`failures`, warned at most every
        :data:`WARN_EVERY` seconds per *what*).
        """
        try:
            step(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug or a record nothing caught: say so, keep serving
            self.failures += 1
            self.limited(f"step:{what}", f"{what} failed: {type(exc).__name__}: {exc}"[:300])
            return False
        return True

    def dropped(self, where: str, exc: BaseException) -> None:
        """Count malformed input from *where* and warn (rate-limited); state is untouched."""
        self.malformed += 1
        self.limited(
            f"malformed:{where}",
            f"dropped malformed {where} (#{self.malformed}): {str(exc)[:200]}",
        )

    # -- discovery -------------------------------------------------------------------------
    def announce(
        self,
        service_type: str,
        name: str,
        port: int,
        txt: list[str] | None = None,
        on_ready: Callable[[], None] | None = None,
        key: str | None = None,
    ) -> Any:
        """Announce this daemon by mDNS (in the background); the discovery
        object, also kept in :attr:`discovery` for browsing and closed by :meth:`close`.
        *key*: secure mode's public key (TXT ``k``, pinned by clients)."""
        from .discovery import Discovery
        from .metrics import meta

        if self.discovery is None:
            self.discovery = Discovery(self.interface)
        txt = [*(txt or []), *meta()]  # where its /metrics is, if served
        self.discovery.announce_peer(service_type, name, port, txt, on_ready, key=key)
        return self.discovery

    def withdraw(self) -> None:
        """Stop announcing and browsing (goodbye packets); safe to call twice."""
        discovery, self.discovery = getattr(self, "discovery", None), None
        if discovery is not None:
            discovery.close()

    # -- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Withdraw announcements and close every socket made by :meth:`socket`.

        Safe on a half-built daemon and when called twice; the context stays
        open for the rest of the process.
        """
        self.withdraw()
        for sock in getattr(self, "_sockets", []):
            sock.close()
        self._sockets = []
        self._watched = {}
        self.poller = zmq.Poller()
