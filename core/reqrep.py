"""Request/reply between eda programs: JSON objects over ROUTER/DEALER.

A request is one frame holding one JSON object: ``{"op": ..., "rid": ...}``
plus the operation's fields.  The reply echoes ``rid`` and carries ``ok``
(with ``error`` and ``code``, an exit status, when false).  Every daemon
answers this way and every client asks this way, so the rules live here once:

- the server (:class:`Service`) validates each frame at the edge (size,
  JSON, a known ``op``, a ``rid`` safe to echo), hands it to the handler of
  its ``op``, and answers every request -- malformed, refused or failed --
  with exactly one reply; nothing a client sends ends the daemon;
- the server answers REQ and DEALER clients alike: each reply goes back
  with the envelope its request came with (:func:`split_envelope`);
- the client (:class:`Client`) finds its server (given, else cached with a
  TCP probe, else mDNS, and remembers what answered: the registry, bus and
  coordinator clients only say where to look), tags each request with a
  fresh ``rid``, waits at most a timeout, ignores stale or garbled replies,
  and fails over to the next endpoint it knows when one stops answering;
  one request never outlasts its overall deadline (:attr:`Client.total`),
  whatever it waits on: a probe, mDNS, a server, a refused handshake.

This module is about 600 lines on purpose: the client and the server are the
two halves of one protocol (framing, ``rid`` rules, error replies, the
envelope of REQ and DEALER peers), and a reader checking one half against
the other finds both here.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from . import cache, security, sockets
from .endpoint import Endpoint
from .errors import EdaError, ExitStatus, NotFoundError, ProtocolError, UsageError
from .sockets import new_socket

if TYPE_CHECKING:
    # the server half's daemon (and socket, for the probe) are imported where they are
    # used: a one-shot client (eda-lb call, eda-txn commit...) needs neither, and their
    # imports are a few per cent of its start-up (tests/test_startup.py)
    from .daemon import Daemon

MAX_MESSAGE = 65536  # bytes in one request; a bigger one drops its connection
MAX_RID = 2**63 - 1
MAX_RID_TEXT = 64
MAX_ANNOUNCED = 8  # servers found by mDNS that one request tries
MAX_HOPS = 16  # routing frames before a REQ's empty delimiter (one per proxy on the way)
ATTEMPTS = 3  # a request's overall deadline, in attempt timeouts, unless one is given
PROBE_TIMEOUT = 0.2  # s: the TCP connect that checks a cached or announced endpoint
# a reply's send flags as plain ints: send_multipart's enum arithmetic costs more than the send
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class RemoteError(EdaError):
    """The server refused a request; ``exit_code`` follows the server's code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = ExitStatus(code) if code in (1, 2, 3) else ExitStatus.ERROR


class NoServer(EdaError):
    """No server is known to ask."""


class Unavailable(EdaError):
    """Servers are known but none of them answered in time."""


# -- messages ------------------------------------------------------------------------------
# json.dumps with these arguments builds an encoder per call; one built once says the same
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(msg: Mapping[str, Any]) -> bytes:
    return _encode(msg).encode()


def decode(frame: bytes) -> dict[str, Any]:
    """A request or reply object; :class:`ProtocolError` when it is not one."""
    try:
        msg = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("malformed request: not JSON") from None
    except RecursionError:  # e.g. 64 KiB of '[': the decoder recurses per level
        raise ProtocolError("malformed request: JSON nested too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed request: not a JSON object")
    return msg


def decode_request(frame: bytes, ops: Collection[str]) -> dict[str, Any]:
    """*frame* as a JSON object whose ``op`` is one of *ops*."""
    msg = decode(frame)
    op = msg.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError(f"unknown operation {str(op)[:40]!r}")
    return msg


def request_id(msg: Mapping[str, Any]) -> int | str | None:
    """The request's ``rid`` if it is one a reply can safely echo, else None."""
    rid = msg.get("rid")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) and 0 <= rid <= MAX_RID:
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_RID_TEXT and rid.isprintable():
        return rid
    return None


def check_rid(msg: Mapping[str, Any]) -> None:
    """:class:`ProtocolError` when *msg* carries a ``rid`` no reply may echo."""
    if msg.get("rid") is not None and request_id(msg) is None:
        raise ProtocolError("malformed request: rid must be a small integer or short string")


