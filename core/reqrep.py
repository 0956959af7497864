"""Request/reply between eda programs: JSON objects over ROUTER/DEALER.

A request is one frame holding one JSON object: ``{"op": ..., "rid": ...}``
plus the operation's fields.  The reply echoes ``rid`` and carries ``ok``
(with ``error`` and ``code``, an exit status, when false).  Every daemon
answers this way and every client asks this way, so the rules live here once:

- the server (:class:`Service`) validates each frame at the edge (size,
  JSON, a known ``op``, a ``rid`` safe to echo), hands it to the handler of
  its ``op``, and answers every request -- malformed, refused or failed --
  with exactly one reply; nothing a client sends ends the daemon;
- the client (:class:`Client`) tags each request with a fresh ``rid``, waits
  at most a timeout, ignores stale or garbled replies, and fails over to the
  next endpoint it knows when one stops answering.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import zmq

from .daemon import Daemon, received
from .errors import EdaError, ExitStatus, NotFoundError, ProtocolError, UsageError
from .sockets import new_socket

MAX_MESSAGE = 65536  # bytes in one request; a bigger one drops its connection
MAX_RID = 2**63 - 1
MAX_RID_TEXT = 64
MAX_HOPS = 16  # routing frames before a REQ's empty delimiter (one per proxy on the way)


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
def encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


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
    """

    def __init__(
        self,
        daemon: Daemon,
        handlers: Mapping[str, Handler],
        *,
        parse: Callable[[dict[str, Any]], Any] = lambda msg: msg,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.daemon = daemon
        self.handlers = dict(handlers)
        self.parse = parse
        self.requests = 0
        self.sock = daemon.socket(zmq.ROUTER, max_message=max_message)
        daemon.watch(self.sock, "requests", self.drain)

    def drain(self) -> None:
        """Answer the requests waiting (a bounded batch)."""
        for frames in received(self.sock):
            self.requests += 1
            envelope, body = split_envelope(frames)
            reply = self.answer(body)
            try:
                data = encode(reply)
            except (ValueError, TypeError, RecursionError) as exc:  # a handler's bug
                self.daemon.limited("reply", f"cannot encode a reply: {exc}")
                data = encode(error_reply(None, EdaError("request failed")))
            with contextlib.suppress(zmq.ZMQError):  # the client is gone or not reading
                self.sock.send_multipart([*envelope, data], zmq.NOBLOCK)

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
def check_endpoint(endpoint: str, what: str = "server") -> str:
    """*endpoint* if it looks like tcp://HOST:PORT, else :class:`UsageError`."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if (
        not endpoint.startswith("tcp://")
        or not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port[:6]) < 65536
        or len(endpoint) > 300
        or not endpoint.isprintable()
    ):
        raise UsageError(f"bad {what} endpoint {endpoint!r}: use tcp://HOST:PORT")
    return endpoint


def tcp_reachable(endpoint: str, timeout: float = 0.2) -> bool:
    """Whether *endpoint* accepts a TCP connection: a dead cached or announced
    endpoint then costs a refused connect, not a whole request timeout."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


class Client:
    """Requests to one of several servers, moving on when one stops answering.

    Subclasses say where servers are by overriding :meth:`candidates` (tried
    lazily, in order, so an expensive source such as mDNS is asked only
    when the cheap ones failed), and may override :meth:`answered` (e.g. to
    cache the endpoint that answered), :meth:`connect`, :meth:`none_found`
    and :meth:`none_answered`.  :attr:`what` names the server in messages.
    """

    what = "server"

    def __init__(
        self,
        endpoints: list[str] | tuple[str, ...] = (),
        *,
        timeout: float = 1.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        max_reply: int | None = None,
    ) -> None:
        self.explicit = [check_endpoint(e, self.what) for e in endpoints]
        self.timeout = timeout
        self.max_reply = max_reply
        self.current: str | None = None
        self._zctx = context
        self._sock: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)

    # -- hooks ---------------------------------------------------------------------------
    def candidates(self, tried: set[str]) -> Iterator[str]:
        """Endpoints to try next, lazily; by default the explicit ones."""
        yield from (e for e in self.explicit if e not in tried)

    def answered(self) -> None:
        """Called after :attr:`current` answered a request."""

    def none_found(self) -> EdaError:
        return NoServer(f"no {self.what} found; give its endpoint")

    def none_answered(self, tried: set[str]) -> EdaError:
        return Unavailable(f"no {self.what} answered (tried {', '.join(sorted(tried))})")

    # -- connection ----------------------------------------------------------------------
    def connect(self, endpoint: str) -> None:
        """Talk to *endpoint* from now on (a fresh socket: no stale replies)."""
        self.disconnect()
        if self._zctx is None:
            self._zctx = zmq.Context.instance()
        sock = new_socket(zmq.DEALER, context=self._zctx, max_message=self.max_reply)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise UsageError(f"bad {self.what} endpoint {endpoint!r}: {exc}") from None
        self._sock, self.current = sock, endpoint

    def disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self.current = None, None

    def close(self) -> None:
        """Close the socket; the context stays open for the rest of the process."""
        self.disconnect()

    # -- requests ------------------------------------------------------------------------
    def request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send *msg* and return the reply, failing over as needed.

        Each endpoint gets *timeout* seconds (default :attr:`timeout`); a
        refusal raises (:func:`raise_for`); when no endpoint answers,
        :meth:`none_answered` (or :meth:`none_found` if none was known).
        """
        tried: set[str] = set()
        candidates: Iterator[str] | None = None
        while True:
            if self._sock is None:
                if candidates is None:
                    candidates = self.candidates(tried)
                endpoint = next(candidates, None)
                if endpoint is None:
                    raise self.none_answered(tried) if tried else self.none_found()
                self.connect(endpoint)
            assert self.current is not None
            reply = self.roundtrip(msg, self.timeout if timeout is None else timeout)
            if reply is not None:
                self.answered()
                return raise_for(reply)
            tried.add(self.current)
            self.disconnect()

    def roundtrip(self, msg: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The reply to *msg* from the current endpoint, or None after *timeout*.

        Replies to earlier requests (a late answer) and garbled ones are skipped.
        """
        assert self._sock is not None
        rid = next(self._rids)
        self._sock.send(encode({**msg, "rid": rid}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                return None
            try:
                reply = decode(self._sock.recv())
            except ProtocolError:
                continue
            if reply.get("rid") == rid:
                return reply
