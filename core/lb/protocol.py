"""The eda-lb request/reply wire: multipart ZeroMQ messages, validated at the edge.

Every message is ``[TAG, type, *fields]`` (after a ROUTER's identity frame):

======  =====================================  ===============================
type    direction                              fields
======  =====================================  ===============================
``Q``   caller -> worker/broker, broker->worker  rid, timeout_ms, body
``R``   worker/broker -> caller                rid, status, body
``P``   caller -> worker/broker                seq
``O``   worker/broker -> caller                seq, load JSON
``S``   anyone -> worker/broker                (none)
``T``   reply to ``S``                         stats JSON object
``W``   worker -> broker backend               ready JSON
``H``   worker <-> broker                      (none)
``D``   worker -> broker, broker -> worker     (none)
======  =====================================  ===============================

A rid is 1..64 printable ASCII bytes chosen by the caller (the worker's
command sees it as ``EDA_REQUEST_ID``; a retry keeps it).  A status is
``ok``, ``err`` (body: one line saying what failed) or ``busy`` (retry
elsewhere).  :func:`parse` turns frames from a peer into a :class:`Message`
or raises :class:`ProtocolError`; it never raises anything else, whatever the
bytes.  A request whose body is over the limit raises :class:`TooLarge`,
which carries the rid so that the request gets its one ``err`` reply.

The hot path (``Q`` and ``R``) has its own lean parsers,
:func:`parse_request` and :func:`parse_reply`, that check the same rules.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import zmq
from zmq.backend import Socket as _Raw

from ..errors import ProtocolError

TAG = b"EDALB1"
REQUEST, REPLY, PING, PONG = b"Q", b"R", b"P", b"O"
STATS_QUERY, STATS, READY, HEARTBEAT, DISCONNECT = b"S", b"T", b"W", b"H", b"D"
OK, ERR, BUSY = b"ok", b"err", b"busy"
STATUSES = frozenset((OK, ERR, BUSY))

MAX_BODY = 1 << 20  # default request/reply body limit (--max-request)
MAX_RID = 64
MAX_JSON = 65536  # a load, stats or ready object
MAX_TIMEOUT_MS = 2**31 - 1
MAX_SEQ_DIGITS = 20
MAX_NUMBER = 2**31 - 1
MAX_CAPACITY = 1 << 20  # requests one worker may say it takes in flight (W capacity)

# number of fields after [TAG, type] for each type
ARITY = {
    REQUEST: 3,
    REPLY: 3,
    PING: 1,
    PONG: 2,
    STATS_QUERY: 0,
    STATS: 1,
    READY: 1,
    HEARTBEAT: 0,
    DISCONNECT: 0,
}
_PRINTABLE = bytes(range(0x20, 0x7F))


STATS_RATE = 50.0  # S answered per second at most (each costs a sort of the latencies)


class Budget:
    """At most *rate* events a second, in bursts of *rate* at most (a token bucket): a
    peer flooding queries that cost (S) is answered this often, the rest dropped."""

    def __init__(self, rate: float = STATS_RATE) -> None:
        self.rate, self.tokens, self.at = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class TooLarge(ProtocolError):
    """A well-formed request whose body is over the limit: answered with one ``err``."""

    def __init__(self, rid: bytes, size: int, limit: int) -> None:
        super().__init__(f"request too large ({size} bytes; the limit is {limit})")
        self.rid = rid


class Message(NamedTuple):
    """One validated message; the fields its type does not use keep their defaults."""

    kind: bytes
    rid: bytes = b""
    timeout_ms: int = 0
    status: bytes = b""
    body: bytes = b""
    seq: int = 0
    data: dict[str, Any] | None = None  # O: load, T: stats, W: ready


# -- building messages (the frames after a ROUTER's identity) ---------------------------------
def request(rid: bytes, timeout_ms: int, body: bytes) -> list[bytes]:
    return [TAG, REQUEST, rid, b"%d" % timeout_ms, body]


def reply(rid: bytes, status: bytes, body: bytes) -> list[bytes]:
    return [TAG, REPLY, rid, status, body]


def ping(seq: int) -> list[bytes]:
    return [TAG, PING, b"%d" % seq]


def pong(seq: int, inflight: int, concurrency: int, queued: int) -> list[bytes]:
    load = {"inflight": inflight, "concurrency": concurrency, "queued": queued}
    return [TAG, PONG, b"%d" % seq, _dumps(load)]


def stats_query() -> list[bytes]:
    return [TAG, STATS_QUERY]


def stats(figures: dict[str, Any]) -> list[bytes]:
    return [TAG, STATS, _dumps(figures)]


def ready(
    service: str, inst_id: str, concurrency: int, weight: int, capacity: int = 0
) -> list[bytes]:
    """A worker's W: *capacity* is how many requests it takes in flight at once (its
    slots, times the requests pipelined into each persistent process); 0: not said,
    *concurrency* then."""
    info = {"service": service, "id": inst_id, "concurrency": concurrency, "weight": weight}
    if capacity:
        info["capacity"] = capacity
    return [TAG, READY, _dumps(info)]


def heartbeat() -> list[bytes]:
    return [TAG, HEARTBEAT]


def disconnect() -> list[bytes]:
    return [TAG, DISCONNECT]


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


# -- the hot path: sending and receiving without pyzmq's per-call extras ---------------------
# pyzmq's send_multipart costs ~5 us for a five-frame message (flag enums, checks per frame);
# the backend's send with int flags ~1 us.  Every frame here is bytes, so nothing is lost.
_SEND, _RECV, _GET = _Raw.send, _Raw.recv, _Raw.get
_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SEND_SHARED: Callable[..., Any] = _Raw.send  # with its copy argument


def send(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """Send *frames* as one message without blocking (zmq.Again when it cannot go now)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _SEND(sock, frame, _MORE if i < last else _LAST)