def parse_request(frames: list[bytes], ops: Collection[str]) -> dict[str, Any]:
    """The request in the body *frames* of one message: a JSON object with an
    op in *ops* and a safe rid, else :class:`ProtocolError`."""
    if len(frames) != 1:
        raise ProtocolError("malformed request: expected one frame")
    msg = decode_request(frames[0], ops)
    check_rid(msg)
    return msg


def error_reply(rid: int | str | None, exc: Exception) -> dict[str, Any]:
    code = exc.exit_code if isinstance(exc, EdaError) else 1
    return {"rid": rid, "ok": False, "error": str(exc), "code": code}


def printable(text: str, limit: int = 300) -> str:
    """*text* cut to *limit* characters, control characters escaped (it came from a peer)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """*reply* when it says ok, else the matching exception."""
    if reply.get("ok"):
        return reply
    code = reply.get("code", 1)
    error = reply.get("error")
    message = printable(error if isinstance(error, str) else "request refused")
    if code == 3:
        raise NotFoundError(message)
    raise RemoteError(message, code if isinstance(code, int) else 1)


# -- server side ---------------------------------------------------------------------------
Envelope = tuple[bytes, ...]  # the frames a reply goes back with (see split_envelope)


def split_envelope(
    frames: list[bytes], kinds: Collection[bytes] = ()
) -> tuple[list[bytes], list[bytes]]:
    """(envelope, body) of a message a ROUTER socket received.

    The envelope is what the reply must start with, as in the zguide's
    servers: the sender's routing id and, from a REQ socket (directly, or
    through proxies that each add a routing id), every frame up to and
    including the empty delimiter.  A DEALER sends no delimiter: its envelope
    is its routing id alone.  So REQ and DEALER clients are answered alike.
    The delimiter is looked for among the first :data:`MAX_HOPS` frames, and
    never past a frame in *kinds* (those a protocol's messages start with),
    so that an empty frame inside a body is never taken for one; the last
    frame is always body (a DEALER's one empty request is answered as malformed).
    """
    for i in range(1, min(len(frames) - 1, MAX_HOPS + 1)):  # a delimiter has a body after it
        frame = frames[i]
        if frame == b"":
            return frames[: i + 1], frames[i + 1 :]
        if frame in kinds:
            break
    return frames[:1], frames[1:]


Handler = Callable[[Any], Mapping[str, Any]]


class Service:
    """Answers requests on a ROUTER socket of *daemon*, one reply per request.

    *handlers* maps each op to a function of the request that returns the
    reply's fields (``rid`` and ``ok`` are added).  *parse* turns the
    validated JSON object into what the handlers take (a typed request),
    raising an :class:`~eda.core.errors.EdaError` for what it refuses.
    What fails validation is counted as malformed (:meth:`Daemon.dropped`);
    an ``EdaError`` from a handler is a refusal on the merits; any other
    exception is a bug, warned about and answered as a failed request.
    One turn of the daemon's loop answers at most *batch* requests, then its
    other sockets have theirs: a daemon that also serves HTTP (eda-registry)
    takes a small batch, so that an HTTP request waits for one such batch at
    most, however many requests are queued.
    """

    def __init__(
        self,
        daemon: Daemon,
        handlers: Mapping[str, Handler],
        *,
        parse: Callable[[dict[str, Any]], Any] = lambda msg: msg,
        max_message: int = MAX_MESSAGE,
        batch: int | None = None,  # (None: the daemon's DRAIN_LIMIT)
    ) -> None:
        from .daemon import DRAIN_LIMIT, received

        self._received = received
        self.daemon = daemon
        self.handlers = dict(handlers)
        self.parse = parse
        self.batch = DRAIN_LIMIT if batch is None else batch
        self.requests = 0
        # secure mode: the public key (Z85) the request being answered came with, as the
        # CURVE handshake of its connection proved it ("" in plain mode): who is asking
        self.sender_key = ""
        self.sock = daemon.socket(zmq.ROUTER, max_message=max_message)
        daemon.watch(self.sock, "requests", self.drain)

    def pending(self) -> Iterator[list[bytes]]:
        """The requests waiting (a bounded batch); in secure mode each one's
        :attr:`sender_key` is set while it is answered (read from its frames,
        ZAP's User-Id, which only a frame received without copying carries)."""
        if security.active() is None:
            yield from self._received(self.sock, self.batch)
            return
        for frames in self._received(self.sock, self.batch, copy=False):
            self.sender_key = security.peer_key(frames[-1])
            yield [frame.bytes for frame in frames]
        self.sender_key = ""

    def drain(self) -> None:
        """Answer the requests waiting (a bounded batch)."""
        for frames in self.pending():
            self.requests += 1
            envelope, body = split_envelope(frames)
            reply = self.answer(body)
            try:
                data = encode(reply)
            except (ValueError, TypeError, RecursionError) as exc:  # a handler's bug
                self.daemon.limited("reply", f"cannot encode a reply: {exc}")
                data = encode(error_reply(None, EdaError("request failed")))
            with contextlib.suppress(zmq.ZMQError):  # the client is gone or not reading
                for frame in envelope:
                    self.sock.send(frame, _MORE)
                self.sock.send(data, _LAST)

    def answer(self, body: list[bytes]) -> dict[str, Any]:
        """The reply to one request (the frames after the envelope)."""
        rid = None
        try:
            msg = parse_request(body, self.handlers)
            rid = request_id(msg)
            req = self.parse(msg)
        except EdaError as exc:  # malformed, or a record the daemon refuses
            self.daemon.dropped("request", exc)
            return error_reply(rid, exc)
        try:
            reply = dict(self.handlers[msg["op"]](req))
        except EdaError as exc:  # refused on the merits (not found, wrong service...)
            return error_reply(rid, exc)
        except Exception as exc:  # a daemon survives any request; say what broke
            self.daemon.failures += 1
            self.daemon.limited("request", f"request failed: {type(exc).__name__}: {exc}"[:300])
            return error_reply(rid, EdaError(f"request failed: {type(exc).__name__}"))
        reply["rid"] = rid
        reply["ok"] = True
        return reply


# -- client side ---------------------------------------------------------------------------
# secure mode: the public key of each server endpoint, learned where the endpoint was
# (NAME@ENDPOINT given, a trusted announcement, the discovery cache); connections pin it
_pins: dict[Endpoint, bytes] = {}


def pin(endpoint: Endpoint, key: bytes) -> None:
    """Remember that the server at *endpoint* holds the public *key* (secure mode)."""
    _pins[endpoint] = key


def pinned_key(endpoint: Endpoint) -> bytes | None:
    """The public key pinned for *endpoint*, or None."""
    return _pins.get(endpoint)


def cache_entry(endpoint: Endpoint) -> str:
    """How *endpoint* is remembered in the discovery cache: ``KEY@tcp://...`` when pinned."""
    key = _pins.get(endpoint) if security.active() is not None else None
    return f"{key.decode()}@{endpoint.zmq}" if key else endpoint.zmq


def from_cache_entry(entry: str) -> Endpoint | None:
    """The endpoint of a :func:`cache_entry` this process may use (its key pinned), or None."""
    key, at, text = entry.rpartition("@")
    endpoint = Endpoint.from_peer(text) if text.startswith("tcp://") else None
    if endpoint is None:
        return None
    pinned, _ = security.admission(key if at else "")
    if pinned is None:
        return None
    if pinned:
        pin(endpoint, pinned)
    return endpoint


def given(value: Endpoint | str, what: str = "server", option: str = "") -> Endpoint:
    """An endpoint given by the user (*option*, default ``--WHAT``); in secure mode text
    names its key, ``NAME@tcp://HOST:PORT`` (pinned here), or the endpoint's key was
    pinned where it was found.  :class:`UsageError` otherwise."""
    active = security.active()
    option = option or f"--{what}"
    if active is not None and isinstance(value, str) and "@" in value:
        key, text = active.pinned(value, option=option)
        endpoint = client_endpoint(text, what)
        pin(endpoint, key)
        return endpoint
    endpoint = client_endpoint(value, what)
    if active is not None and endpoint not in _pins:
        active.pinned(endpoint.zmq, option=option)  # the usage error
    return endpoint


class Refused(EdaError):
    """A secure server refused this program's key (or the handshake failed): exit 1."""


def handshake_refusal(monitor: zmq.Socket[bytes] | None) -> str | None:
    """Why a secure handshake failed, from what *monitor* received so far, or None."""
    for event in sockets.monitor_events(monitor):
        why = security.handshake_failure(event.event, event.value)
        if why is not None:
            return why
    return None


def client_endpoint(value: Endpoint | str, what: str = "server") -> Endpoint:
    """*value* as an endpoint to connect to, or :class:`UsageError` naming *what* it is for.

    Text must be ``tcp://HOST:PORT`` (``tcp://[V6]:PORT``): the scheme tells an
    endpoint from a topic after ``--bus``; a wildcard host or port 0 is for
    binding only.
    """
    if isinstance(value, Endpoint):
        endpoint: Endpoint | None = value
        shown = value.zmq
    else:
        endpoint = Endpoint.from_peer(value) if value.startswith("tcp://") else None
        shown = value[:80] + ("..." if len(value) > 80 else "")
    if endpoint is None or endpoint.port == 0 or endpoint.host == "*":
        raise UsageError(f"bad {what} endpoint {shown!r}: use tcp://HOST:PORT (tcp://[V6]:PORT)")
    return endpoint


def tcp_reachable(endpoint: Endpoint | str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether *endpoint* accepts a TCP connection: a dead cached or announced
    endpoint then costs a refused connect, not a whole request timeout."""
    where = endpoint if isinstance(endpoint, Endpoint) else Endpoint.from_peer(endpoint)
    if where is None:
        return False
    import socket

    host, port = where.sockaddr
    try:
        # an ASCII name or address as bytes: its IDNA encoding (what getaddrinfo does to a
        # str) is the same, and the codec's import (stringprep, unicodedata) is not paid
        name = host.encode() if host.isascii() else host.encode("idna")
        # (create_connection hands the host to getaddrinfo, which takes bytes: not typeshed's)
        socket.create_connection((name, port), timeout).close()  # type: ignore[arg-type]
    except (OSError, ValueError):
        return False
    return True


class Client:
    """Requests to a server, found where its kind of server is, failing over as needed.

    Where servers are, in order (:meth:`candidates`, tried lazily, so that
    mDNS is asked only when the cheap sources failed):

    1. the endpoints given (``explicit``); with any given, nothing else is
       tried but what the servers themselves named (:attr:`learned`);
    2. else the endpoints that answered last time, under :attr:`cache_key` in
       the discovery cache, each checked with one TCP connect first (a dead
       entry costs a refused connect, not a request timeout);
    3. else what :meth:`discover` finds (by default a one-shot mDNS query for
       :attr:`service_type`), at most :data:`MAX_ANNOUNCED`, probed alike.

    What answered is remembered under :attr:`cache_key`.  When the server in
    use stops answering, the next request looks again (the cache, then
    mDNS) before giving up, unless :attr:`failover` is off (a request that
    must not be sent twice).

    Each server gets :attr:`timeout` to answer; a request as a whole -- every
    probe, mDNS query, attempt and wait for a secure handshake -- ends by its
    overall deadline, :attr:`total` seconds after it began (by default
    :data:`ATTEMPTS` attempt timeouts): looking again never starts the clock
    again, so a one-shot command that gives its ``--timeout`` as *total* ends
    by then, with one error, whatever the servers do.

    Subclasses say only where to look (the class
    attributes, or :meth:`discover`) and what to say when nothing answers
    (:meth:`none_found`, :meth:`none_answered`).  :attr:`request_frames` and
    :attr:`reply_frames` are the frames a protocol puts before the JSON
    object (eda-bus's kind frame).
    """

    what = "server"
    cache_key: str | None = None  # where the endpoints that answered are remembered
    service_type: str | None = None  # the mDNS service type servers announce
    failover = True  # after a timeout, try the next server (the request is idempotent)
    request_frames: tuple[bytes, ...] = ()
    reply_frames: tuple[bytes, ...] = ()

    def __init__(
        self,
        endpoints: Sequence[Endpoint | str] = (),
        *,
        timeout: float = 1.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        max_reply: int | None = None,
        use_mdns: bool = True,
        interface: str | None = None,
        discover_timeout: float = 0.15,
        total: float | None = None,
    ) -> None:
        self.security = security.active()
        # secure mode: a discovered server skipped, and why (untrusted key, or not secure)
        self.on_ignored: Callable[[Any, str], None] | None = None
        self.explicit = [self._given(e) for e in endpoints]
        self.timeout = timeout
        # the most one request takes in all (None: ATTEMPTS times its attempt timeout)
        self.total = total
        self._until = float("inf")  # the overall deadline of the request under way
        self.max_reply = max_reply
        self.use_mdns = use_mdns
        self.interface = interface
        self.discover_timeout = discover_timeout
        self.learned: list[Endpoint] = []  # servers named by servers that answered
        # endpoints from the cache or discovery that refused a TCP connect: a server
        # that is down, which must not pass for one that has nothing
        self.unreachable: list[Endpoint] = []
        self.current: Endpoint | None = None
        self._zctx = context
        self._sock: zmq.Socket[bytes] | None = None
        self._mon: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)

    def _given(self, value: Endpoint | str) -> Endpoint:
        return given(value, self.what)

    # -- where servers are ---------------------------------------------------------------
    def candidates(self, tried: set[Endpoint]) -> Iterator[Endpoint]:
        """Endpoints to try next, lazily, in the order of the class docstring."""
        yield from (e for e in self.explicit if e not in tried)
        yield from (e for e in self.learned if e not in tried)
        if self.explicit:
            return
        for endpoint in self.remembered():
            if endpoint not in tried and self.reachable(endpoint):
                yield endpoint
        # anyone can announce a server: one that does not even accept a TCP
        # connection costs a refused connect (or 0.2 s), not a request timeout,
        # and at most MAX_ANNOUNCED of them are tried
        announced = [e for e in self.discover() if e not in tried]
        for endpoint in announced[:MAX_ANNOUNCED]:
            if self.reachable(endpoint):
                yield endpoint

    def remembered(self) -> list[Endpoint]:
        """The endpoints that answered last time (well-formed ones only)."""
        if self.cache_key is None:
            return []
        found = (from_cache_entry(e) for e in cache.cached(self.cache_key))
        return [e for e in found if e is not None]

    def discover(self) -> list[Endpoint]:
        """Servers announced now: a one-shot mDNS query for :attr:`service_type`."""
        if not self.use_mdns or self.service_type is None:
            return []
        wait = min(self.discover_timeout, self._until - time.monotonic())
        if wait <= 0:
            return []
        from .discovery import find_once

        peers = find_once(self.service_type, interface=self.interface, timeout=wait)
        usable = []
        for peer in peers:
            endpoint = Endpoint.from_peer(peer.endpoint)
            if endpoint is None:
                continue
            key, why = security.admission(peer.key)
            if key is None:
                if self.on_ignored is not None:
                    self.on_ignored(peer, why)
                continue
            if key:
                pin(endpoint, key)
            usable.append(endpoint)
        return usable

    def reachable(self, endpoint: Endpoint) -> bool:
        """Whether *endpoint* accepts a TCP connection (else noted in :attr:`unreachable`)."""
        wait = min(PROBE_TIMEOUT, self._until - time.monotonic())
        if wait > 0 and tcp_reachable(endpoint, wait):
            return True
        if endpoint not in self.unreachable:
            self.unreachable.append(endpoint)
        return False

    def find(self) -> Endpoint:
        """The server to use, without a request: the first candidate (remembered when
        it was looked up) found by the overall deadline a request would have;
        :meth:`none_found` when there is none."""
        self._until = self._deadline(self.timeout)
        try:
            endpoint = next(self.candidates(set()), None)
        finally:
            self._until = float("inf")
        if endpoint is None:
            raise self.none_found()
        if not self.explicit and self.cache_key is not None:
            cache.remember(self.cache_key, [cache_entry(endpoint)])
        return endpoint

    # -- hooks ---------------------------------------------------------------------------
    def answered(self) -> None:
        """Called after :attr:`current` answered a request: remember it (first) and the
        servers it named, unless the endpoints were given."""
        if not self.explicit and self.cache_key is not None and self.current is not None:
            known = [self.current, *[e for e in self.learned if e != self.current]]
            cache.remember(self.cache_key, [cache_entry(e) for e in known])

    def none_found(self) -> EdaError:
        return NoServer(f"no {self.what} found; give its endpoint")

    def none_answered(self, tried: set[Endpoint]) -> EdaError:
        return Unavailable(f"no {self.what} answered (tried {listed(tried)})")

    # -- connection ----------------------------------------------------------------------
    def connect(self, endpoint: Endpoint) -> None:
        """Talk to *endpoint* from now on (a fresh socket: no stale replies)."""
        self.disconnect()
        if self._zctx is None:
            self._zctx = zmq.Context.instance()
        sock = new_socket(zmq.DEALER, context=self._zctx, max_message=self.max_reply)
        if self.security is not None:  # before connecting: no handshake event is missed
            self._mon = sock.get_monitor_socket(security.FAILURE_EVENTS)
        try:
            sockets.connect(sock, endpoint, _pins.get(endpoint))
        except zmq.ZMQError as exc:
            self._sock = sock
            self.disconnect()
            raise UsageError(f"bad {self.what} endpoint {endpoint.zmq!r}: {exc}") from None
        self._sock, self.current = sock, endpoint

    def disconnect(self) -> None:
        if self._mon is not None and self._sock is not None:
            self._sock.disable_monitor()
            self._mon.close(0)
        if self._sock is not None:
            self._sock.close()
        self._sock, self._mon, self.current = None, None, None

    def refused(self, why: str) -> Refused:
        """The error for a server that refused this key (:meth:`roundtrip`)."""
        key = self.security.public_key if self.security is not None else ""
        where = self.current.zmq if self.current is not None else "?"
        return Refused(f"the {self.what} at {where} {why} (eda-keys show: {key})")

    def close(self) -> None:
        """Close the socket; the context stays open for the rest of the process."""
        self.disconnect()

    # -- requests ------------------------------------------------------------------------
    def request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send *msg* and return the reply, failing over as needed.

        Each endpoint gets *timeout* seconds (default :attr:`timeout`), and the
        request ends by its overall deadline (:attr:`total`) whatever is left
        to try; a refusal raises (:func:`raise_for`); when no endpoint
        answers, :meth:`none_answered` (or :meth:`none_found` if none was known).
        """
        wait = self.timeout if timeout is None else timeout
        self._until = self._deadline(wait)
        try:
            return self._request(msg, wait)
        finally:
            self._until = float("inf")

    def _request(self, msg: dict[str, Any], wait: float) -> dict[str, Any]:
        tried: set[Endpoint] = set()
        candidates: Iterator[Endpoint] | None = None
        while True:
            if self._sock is None:
                if candidates is None:
                    candidates = self.candidates(tried)
                endpoint = next(candidates, None) if self._left() > 0 else None
                if endpoint is None:
                    raise self.none_answered(tried) if tried else self.none_found()
                self.connect(endpoint)
            assert self.current is not None
            reply = self.roundtrip(msg, min(wait, self._left()))
            if reply is not None:
                self.answered()
                return raise_for(reply)
            tried.add(self.current)
            self.disconnect()
            if not self.failover or self._left() <= 0:
                raise self.none_answered(tried)

    def _deadline(self, wait: float) -> float:
        """When a request whose attempts each wait *wait* must end, all included."""
        return time.monotonic() + (self.total if self.total is not None else ATTEMPTS * wait)

    def _left(self) -> float:
        """Seconds left before the overall deadline of the request under way."""
        return self._until - time.monotonic()

    def roundtrip(self, msg: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The reply to *msg* from the current endpoint, or None after *timeout*.

        Replies to earlier requests (a late answer) and garbled ones are skipped.
        Nothing here blocks past *timeout*: the request waits for room to be sent
        as it waits for its reply (a socket whose only connection failed its
        secure handshake has nowhere to queue it), and a refused handshake,
        reported by the socket monitor before or after the request went out, ends
        the wait at once (:class:`Refused`).
        """
        assert self._sock is not None
        rid = next(self._rids)
        frames = [*self.request_frames, encode({**msg, "rid": rid})]
        head = len(self.reply_frames)
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._mon is not None:
            poller.register(self._mon, zmq.POLLIN)
        unsent = True
        while True:
            why = handshake_refusal(self._mon)
            if why is not None:
                raise self.refused(why)
            if unsent:
                unsent = not self._send(frames)
                poller.modify(self._sock, zmq.POLLOUT if unsent else zmq.POLLIN)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._sock not in dict(poller.poll(int(left * 1000) + 1)) or unsent:
                continue
            frames_in = self._sock.recv_multipart()
            if len(frames_in) != head + 1 or tuple(frames_in[:head]) != self.reply_frames:
                continue  # not a reply (a bus's other messages), or garbled
            try:
                reply = decode(frames_in[head])
            except ProtocolError:
                continue
            if reply.get("rid") == rid:
                return reply

    def _send(self, frames: list[bytes]) -> bool:
        """Queue *frames* on the socket without waiting; False when there is no room."""
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True


def listed(endpoints: Iterable[Endpoint], limit: int = 0) -> str:
    """*endpoints* as ``tcp://`` text, sorted and comma-separated (the first *limit*)."""
    texts = sorted(e.zmq for e in endpoints)
    if limit and len(texts) > limit:
        return ", ".join(texts[:limit]) + ", ..."
    return ", ".join(texts)
