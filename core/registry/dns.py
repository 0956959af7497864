"""A small authoritative DNS responder for ``NAME.service.eda`` (the DNS interface).

Answers A and SRV questions from the registry's healthy instances, in the
spirit of Consul's DNS interface, so any program that can resolve a name
can find a service: ``dig @127.0.0.1 -p 8600 orders.service.eda SRV``.

- ``NAME.service.eda`` (also ``_NAME._tcp.service.eda``): A records of the
  instances' addresses, SRV records with their ports and weights; the order
  rotates between queries (round-robin DNS load balancing).
- ``ID.NAME.service.eda``: the A record of one instance (SRV targets).
- TTL 0, so health changes take effect at once.
- Unknown names get NXDOMAIN, known names without a healthy instance an
  empty answer, names outside ``service.eda`` or classes other than IN
  REFUSED, malformed packets FORMERR (or nothing when even the header is
  missing).
- Names in answers are compressed (RFC 1035 4.1.4): an owner name is a
  pointer to the question, an additional A record's name a pointer into the
  SRV target it resolves.  SRV targets themselves are written in full, as
  RFC 2782 asks.
- Over UDP a reply fits the client's size (512 bytes, or what its EDNS OPT
  record offers): answers that do not fit are left out with the TC bit set,
  and the client retries over TCP (RFC 7766), where a reply may take 64 KiB.
  :class:`TcpConnections` serves that side: length-prefixed queries, several
  per connection, with bounded connections, buffers and idle time.

Hand-written rather than dnslib/dnspython: the responder needs four record
types and one compressor, a parser whose every bound is visible here, and no
new dependency for every eda install.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..mdns import DNSFormatError, read_labels
from .model import Instance

DOMAIN = "service.eda"
TYPE_A, TYPE_SRV, TYPE_OPT, TYPE_ANY = 1, 33, 41, 255
CLASS_IN, CLASS_ANY = 1, 255
CLASSIC_UDP_SIZE, MAX_UDP_SIZE, MAX_TCP_SIZE = 512, 4096, 65535
NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 3, 4, 5


@dataclass(frozen=True)
class Question:
    qid: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    labels: tuple[bytes, ...]  # as received, re-encoded without pointers in the reply
    qclass: int = CLASS_IN
    udp_size: int = CLASSIC_UDP_SIZE  # the largest reply the client takes over UDP


read_name = read_labels  # bounds-checked in one place: core/mdns.py


def _text(labels: tuple[bytes, ...]) -> str:
    return ".".join(lb.decode("ascii", errors="replace") for lb in labels).lower()


def parse_query(packet: bytes) -> Question:
    if len(packet) < 12:
        raise DNSFormatError("short packet")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", packet)
    if flags & 0x8000:
        raise DNSFormatError("not a query")
    if qd != 1:
        raise DNSFormatError("expected exactly one question")
    labels, offset = read_name(packet, 12)
    if offset + 4 > len(packet):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", packet, offset)
    udp_size = CLASSIC_UDP_SIZE
    if ar and not an and not ns:  # an EDNS OPT record may offer a larger size
        end = offset + 4
        if packet[end : end + 1] == b"\x00" and end + 5 <= len(packet):
            rtype, size = struct.unpack_from("!HH", packet, end + 1)
            if rtype == TYPE_OPT:
                udp_size = min(max(size, CLASSIC_UDP_SIZE), MAX_UDP_SIZE)
    return Question(qid, flags, _text(labels), qtype, labels, qclass, udp_size)


QUESTION_NAME = 12  # where the question's name starts: the target of owner pointers


@dataclass
class _Message:
    """A reply being written, with name compression and a size limit."""

    limit: int
    buf: bytearray = field(default_factory=bytearray)
    names: dict[tuple[str, ...], int] = field(default_factory=dict)  # suffix -> offset

    def _remember(self, labels: tuple[str, ...], offsets: list[int]) -> None:
        for i, offset in enumerate(offsets):
            key = tuple(lb.lower() for lb in labels[i:])
            if offset < 0x4000 and key not in self.names:
                self.names[key] = offset

    def name(self, labels: tuple[str, ...], compress: bool = True) -> None:
        offsets: list[int] = []
        for i in range(len(labels)):
            pointer = self.names.get(tuple(lb.lower() for lb in labels[i:])) if compress else None
            if pointer is not None:
                self._remember(labels, offsets)
                self.buf += struct.pack("!H", 0xC000 | pointer)
                return
            offsets.append(len(self.buf))
            raw = labels[i].encode()
            self.buf += bytes([len(raw)]) + raw
        self.buf += b"\x00"
        self._remember(labels, offsets)

    def record(
        self,
        owner: tuple[str, ...] | None,
        rtype: int,
        rdata: bytes,
        target: tuple[str, ...] | None = None,
    ) -> bool:
        """Append one record (owner None: the question's name); False if it does not fit."""
        mark, names = len(self.buf), dict(self.names)
        if owner is None:
            self.buf += struct.pack("!H", 0xC000 | QUESTION_NAME)
        else:
            self.name(owner)
        self.buf += struct.pack("!HHIH", rtype, CLASS_IN, 0, 0)
        start = len(self.buf)
        self.buf += rdata
        if target is not None:
            self.name(target, compress=False)  # RFC 2782: SRV targets are not compressed
        struct.pack_into("!H", self.buf, start - 2, len(self.buf) - start)
        if len(self.buf) > self.limit:
            del self.buf[mark:]
            self.names = names
            return False
        return True


@dataclass
class _Record:
    owner: tuple[str, ...] | None
    rtype: int
    rdata: bytes
    target: tuple[str, ...] | None = None


def _reply(
    q: Question, rcode: int, answers: list[_Record], extra: list[_Record], limit: int
) -> bytes:
    flags = 0x8000 | 0x0400 | (q.flags & 0x7900) | rcode  # QR, AA, opcode and RD kept
    msg = _Message(limit)
    msg.buf += b"\x00" * 12
    for label in q.labels:
        msg.buf += bytes([len(label)]) + label
    msg.buf += b"\x00" + struct.pack("!HH", q.qtype, q.qclass)
    an = ar = 0
    for rec in answers:
        if not msg.record(rec.owner, rec.rtype, rec.rdata, rec.target):
            flags |= 0x0200  # TC: the client may retry over TCP or with EDNS
            extra = []  # additional records are the first to go
            break
        an += 1
    for rec in extra:
        if not msg.record(rec.owner, rec.rtype, rec.rdata, rec.target):
            break  # a partial additional section needs no TC (RFC 2181 9)
        ar += 1
    struct.pack_into("!HHHHHH", msg.buf, 0, q.qid, flags, 1, an, 0, ar)
    return bytes(msg.buf)


def format_error(packet: bytes) -> bytes | None:
    """A FORMERR reply to an unparsable query, or None when there is no header to answer."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    qid, flags = struct.unpack_from("!HH", packet)
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | FORMERR, 0, 0, 0, 0)


def _ipv4(host: str) -> bytes | None:
    try:
        return socket.inet_aton(host) if host.count(".") == 3 else None
    except OSError:
        return None


class Responder:
    """Answers questions from *lookup* (service name -> healthy instances, or None if unknown)."""

    def __init__(self, lookup: Callable[[str], list[Instance] | None]) -> None:
        self.lookup = lookup
        self._turn: dict[str, int] = {}

    def answer(self, packet: bytes, tcp: bool = False) -> bytes | None:
        """The reply to *packet* (None: nothing to answer); never raises on bad input."""
        try:
            q = parse_query(packet)
        except (DNSFormatError, struct.error):
            return format_error(packet)
        limit = MAX_TCP_SIZE if tcp else q.udp_size
        if q.flags & 0x7800:
            return _reply(q, NOTIMP, [], [], limit)
        if q.qclass not in (CLASS_IN, CLASS_ANY):
            return _reply(q, REFUSED, [], [], limit)
        suffix = "." + DOMAIN
        if not q.name.endswith(suffix):
            return _reply(q, REFUSED, [], [], limit)
        labels = [lb.lstrip("_") for lb in q.name[: -len(suffix)].split(".") if lb != "_tcp"]
        if len(labels) == 1:
            return self._service(q, labels[0], limit)
        if len(labels) == 2:
            return self._instance(q, labels[1], labels[0], limit)
        return _reply(q, NXDOMAIN, [], [], limit)

    def _rotated(self, service: str, found: list[Instance]) -> list[Instance]:
        if not found:
            return found
        turn = self._turn.get(service, 0)
        self._turn[service] = turn + 1
        k = turn % len(found)
        return found[k:] + found[:k]

    def _service(self, q: Question, service: str, limit: int) -> bytes:
        found = self.lookup(service)
        if found is None:
            return _reply(q, NXDOMAIN, [], [], limit)
        found = self._rotated(service, found)
        answers: list[_Record] = []
        extra: list[_Record] = []
        if q.qtype in (TYPE_A, TYPE_ANY):
            seen = set()
            for inst in found:
                addr = _ipv4(inst.host)
                if addr is not None and addr not in seen:
                    seen.add(addr)
                    answers.append(_Record(None, TYPE_A, addr))
        if q.qtype in (TYPE_SRV, TYPE_ANY):
            for inst in found:
                target = (inst.id, inst.service, *DOMAIN.split("."))
                srv = struct.pack("!HHH", 1, inst.weight, inst.port)
                answers.append(_Record(None, TYPE_SRV, srv, target))
                addr = _ipv4(inst.host)
                if addr is not None:
                    extra.append(_Record(target, TYPE_A, addr))
        return _reply(q, NOERROR, answers, extra, limit)

    def _instance(self, q: Question, service: str, inst_id: str, limit: int) -> bytes:
        found = [i for i in self.lookup(service) or [] if i.id.lower() == inst_id]
        if not found:
            return _reply(q, NXDOMAIN, [], [], limit)
        addr = _ipv4(found[0].host)
        answers = [_Record(None, TYPE_A, addr)] if addr and q.qtype in (TYPE_A, TYPE_ANY) else []
        return _reply(q, NOERROR, answers, [], limit)


# -- DNS over TCP (RFC 1035 4.2.2, RFC 7766) ----------------------------------------------------
MAX_TCP_CONNECTIONS = 64
TCP_IDLE_SECONDS = 10.0  # the default of --dns-idle
MAX_TCP_PENDING = 256 * 1024  # reply bytes a client has not read yet


@dataclass
class _Conn:
    sock: socket.socket
    last: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)


class TcpConnections:
    """The TCP side of the DNS interface, driven by the server's poll loop.

    *watch(fd, readable, writable)* (un)registers a descriptor with the loop's
    poller (both False: forget it).  Each connection may send several queries
    (two-byte length prefix each).  Bounds: :data:`MAX_TCP_CONNECTIONS` (the
    least recently active one makes room for a new one), an idle timeout (*idle*
    seconds), and
    :data:`MAX_TCP_PENDING` bytes of unread replies, past which the connection
    is closed.
    """

    def __init__(
        self,
        listener: socket.socket,
        responder: Responder,
        watch: Callable[[int, bool, bool], None],
        clock: Callable[[], float] = time.monotonic,
        idle: float = TCP_IDLE_SECONDS,
    ) -> None:
        self.listener = listener
        self.idle = idle
        self.responder = responder
        self.watch = watch
        self.clock = clock
        self.conns: dict[int, _Conn] = {}
        listener.setblocking(False)
        watch(listener.fileno(), True, False)

    def ready(self, fd: int, events: int, pollin: int, pollout: int) -> bool:
        """Handle poll *events* on *fd* if it is ours; True when it was."""
        if fd == self.listener.fileno():
            self._accept()
            return True
        conn = self.conns.get(fd)
        if conn is None:
            return False
        if events & pollin:
            self._read(fd, conn)
        if fd in self.conns and events & pollout:
            self._flush(fd, conn)
        return True

    def _accept(self) -> None:
        for _ in range(MAX_TCP_CONNECTIONS):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.conns) >= MAX_TCP_CONNECTIONS:
                oldest = min(self.conns, key=lambda k: self.conns[k].last)
                self._close(oldest)
            sock.setblocking(False)
            self.conns[sock.fileno()] = _Conn(sock, self.clock())
            self.watch(sock.fileno(), True, False)

    def _read(self, fd: int, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        conn.last = self.clock()
        conn.inbuf += data
        while len(conn.inbuf) >= 2:
            size = struct.unpack_from("!H", conn.inbuf)[0]
            if len(conn.inbuf) < 2 + size:
                break
            query = bytes(conn.inbuf[2 : 2 + size])
            del conn.inbuf[: 2 + size]
            reply = self.responder.answer(query, tcp=True)
            if reply is not None:
                conn.outbuf += struct.pack("!H", len(reply)) + reply
        if len(conn.outbuf) > MAX_TCP_PENDING:
            self._close(fd)  # asks and never reads: it gets no more of our memory
            return
        self._flush(fd, conn)

    def _flush(self, fd: int, conn: _Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(fd)
                return
            del conn.outbuf[:sent]
            if sent:
                conn.last = self.clock()
        self.watch(fd, True, bool(conn.outbuf))

    def expire(self) -> None:
        """Close connections idle for longer than *idle* seconds."""
        now = self.clock()
        for fd in [k for k, c in self.conns.items() if now - c.last > self.idle]:
            self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            self.watch(fd, False, False)
            with contextlib.suppress(OSError):
                conn.sock.close()

    def close(self) -> None:
        for fd in list(self.conns):
            self._close(fd)
        self.watch(self.listener.fileno(), False, False)
        self.listener.close()