def send_request(sock: zmq.Socket[bytes], rid: bytes, timeout_ms: bytes, body: bytes) -> None:
    """A ``Q`` on a DEALER (*timeout_ms* already as ASCII digits)."""
    _SEND(sock, TAG, _MORE)
    _SEND(sock, REQUEST, _MORE)
    _SEND(sock, rid, _MORE)
    _SEND(sock, timeout_ms, _MORE)
    _SEND(sock, body, _LAST)


def forward_request(
    sock: zmq.Socket[bytes], ident: bytes, rid: bytes, timeout_ms: bytes, body: bytes
) -> None:
    """A ``Q`` on a ROUTER, to the peer *ident* (a broker to a worker); a large body is
    shared with libzmq, not copied."""
    _SEND(sock, ident, _MORE)
    _SEND(sock, TAG, _MORE)
    _SEND(sock, REQUEST, _MORE)
    _SEND(sock, rid, _MORE)
    _SEND(sock, timeout_ms, _MORE)
    _SEND_SHARED(sock, body, _LAST, len(body) < 65536)


def send_reply(
    sock: zmq.Socket[bytes], ident: bytes | None, rid: bytes, status: bytes, body: bytes
) -> None:
    """An ``R``, after the ROUTER identity *ident* (None on a DEALER)."""
    if ident is not None:
        _SEND(sock, ident, _MORE)
    _SEND(sock, TAG, _MORE)
    _SEND(sock, REPLY, _MORE)
    _SEND(sock, rid, _MORE)
    _SEND(sock, status, _MORE)
    _SEND(sock, body, _LAST)


