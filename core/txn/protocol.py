"""What the 2PC coordinator and participants say to each other, and how they find each other.

Both sides speak the JSON request/reply of :mod:`eda.core.reqrep` (one JSON
object per frame, ``op`` and ``rid`` in, ``ok`` and ``rid`` out; here a
message may carry several requests, one per frame, answered alike):

=============  ============================================  ===============================
to             request                                       reply
=============  ============================================  ===============================
coordinator    ``commit`` participants, data, timeout        txn, outcome, votes, reason
coordinator    ``outcome`` txn (a participant in doubt)      outcome: commit|abort|pending
participant    ``prepare`` txn, data, coordinator, reply_to  vote: yes|no, reason
participant    ``decide`` txn, outcome: commit|abort         done, hazard (an ack)
participant    ``resolve`` txn, outcome (an operator)        state
participant    ``resolve`` outcome, a filter (no txn: see    resolved, failed, more
               ``participant.Filter``)
both           ``stats``                                     counters (fsyncs, outcomes...)
=============  ============================================  ===============================

Two pieces here are shared by both daemons:

- :class:`BatchService`, a :class:`~eda.core.reqrep.Service` that answers a
  drained batch of requests together, after one ``flush`` (the journal's
  fsync: group commit), and whose handlers may defer a reply (``commit``
  answers once the transaction is decided);
- :class:`Peer`, an asynchronous request socket inside a daemon's poll loop
  (the blocking :class:`~eda.core.reqrep.Client` would stall every other
  transaction) that sends what a turn of the loop queued as one message,
  and :class:`Directory`, which finds a participant or a coordinator by
  name: explicit endpoints, else the registry, else mDNS;
- :class:`Registration`, which keeps a daemon registered (registry or mDNS).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from ..daemon import Daemon, received
from ..endpoint import Endpoint
from ..errors import EdaError, ProtocolError, UsageError
from ..reqrep import (
    Envelope,
    Service,
    client_endpoint,
    decode,
    encode,
    error_reply,
    split_envelope,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,49}")
TXN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,49}\.[0-9a-f]{4,32}")
MAX_PARTICIPANTS = 64
MAX_DATA = 32768  # bytes of a transaction's data as JSON (UTF-8)
MAX_FRAME = 8 * MAX_DATA  # bytes of one request frame (bigger ones drop the connection)
COORDINATOR_SERVICE = "txn-coordinator"
COMMIT, ABORT, PENDING = "commit", "abort", "pending"
DEFER = "__deferred__"  # a handler's reply meaning "answered later"

Log = Callable[[str], None]


class TxnError(EdaError):
    """A transaction request that cannot be carried out."""


class LookupFailed(TxnError):
    """A lookup that got no answer (no registry answered): it says nothing about the name."""


def check_name(name: object, what: str = "name") -> str:
    """A participant or coordinator name: letters, digits and '-', at most 50."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = str(name)[:60] if isinstance(name, str) else type(name).__name__
        raise UsageError(f"bad {what} {shown!r}: use 1-50 letters, digits and '-'")
    return name


def check_txn(txn: object) -> str:
    """A transaction id as coordinators make them: ``COORDINATOR.HEX``."""
    if not isinstance(txn, str) or not TXN_RE.fullmatch(txn):
        shown = str(txn)[:60] if isinstance(txn, str) else type(txn).__name__
        raise ProtocolError(f"bad transaction id {shown!r}")
    return txn


def owner_of(txn: str) -> str:
    """The name of the coordinator that made transaction id *txn*."""
    return txn.partition(".")[0]


def new_txn_id(coordinator: str) -> str:
    """A fresh id: unique across restarts (time and randomness), sortable by time."""
    return f"{coordinator}.{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


def data_json(data: object) -> str:
    """A transaction's data (a JSON object of bounded size) as compact JSON text."""
    if not isinstance(data, dict):
        raise ProtocolError("data must be a JSON object")
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ProtocolError("data is not valid JSON") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # JSON may spell a lone surrogate (\ud800): not UTF-8
        raise ProtocolError("data is not valid UTF-8 (a lone surrogate)") from None
    if size > MAX_DATA:
        raise ProtocolError(f"data of {size} bytes (as JSON) is over {MAX_DATA}")
    return text


