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
- A reply fits the client's UDP size (512 bytes, or what its EDNS OPT record
  offers): additional records go first, then answers, with the TC bit set
  so the client knows it was cut.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..mdns import DNSFormatError, _read_name, encode_name
from .model import Instance

DOMAIN = "service.eda"
TYPE_A, TYPE_SRV, TYPE_OPT, TYPE_ANY = 1, 33, 41, 255
CLASS_IN, CLASS_ANY = 1, 255
CLASSIC_UDP_SIZE, MAX_UDP_SIZE = 512, 4096
NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 3, 4, 5


@dataclass(frozen=True)
class Question:
    qid: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    raw: bytes  # the question section as received, echoed in the reply
    qclass: int = CLASS_IN
    udp_size: int = CLASSIC_UDP_SIZE  # the largest reply the client takes over UDP


def parse_query(packet: bytes) -> Question:
    if len(packet) < 12:
        raise DNSFormatError("short packet")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", packet)
    if flags & 0x8000:
        raise DNSFormatError("not a query")
    if qd != 1:
        raise DNSFormatError("expected exactly one question")
    name, offset = _read_name(packet, 12)
    if offset + 4 > len(packet):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", packet, offset)
    raw = packet[12 : offset + 4]
    udp_size = CLASSIC_UDP_SIZE
    if ar and not an and not ns:  # an EDNS OPT record may offer a larger size
        end = offset + 4
        if packet[end : end + 1] == b"\x00" and end + 5 <= len(packet):
            rtype, size = struct.unpack_from("!HH", packet, end + 1)
            if rtype == TYPE_OPT:
                udp_size = min(max(size, CLASSIC_UDP_SIZE), MAX_UDP_SIZE)
    return Question(qid, flags, name.rstrip(".").lower(), qtype, raw, qclass, udp_size)


def _rr(name: str, rtype: int, rdata: bytes, ttl: int = 0) -> bytes:
    return encode_name(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def _reply(q: Question, rcode: int, answers: list[bytes], extra: list[bytes]) -> bytes:
    flags = 0x8000 | 0x0400 | (q.flags & 0x7900) | rcode  # QR, AA, opcode and RD kept
    room = q.udp_size - 12 - len(q.raw)
    if sum(map(len, answers)) + sum(map(len, extra)) > room:
        extra = []  # additional records are the first to go
        kept = []
        for record in answers:
            if len(record) > room:
                flags |= 0x0200  # TC: the client may retry over TCP or with EDNS
                break
            kept.append(record)
            room -= len(record)
        answers = kept
    header = struct.pack("!HHHHHH", q.qid, flags, 1, len(answers), 0, len(extra))
    return header + q.raw + b"".join(answers) + b"".join(extra)


def format_error(packet: bytes) -> bytes | None:
    """A FORMERR reply to an unparsable query, or None when there is no header to answer."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    qid, flags = struct.unpack_from("!HH", packet)
    header = struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | FORMERR, 0, 0, 0, 0)
    return header


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

    def answer(self, packet: bytes) -> bytes | None:
        try:
            q = parse_query(packet)
        except (DNSFormatError, ValueError, IndexError, struct.error):
            return format_error(packet)
        if q.flags & 0x7800:
            return _reply(q, NOTIMP, [], [])
        if q.qclass not in (CLASS_IN, CLASS_ANY):
            return _reply(q, REFUSED, [], [])
        suffix = "." + DOMAIN
        if not q.name.endswith(suffix):
            return _reply(q, REFUSED, [], [])
        labels = [lb.lstrip("_") for lb in q.name[: -len(suffix)].split(".") if lb != "_tcp"]
        if len(labels) == 1:
            return self._service(q, labels[0])
        if len(labels) == 2:
            return self._instance(q, labels[1], labels[0])
        return _reply(q, NXDOMAIN, [], [])

    def _rotated(self, service: str, found: list[Instance]) -> list[Instance]:
        if not found:
            return found
        turn = self._turn.get(service, 0)
        self._turn[service] = turn + 1
        k = turn % len(found)
        return found[k:] + found[:k]

    def _service(self, q: Question, service: str) -> bytes:
        found = self.lookup(service)
        if found is None:
            return _reply(q, NXDOMAIN, [], [])
        found = self._rotated(service, found)
        answers: list[bytes] = []
        extra: list[bytes] = []
        if q.qtype in (TYPE_A, TYPE_ANY):
            seen = set()
            for inst in found:
                addr = _ipv4(inst.host)
                if addr is not None and addr not in seen:
                    seen.add(addr)
                    answers.append(_rr(q.name, TYPE_A, addr))
        if q.qtype in (TYPE_SRV, TYPE_ANY):
            for inst in found:
                target = f"{inst.id}.{inst.service}.{DOMAIN}"
                srv = struct.pack("!HHH", 1, inst.weight, inst.port) + encode_name(target)
                answers.append(_rr(q.name, TYPE_SRV, srv))
                addr = _ipv4(inst.host)
                if addr is not None:
                    extra.append(_rr(target, TYPE_A, addr))
        return _reply(q, NOERROR, answers, extra)

    def _instance(self, q: Question, service: str, inst_id: str) -> bytes:
        found = [i for i in self.lookup(service) or [] if i.id.lower() == inst_id]
        if not found:
            return _reply(q, NXDOMAIN, [], [])
        addr = _ipv4(found[0].host)
        answers = [_rr(q.name, TYPE_A, addr)] if addr and q.qtype in (TYPE_A, TYPE_ANY) else []
        return _reply(q, NOERROR, answers, [])