def recv(sock: zmq.Socket[bytes]) -> list[bytes]:
    """The next message's frames without blocking (zmq.Again when there is none).

    Safe on any socket: each frame says whether another follows (pyzmq's
    getsockopt(RCVMORE) costs ~1 us a frame through its option enum; a
    Frame's ``more`` does not).
    """
    frame = _RECV(sock, _LAST, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _RECV(sock, _LAST, False)
        frames.append(frame.bytes)
    return frames


def messages(
    sock: zmq.Socket[bytes], limit: int = 1000, max_bytes: int = 1 << 62
) -> Iterator[list[bytes]]:
    """The messages waiting on *sock*, at most *limit* (and about *max_bytes*), without
    blocking."""
    for _ in range(limit):
        if max_bytes <= 0:
            return
        try:
            msg = recv(sock)
        except zmq.Again:
            return
        max_bytes -= len(msg[-1])
        yield msg


# -- validating -----------------------------------------------------------------------------
def check_rid(rid: bytes) -> bytes:
    """*rid* if it is 1..64 printable ASCII bytes, else :class:`ProtocolError`."""
    if not 0 < len(rid) <= MAX_RID or rid.translate(None, _PRINTABLE):
        raise ProtocolError("bad request id: 1-64 printable ASCII characters")
    return rid


def _integer(frame: bytes, what: str, digits: int, limit: int) -> int:
    if not 0 < len(frame) <= digits or not frame.isdigit():
        raise ProtocolError(f"bad {what}: not a decimal integer")
    value = int(frame)
    if value > limit:
        raise ProtocolError(f"bad {what}: over {limit}")
    return value


def _head(frames: list[bytes], start: int) -> bytes:
    """The type of the message in *frames*[start:], its frame count checked."""
    if len(frames) < start + 2 or frames[start] != TAG:
        raise ProtocolError("not an eda-lb message (wrong protocol tag)")
    kind = frames[start + 1]
    arity = ARITY.get(kind)
    if arity is None:
        raise ProtocolError(f"unknown message type {kind[:8]!r}")
    if len(frames) - start - 2 != arity:
        raise ProtocolError(
            f"message {kind.decode()} has {len(frames) - start - 2} fields, expected {arity}"
        )
    return kind


def parse_request(
    frames: list[bytes], start: int = 0, max_body: int = MAX_BODY
) -> tuple[bytes, int, bytes]:
    """(rid, timeout_ms, body) of the ``Q`` message in *frames*[start:].

    :class:`ProtocolError` when it is not one; :class:`TooLarge` when only its body is too big.
    """
    if len(frames) - start != 5 or frames[start] != TAG or frames[start + 1] != REQUEST:
        _head(frames, start)  # says precisely what is wrong
        raise ProtocolError(f"expected a request, got {frames[start + 1].decode()}")
    rid = check_rid(frames[start + 2])
    timeout_ms = _integer(frames[start + 3], "timeout", 10, MAX_TIMEOUT_MS)
    body = frames[start + 4]
    if len(body) > max_body:
        raise TooLarge(rid, len(body), max_body)
    return rid, timeout_ms, body


def parse_reply(
    frames: list[bytes], start: int = 0, max_body: int = MAX_BODY
) -> tuple[bytes, bytes, bytes]:
    """(rid, status, body) of the ``R`` message in *frames*[start:], else :class:`ProtocolError`."""
    if len(frames) - start != 5 or frames[start] != TAG or frames[start + 1] != REPLY:
        _head(frames, start)
        raise ProtocolError(f"expected a reply, got {frames[start + 1].decode()}")
    rid = check_rid(frames[start + 2])
    status = frames[start + 3]
    if status not in STATUSES:
        raise ProtocolError(f"bad reply status {status[:8]!r}")
    body = frames[start + 4]
    if len(body) > max_body:
        raise ProtocolError(f"reply too large ({len(body)} bytes)")
    return rid, status, body


def _object(frame: bytes, what: str) -> dict[str, Any]:
    if len(frame) > MAX_JSON:
        raise ProtocolError(f"{what} too large ({len(frame)} bytes)")
    try:
        obj = json.loads(frame, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(f"bad {what}: not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"bad {what}: not a JSON object")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _count(obj: dict[str, Any], key: str, what: str, *, required: bool = True) -> int:
    value = obj.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NUMBER:
        raise ProtocolError(f"bad {what}: {key} must be an integer in 0..{MAX_NUMBER}")
    return value


def _load(frame: bytes) -> dict[str, Any]:
    obj = _object(frame, "load")
    return {k: _count(obj, k, "load") for k in ("inflight", "concurrency", "queued")}


def _ready(frame: bytes) -> dict[str, Any]:
    from ..registry.model import ID_RE, InvalidRecord, validate_name

    obj = _object(frame, "ready message")
    try:
        service = validate_name(obj.get("service"))
    except InvalidRecord as exc:
        raise ProtocolError(f"bad ready message: {exc}") from None
    inst_id = obj.get("id")
    if not isinstance(inst_id, str) or not ID_RE.fullmatch(inst_id):
        raise ProtocolError("bad ready message: id must be 1-63 letters, digits, '-' or '_'")
    concurrency = _count(obj, "concurrency", "ready message")
    weight = _count(obj, "weight", "ready message")
    capacity = _count(obj, "capacity", "ready message", required=False) or concurrency
    if concurrency < 1 or weight > 65535:
        raise ProtocolError("bad ready message: concurrency >= 1, weight in 0..65535")
    if not concurrency <= capacity <= MAX_CAPACITY:
        raise ProtocolError(f"bad ready message: capacity in concurrency..{MAX_CAPACITY}")
    return {
        "service": service, "id": inst_id, "concurrency": concurrency, "weight": weight,
        "capacity": capacity,
    }  # fmt: skip


def _stats(frame: bytes) -> dict[str, Any]:
    obj = _object(frame, "stats")
    if not _finite(obj, 0):
        raise ProtocolError("bad stats: nested too deeply or a non-finite number")
    return obj


def _finite(value: Any, depth: int) -> bool:
    if depth > 8:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v, depth + 1) for v in value)
    return True


def parse(frames: list[bytes], start: int = 0, max_body: int = MAX_BODY) -> Message:
    """The message in *frames*[start:] (*start* 1 after a ROUTER's identity), validated.

    Raises :class:`ProtocolError` (or its :class:`TooLarge`) and nothing else.
    """
    kind = _head(frames, start)
    f = frames[start + 2 :]
    if kind == REQUEST:
        rid, timeout_ms, body = parse_request(frames, start, max_body)
        return Message(kind, rid=rid, timeout_ms=timeout_ms, body=body)
    if kind == REPLY:
        rid, status, body = parse_reply(frames, start, max_body)
        return Message(kind, rid=rid, status=status, body=body)
    if kind == PING:
        return Message(kind, seq=_integer(f[0], "ping sequence", MAX_SEQ_DIGITS, 2**64 - 1))
    if kind == PONG:
        seq = _integer(f[0], "pong sequence", MAX_SEQ_DIGITS, 2**64 - 1)
        return Message(kind, seq=seq, data=_load(f[1]))
    if kind == STATS:
        return Message(kind, data=_stats(f[0]))
    if kind == READY:
        return Message(kind, data=_ready(f[0]))
    return Message(kind)  # S, H, D: no fields