def check_data(data: object) -> dict[str, Any]:
    """A transaction's data: a JSON object of bounded size."""
    data_json(data)
    return data  # type: ignore[return-value]


def printable(text: object, limit: int = 300) -> str:
    """*text* from a peer or an action, cut to *limit* characters, with newlines and
    other control characters escaped (``\\n``, ``\\x1b``): it cannot forge an output line
    or drive a terminal."""
    text = str(text)[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_reply_to(value: object) -> str:
    """A coordinator's endpoint as a prepare names it (``tcp://HOST:PORT``; see
    :meth:`~eda.core.endpoint.Endpoint.from_peer`), as ZeroMQ takes it."""
    endpoint = Endpoint.from_peer(value)
    if endpoint is None:
        raise ProtocolError(f"bad coordinator endpoint {printable(value, 80)!r}")
    return endpoint.zmq


def check_outcome(value: object) -> str:
    if value not in (COMMIT, ABORT):
        raise ProtocolError("outcome must be 'commit' or 'abort'")
    return str(value)


def check_participants(value: object) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_PARTICIPANTS:
        raise ProtocolError(f"participants must be a list of 1-{MAX_PARTICIPANTS} names")
    names = [check_name(n, "participant name") for n in value]
    if len(set(names)) != len(names):
        raise ProtocolError("a participant is named twice")
    return names


def check_timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ProtocolError("timeout must be a number of seconds in (0, 3600]")
    return float(value)


# -- serving ----------------------------------------------------------------------------------
MAX_BATCH = 256  # requests in one message (its frames); more are dropped


class BatchService(Service):
    """A request service with group commit, batched messages and deferred replies.

    The replies to one drained batch are sent after *flush* () returned (the
    owner's journal fsync): whatever a reply promises is durable first, and
    one fsync covers the whole batch.  A message may carry several requests,
    one per frame (a :class:`Peer` sends what it has in one go); the replies
    to one asker go back together, one per frame, as one message.  A handler
    that returns ``{DEFER: True}`` answers later with :meth:`reply`, using
    :attr:`current` (the asking peer's envelope) and the request's rid, saved at the
    time; between :meth:`hold` and :meth:`release` those replies are gathered
    too.  :attr:`ahead`, when set, sees the whole batch first (to start its
    work in one go).  Replies that :attr:`lazy` accepts (acknowledgements
    nobody waits on) may linger up to :attr:`linger` seconds for the next
    batch, so that the two share one flush.
    """

    def __init__(
        self,
        daemon: Daemon,
        handlers: Mapping[str, Callable[[Any], Mapping[str, Any]]],
        *,
        flush: Callable[[], None],
    ) -> None:
        # a frame of the largest data, every character escaped as \\uXXXX, still arrives
        super().__init__(daemon, handlers, max_message=MAX_FRAME)
        self.flush = flush
        self.current: Envelope = ()
        self.ahead: Callable[[list[list[bytes]]], None] | None = None
        self.held: dict[Envelope, list[bytes]] | None = None
        self.lazy: Callable[[dict[str, Any]], bool] | None = None
        self.linger = 0.002
        self.waiting: dict[Envelope, list[bytes]] = {}
        self.lingering: Any = None  # the timer that sends lingering replies

    def drain(self) -> None:
        """Answer a batch of requests; one flush, then every reply of the batch."""
        requests: list[list[bytes]] = []
        for frames in received(self.sock, 256):
            envelope, bodies = split_envelope(frames)
            if len(bodies) > MAX_BATCH:
                self.daemon.dropped("request", ProtocolError(f"over {MAX_BATCH} requests"))
            requests += [[*envelope, body] for body in bodies[:MAX_BATCH]]
        if self.ahead is not None and len(requests) > 1:
            self.daemon.guarded("look-ahead", self.ahead, requests)
        urgent = False
        for *route, body in requests:
            identity = tuple(route)
            self.requests += 1
            self.current = identity
            reply = self.answer([body])
            if not reply.get(DEFER):
                self.waiting.setdefault(identity, []).append(self._encode(reply))
                urgent = urgent or self.lazy is None or not self.lazy(reply)
        if urgent:
            self.answer_waiting()
        elif self.waiting and self.lingering is None:
            self.lingering = self.daemon.after(self.linger, "replies", self.answer_waiting)

    def answer_waiting(self) -> None:
        """Flush, then send every reply waiting."""
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        waiting, self.waiting = self.waiting, {}
        if waiting:
            self.flush()
            self._send(waiting)

    def _encode(self, reply: Mapping[str, Any]) -> bytes:
        try:
            return encode(reply)
        except (ValueError, TypeError, RecursionError) as exc:  # a handler's bug
            self.daemon.limited("reply", f"cannot encode a reply: {exc}")
            return encode(error_reply(reply.get("rid"), EdaError("request failed")))

    def _send(self, out: Mapping[Envelope, list[bytes]]) -> None:
        for identity, replies in out.items():
            try:  # noqa: SIM105 (per reply: cheaper than contextlib.suppress)
                self.sock.send_multipart([*identity, *replies], zmq.NOBLOCK)
            except zmq.ZMQError:  # the client is gone or not reading
                pass

    def reply(self, identity: Envelope, rid: object, fields: Mapping[str, Any]) -> None:
        """Answer a deferred request (at :meth:`release`, if held)."""
        data = self._encode({**fields, "rid": rid, "ok": True})
        if self.held is not None:
            self.held.setdefault(identity, []).append(data)
        else:
            self._send({identity: [data]})

    def hold(self) -> None:
        """Gather deferred replies until :meth:`release` (one message per asker)."""
        if self.held is None:
            self.held = {}

    def release(self) -> None:
        held, self.held = self.held, None
        if held:
            self._send(held)


# -- asking ------------------------------------------------------------------------------------
Callback = Callable[[dict[str, Any] | None], None]


class Peer:
    """Requests to one endpoint from inside a daemon's loop, never blocking it.

    :meth:`ask` queues the request and returns at once; :meth:`flush` sends
    every queued request as one message (called at the end of the loop's
    turn by :class:`Peers`: one wake-up of the peer for many requests).  The
    callback gets the reply (``None`` when the peer refused it as malformed,
    never for silence: the caller's own timers decide when silence means
    "no").  Garbled replies and replies to forgotten requests are dropped.
    """

    _rids = itertools.count(1)

    def __init__(
        self,
        daemon: Daemon,
        endpoint: str,
        max_pending: int = 100_000,
        queued: Callable[[Peer], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.endpoint = endpoint
        self.max_pending = max_pending
        self.pending: dict[int, Callback] = {}
        self.outbox: list[bytes] = []
        self.queued = queued
        self.sock = daemon.socket(zmq.DEALER, max_message=1 << 20)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)  # a peer long gone: retries are dropped
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:  # an endpoint zmq refuses: no socket left behind
            daemon.close_socket(self.sock)
            raise ProtocolError(f"cannot connect to {printable(endpoint, 80)}: {exc}") from None
        daemon.watch(self.sock, f"replies from {endpoint}", self._drain)

    def ask(self, msg: dict[str, Any] | bytes, callback: Callback) -> int:
        """Queue *msg* (an object, or one already encoded, without its rid)."""
        rid = next(self._rids)
        if len(self.pending) >= self.max_pending:  # a peer that never answers: forget the oldest
            self.pending.pop(next(iter(self.pending)))
        self.pending[rid] = callback
        if isinstance(msg, bytes):  # encoded once for every participant: splice the rid in
            frame = b'{"rid":%d,%s' % (rid, msg[1:])
        else:
            msg["rid"] = rid
            frame = encode(msg)
        self.outbox.append(frame)
        if len(self.outbox) == 1:
            if self.queued is None:
                self.flush()
            else:
                self.queued(self)
        return rid

    def flush(self) -> None:
        """Send the queued requests, as few messages as :data:`MAX_BATCH` allows."""
        outbox, self.outbox = self.outbox, []
        for start in range(0, len(outbox), MAX_BATCH):
            try:  # noqa: SIM105 (per message)
                self.sock.send_multipart(outbox[start : start + MAX_BATCH], zmq.NOBLOCK)
            except zmq.ZMQError:  # unanswered: the caller's timers take it from there
                pass

    def forget(self, rid: int) -> None:
        self.pending.pop(rid, None)

    def _drain(self) -> None:
        for (frame,) in received(self.sock, multipart=False):
            try:
                reply = decode(frame)
            except ProtocolError as exc:
                self.daemon.dropped(f"reply from {self.endpoint}", exc)
                continue
            rid = reply.get("rid")
            callback = self.pending.pop(rid, None) if isinstance(rid, int) else None
            if callback is not None:
                self.daemon.guarded("reply", callback, reply)

    def close(self) -> None:
        self.pending.clear()
        self.daemon.close_socket(self.sock)


MAX_PEERS = 256  # endpoints with a socket open at once (the least recently used is closed)


class Peers:
    """One :class:`Peer` per endpoint, made when first needed; what they queue
    during a turn of the loop is sent at its end (or at :meth:`flush`).

    At most *max_peers* stay open: endpoints come from peers' messages (a
    prepare's ``reply_to``), and a flood of made-up ones must not use up the
    daemon's descriptors.  Closing one forgets its unanswered requests; the
    callers' timers take it from there, as for any silent peer.
    """

    def __init__(self, daemon: Daemon, max_peers: int = MAX_PEERS) -> None:
        self.daemon = daemon
        self.max_peers = max_peers
        self.by_endpoint: OrderedDict[str, Peer] = OrderedDict()
        self.dirty: list[Peer] = []

    def get(self, endpoint: str) -> Peer:
        peer = self.by_endpoint.get(endpoint)
        if peer is None:
            while len(self.by_endpoint) >= self.max_peers:
                _, old = self.by_endpoint.popitem(last=False)
                if old in self.dirty:
                    old.flush()
                    self.dirty.remove(old)
                old.close()
            peer = self.by_endpoint[endpoint] = Peer(self.daemon, endpoint, queued=self._queued)
        elif len(self.by_endpoint) > 1:
            self.by_endpoint.move_to_end(endpoint)
        return peer

    def _queued(self, peer: Peer) -> None:
        if not self.dirty:
            self.daemon.after(0, "send", self.flush)
        self.dirty.append(peer)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for peer in dirty:
            peer.flush()


# -- finding --------------------------------------------------------------------------------
def participant_service(name: str) -> str:
    """The registry service a participant registers as: ``txn-NAME``."""
    return f"txn-{name}".lower()


class Lookups:
    """Lookups by name run in one background thread, never in the daemon's loop.

    :meth:`get` answers at once: the endpoints known for a name (kept *ttl*
    seconds; a name not found, *miss_ttl* seconds), or ``None`` while a
    lookup of it is under way.  An answer past its *ttl* is still given
    while a fresh lookup runs (a known participant never waits on mDNS).
    A lookup that fails (*find* raises: no registry answered) changes
    nothing known: the endpoints found before stay in use, looked up again
    after *miss_ttl*; a name never found is answered ``[]`` with the failure
    in :attr:`failed` (a reason, never "not found").
    When a lookup ends, the daemon's loop is woken (a pipe it watches,
    :meth:`attach`) and *on_found* hears the names looked up since.  At
    most *max_pending* names wait for a lookup; more are answered "not
    found" at once (a flood of made-up names cannot grow the queue).
    """

    def __init__(
        self,
        find: Callable[[str], list[str]],
        *,
        ttl: float = 30.0,
        miss_ttl: float = 1.0,
        max_pending: int = 256,
    ) -> None:
        self.find = find
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self.max_pending = max_pending
        self.cache: dict[str, tuple[float, list[str]]] = {}
        self.pending: set[str] = set()  # queued or being looked up
        self.failed: dict[str, str] = {}  # name -> why its last lookup got no answer
        self.previous: dict[str, list[str]] = {}  # found, then declared stale: a fallback
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[str] = []
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self.on_found: Callable[[list[str]], None] | None = None

    def attach(self, daemon: Daemon, on_found: Callable[[list[str]], None]) -> None:
        """Have *daemon*'s loop call *on_found(names)* when lookups of *names* ended."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.on_found = on_found
        daemon.watch(self._wake_r, "lookups", self._woken)

    def get(self, name: str) -> list[str] | None:
        hit = self.cache.get(name)
        now = time.monotonic()
        if hit is not None and now - hit[0] < (self.ttl if hit[1] else self.miss_ttl):
            return hit[1]
        if name not in self.pending:
            if len(self.pending) >= self.max_pending:
                return hit[1] if hit is not None else []
            self.pending.add(name)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="txn-lookups", daemon=True)
                self._thread.start()
            self._queue.put(name)
        return hit[1] if hit is not None and hit[1] else None

    def stale(self, name: str) -> None:
        """Look *name* up afresh before using it again (an endpoint stopped answering);
        what was found stays the answer should that lookup get no answer."""
        hit = self.cache.pop(name, None)
        if hit is not None and hit[1] and len(self.previous) < 4 * self.max_pending:
            self.previous[name] = hit[1]

    def _run(self) -> None:
        while True:
            name = self._queue.get()
            if name is None:
                return
            found, failure = self._find(name)
            with self._lock:  # (close takes it too: never a write to a closed descriptor)
                self._store(name, found, failure)
                self.pending.discard(name)
                self._done.append(name)
                if self._wake_w >= 0:
                    with contextlib.suppress(OSError):  # full pipe: a wake-up is already due
                        os.write(self._wake_w, b"x")

    def _find(self, name: str) -> tuple[list[str], str | None]:
        """What *find* says of *name*, or why it could not say (the loop goes on)."""
        try:
            return list(self.find(name)), None
        except Exception as exc:
            return [], printable(exc, 200) or type(exc).__name__

    def _store(self, name: str, found: list[str], failure: str | None) -> None:
        now = time.monotonic()
        previous = self.previous.pop(name, None)
        if failure is None:
            self.failed.pop(name, None)
            self.cache[name] = (now, found)
            return
        if len(self.failed) < 4 * self.max_pending or name in self.failed:
            self.failed[name] = failure
        old = self.cache.get(name)
        known = old[1] if old is not None and old[1] else previous
        if known:  # keep what was found; look again after miss_ttl
            self.cache[name] = (now - self.ttl + self.miss_ttl, known)
        else:
            self.cache[name] = (now, [])

    def lookup_now(self, name: str) -> list[str]:
        """Look *name* up in the calling thread (a command), with the same rules."""
        hit = self.cache.get(name)
        if hit is None or time.monotonic() - hit[0] >= (self.ttl if hit[1] else self.miss_ttl):
            self._store(name, *self._find(name))
        return self.cache[name][1]

    def _woken(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        with self._lock:
            done, self._done = self._done, []
        if done and self.on_found is not None:
            self.on_found(done)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
        with self._lock:
            fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)


class Directory:
    """Endpoints by name: explicit ones, else what the registry or mDNS said (cached).

    *find* (name -> endpoints) is the lookup; by default the registry (or
    mDNS without one) through :func:`eda.core.registry.access.lookup`.  In a
    daemon (:meth:`attach`) lookups run in a background thread
    (:class:`Lookups`) and :meth:`endpoints` may answer ``None``: "being
    looked up, you will hear"; elsewhere (a command) they block.  Answers are
    kept *ttl* seconds, dropped at once by :meth:`stale` when an endpoint
    stops answering; a name not found is not looked up again for *miss_ttl*
    seconds.
    """

    def __init__(
        self,
        explicit: Mapping[str, Endpoint | str] | None = None,
        *,
        access: Any = None,
        find: Callable[[str], list[str]] | None = None,
        ttl: float = 30.0,
        miss_ttl: float = 1.0,
    ) -> None:
        self.explicit = {
            name: client_endpoint(where, f"peer {name}").zmq
            for name, where in (explicit or {}).items()
        }
        self.access = access
        self.lookups = Lookups(find or self._lookup, ttl=ttl, miss_ttl=miss_ttl)
        self.attached = False

    def _lookup(self, name: str) -> list[str]:
        if self.access is None:
            return []
        found = find_instances(participant_service(name), self.access)
        return [Endpoint(i.host, i.port).zmq for i in found]

    def attach(self, daemon: Daemon, on_found: Callable[[list[str]], None]) -> None:
        """Look up in the background from now on; *on_found* (in *daemon*'s loop) hears
        which names a lookup ended for."""
        self.lookups.attach(daemon, on_found)
        self.attached = True

    def endpoints(self, name: str) -> list[str] | None:
        """Where *name* is (``[]``: not found); ``None`` while it is being looked up."""
        if name in self.explicit:
            return [self.explicit[name]]
        if not self.attached:  # a command: just look
            return self.lookups.lookup_now(name)
        return self.lookups.get(name)

    def missing(self, name: str) -> str:
        """Why participant *name* has no endpoint: not found, or no registry answered."""
        failure = self.lookups.failed.get(name)
        if failure is not None:
            return f"participant {name} could not be looked up: {failure}"
        return f"participant {name} not found"

    def stale(self, name: str) -> None:
        self.lookups.stale(name)

    def close(self) -> None:
        self.lookups.close()


def find_instances(
    service: str, access: Any, keep: Callable[[Any], bool] = lambda _inst: True
) -> list[Any]:
    """The instances of *service* that *keep* accepts: the registry's; where it has
    none (daemons that announced themselves by mDNS before it started) or does not
    answer, what mDNS knows.

    Raises :class:`LookupFailed` when no registry answered and mDNS knows
    nothing either: that is no answer, not "not found".
    """
    from ..registry import access as reg
    from ..registry import serverless
    from ..registry.client import NoRegistry

    failure: EdaError | None = None
    try:
        found = [i for i in reg.lookup(service, access) if keep(i)]
    except NoRegistry:  # none known and mDNS off: nothing can be found
        return []
    except EdaError as exc:
        failure, found = exc, []
    if not found and not access.serverless and access.mdns:
        heard = serverless.lookup(service, False, access.interface)
        found = [i for i in heard if i.service == service and keep(i)]
    if not found and failure is not None:
        raise LookupFailed(str(failure))
    return found


def find_coordinators(access: Any, name: str | None = None) -> list[str]:
    """Endpoints of coordinators (the one called *name* only), from the registry or mDNS."""
    found = find_instances(
        COORDINATOR_SERVICE, access, lambda i: name is None or i.meta.get("name") == name
    )
    return [Endpoint(i.host, i.port).zmq for i in found]


class Registration:
    """Keeps a daemon registered under *service* while it runs.

    The work is :class:`~eda.core.presence.Presence`'s, as for eda-lb and
    ``eda-registry register``: with a registry, heartbeats from its thread,
    never from the daemon's loop (a stopped registry must not stall 2PC);
    without one, announced by mDNS (serverless mode) -- and, when that was
    for want of a registry, moved to one as soon as one answers, so that
    coordinators asking it find participants.  This class only says what a
    2PC daemon registers as.
    """

    def __init__(
        self,
        daemon: Daemon,
        service: str,
        port: int,
        access: Any,
        *,
        inst_id: str | None = None,
        meta: Mapping[str, str] | None = None,
        interval: float = 2.0,
    ) -> None:
        from ..presence import Presence
        from ..registry import access as reg

        record = reg.registration(
            service,
            port,
            inst_id=inst_id,
            meta=[f"{k}={v}" for k, v in (meta or {}).items()],
            interval=interval,
        )
        self.presence = Presence(access, record, log=daemon.log, warn=daemon.warn)
        self.inst = self.presence.start()

    @property
    def where(self) -> str:
        client = self.presence.client
        if self.presence.mode == "registry" and client is not None:
            return f"registry {client.registry_id}"
        return "mDNS" if self.presence.mode == "mdns" else "nothing"

    def close(self) -> None:
        self.presence.close()


def parse_peers(items: list[str] | tuple[str, ...]) -> dict[str, Endpoint]:
    """``NAME=tcp://HOST:PORT`` items as a dict (``--peer``); a malformed one is a
    :class:`UsageError` naming the option."""
    peers: dict[str, Endpoint] = {}
    for item in items:
        name, sep, endpoint = item.partition("=")
        if not sep:
            raise UsageError(f"bad peer {item[:80]!r}: use NAME=tcp://HOST:PORT")
        peers[check_name(name, "participant name")] = client_endpoint(endpoint, f"--peer {name}")
    return peers
