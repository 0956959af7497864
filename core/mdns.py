"""A one-shot mDNS query (RFC 6762 section 5.1) without zeroconf.

Short-lived commands must not pay for starting a full mDNS stack and
browsing for a second.  A one-shot query is a plain DNS question sent from an
ephemeral port to 224.0.0.251:5353; responders answer it at once by unicast
(RFC 6762 section 6.7: a "legacy unicast" response, from port 5353, repeating
the query id), with the SRV, TXT and A records as additionals.  This module
builds that question and parses the answers.

Anyone on the LAN can send anything to the querier's port, so the parser is
strict: every length is checked against its record and the packet, names and
record counts are limited, and nothing but :class:`DNSFormatError` escapes.
Multicast loses packets (Wi-Fi drops 10% and more), so the question is asked
several times within the wait; each repeat carries the answers already heard
(RFC 6762 section 7.1, known-answer suppression), so responders that were
heard stay quiet.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_SRV = 1, 12, 16, 33

MAX_NAME = 255  # RFC 1035 section 2.3.4, in wire bytes
MAX_RECORDS = 512  # per packet; a 9000-byte packet holds fewer real ones
MAX_INSTANCES = 256  # per query: what one query can make a client remember
MAX_TXT_KEYS = 64
KNOWN_ANSWER_TTL = 4500  # RFC 6762 section 10: the usual PTR TTL; suppresses repeats


class DNSFormatError(ValueError):
    """A DNS packet could not be parsed."""


@dataclass
class Instance:
    """One DNS-SD service instance as resolved from answers."""

    name: str
    port: int = 0
    target: str = ""
    addresses: list[str] = field(default_factory=list)
    txt: dict[str, str] = field(default_factory=dict)
    responder: str = ""  # the address the answer came from

    def best_address(self) -> str:
        """The address to connect to: the responder's, else a non-loopback A record."""
        if self.responder:
            return self.responder
        non_loop = [a for a in self.addresses if not a.startswith("127.")]
        return (non_loop or self.addresses or [""])[0]


def _labels(name: str) -> list[str]:
    """The labels of *name*, split at dots that are not escaped (see :func:`_label`).

    A final unescaped dot (the root) ends the name; an escaped one is part of
    the last label.
    """
    labels, current, chars = [], "", iter(name)
    for ch in chars:
        if ch == "\\":
            current += next(chars, "")
        elif ch == ".":
            labels.append(current)
            current = ""
        else:
            current += ch
    return labels if current == "" and labels else [*labels, current]


def encode_name(name: str) -> bytes:
    out = b""
    for label in _labels(name):
        raw = label.encode()
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def build_query(
    name: str, qtype: int = TYPE_PTR, qid: int = 0, known: tuple[str, ...] = ()
) -> bytes:
    """A question for *name*; *known* instance names go in as known answers (PTR)."""
    qname = encode_name(name)
    answers = b"".join(
        b"\xc0\x0c"  # the question's name
        + struct.pack("!HHIH", TYPE_PTR, 1, KNOWN_ANSWER_TTL, len(target))
        + target
        for target in map(encode_name, known)
    )
    return (
        struct.pack("!HHHHHH", qid, 0, 1, len(known), 0, 0)
        + qname
        + struct.pack("!HH", qtype, 1)
        + answers
    )


def _label(raw: bytes) -> str:
    # a dot or backslash inside a label is escaped (RFC 4343), so no label
    # can pose as two and make one name equal to another
    return raw.decode(errors="replace").replace("\\", "\\\\").replace(".", "\\.")


def read_labels(packet: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """The raw labels of the name at *offset* and the offset after it.

    Bounds: every label inside the packet, compression pointers only backwards
    (so no loop), at most :data:`MAX_NAME` octets in all.  Shared by the
    one-shot mDNS parser and the registry's DNS responder.
    """
    labels: list[bytes] = []
    end = -1
    size = 1
    limit = offset  # each pointer must point before the last one: no loops
    while True:
        if offset >= len(packet):
            raise DNSFormatError("name runs past the packet")
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(packet):
                raise DNSFormatError("truncated pointer")
            target = ((length & 0x3F) << 8) | packet[offset + 1]
            if target >= limit:
                raise DNSFormatError("compression pointer does not point back")
            if end < 0:
                end = offset + 2
            limit = offset = target
            continue
        if length & 0xC0:
            raise DNSFormatError("bad label type")
        offset += 1
        if length == 0:
            break
        size += length + 1
        if size > MAX_NAME:
            raise DNSFormatError("name too long")
        if offset + length > len(packet):
            raise DNSFormatError("label runs past the packet")
        labels.append(packet[offset : offset + length])
        offset += length
    return tuple(labels), (end if end >= 0 else offset)


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    """The name at *offset* as text (labels escaped) and the offset after it."""
    labels, after = read_labels(packet, offset)
    return ".".join(map(_label, labels)) + ".", after


def _read_txt(packet: bytes, start: int, end: int) -> dict[str, str]:
    """TXT character strings between *start* and *end* as key=value pairs (RFC 6763 6.3)."""
    txt: dict[str, str] = {}
    pos = start
    while pos < end:
        size = packet[pos]
        pos += 1
        if pos + size > end:
            raise DNSFormatError("TXT string runs past its record")
        key, _, val = packet[pos : pos + size].decode(errors="replace").partition("=")
        pos += size
        key = key.lower()
        if key and key not in txt and len(txt) < MAX_TXT_KEYS:
            txt[key] = val  # RFC 6763 6.4: the first occurrence of a key wins
    return txt


def _read_rdata(packet: bytes, rtype: int, start: int, end: int) -> object:
    if rtype == TYPE_PTR:
        name, after = _read_name(packet, start)
        if after > end:
            raise DNSFormatError("PTR name runs past its record")
        return name
    if rtype == TYPE_SRV:
        if end - start < 7:
            raise DNSFormatError("short SRV record")
        _prio, _weight, port = struct.unpack_from("!HHH", packet, start)
        target, after = _read_name(packet, start + 6)
        if after > end:
            raise DNSFormatError("SRV target runs past its record")
        return (port, target.lower())
    if rtype == TYPE_TXT:
        return _read_txt(packet, start, end)
    if rtype == TYPE_A:
        if end - start != 4:
            raise DNSFormatError("A record is not 4 bytes")
        return socket.inet_ntoa(packet[start:end])
    return None


def parse_message(packet: bytes) -> tuple[int, list[tuple[str, int, object]]]:
    """The id of a response and its records as (name, type, value); a query has none."""
    if len(packet) < 12:
        raise DNSFormatError("short packet")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", packet)
    if not flags & 0x8000:
        return qid, []  # a query, not a response
    if qd > 16 or an + ns + ar > MAX_RECORDS:
        raise DNSFormatError("too many records")
    offset = 12
    for _ in range(qd):
        _, offset = _read_name(packet, offset)
        offset += 4
    records: list[tuple[str, int, object]] = []
    for _ in range(an + ns + ar):
        name, offset = _read_name(packet, offset)
        if offset + 10 > len(packet):
            raise DNSFormatError("truncated record")
        rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", packet, offset)
        offset += 10
        rdata_end = offset + rdlen
        if rdata_end > len(packet):
            raise DNSFormatError("truncated rdata")
        records.append((name.lower(), rtype, _read_rdata(packet, rtype, offset, rdata_end)))
        offset = rdata_end
    return qid, records


def parse_records(packet: bytes) -> list[tuple[str, int, object]]:
    """Every resource record of a response as (name, type, value)."""
    return parse_message(packet)[1]


def instances_from(records: list[tuple[str, int, object]], service_type: str) -> list[Instance]:
    """Assemble the instances of *service_type* named by PTR records."""
    stype = service_type.lower().rstrip(".") + "."
    by_name: dict[str, Instance] = {}
    hosts: dict[str, list[str]] = {}
    for name, rtype, value in records:
        if rtype == TYPE_PTR and name == stype and isinstance(value, str):
            if value.lower().endswith("." + stype) and len(by_name) < MAX_INSTANCES:
                by_name.setdefault(value.lower(), Instance(value))
        elif rtype == TYPE_A and isinstance(value, str):
            hosts.setdefault(name, []).append(value)
    for name, rtype, value in records:
        inst = by_name.get(name)
        if inst is None:
            continue
        if rtype == TYPE_SRV and isinstance(value, tuple):
            inst.port, inst.target = value[0], value[1]
        elif rtype == TYPE_TXT and isinstance(value, dict):
            inst.txt.update(value)
    for inst in by_name.values():
        inst.addresses = hosts.get(inst.target, [])[:8]
    return [i for i in by_name.values() if i.port]


def _encodable(name: str) -> bool:
    try:
        encode_name(name)
    except ValueError:
        return False  # e.g. a label with U+FFFD for bytes that were not UTF-8
    return True


def query_times(timeout: float) -> list[float]:
    """When to (re)send the question within *timeout*: up to 15 times, at least 10 ms apart.

    At 25% loss each way a question gets its answer back 56% of the time;
    15 tries miss once in 250,000.  Known answers keep the repeats quiet.
    """
    step = max(0.01, timeout / 15)
    count = max(1, min(15, int(timeout / step + 0.999)))
    return [i * step for i in range(count)]


def one_shot_query(
    service_type: str,
    *,
    interface: str | None = None,
    timeout: float = 0.25,
    settle: float = 0.05,
    expect: set[str] | None = None,
    on_asked: Callable[[], None] | None = None,
) -> list[Instance]:
    """Ask the LAN for instances of *service_type*; gather answers for *timeout* seconds.

    The question is repeated within the wait (RFC 6762 section 5.2), so a
    lost question or answer is made up for.  When every instance name in
    *expect* (for example the ones a cache remembers) has answered, it waits
    only *settle* more seconds for any newcomer, so a warm cache answers
    quickly while a subscriber the cache does not know yet is still heard.
    Only legacy unicast responses count: from port 5353, to this socket,
    repeating the id of one of the questions asked.  *on_asked* is called once
    the first question went out.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        if interface:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.bind((interface or "", 0))
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        found: dict[str, Instance] = {}
        qids: set[int] = set()
        waiting = {e.lower() for e in expect or ()}
        start = time.monotonic()
        deadline = start + timeout
        sends = [start + t for t in query_times(timeout)]
        while True:
            now = time.monotonic()
            if waiting and waiting <= found.keys():
                deadline = min(deadline, now + settle)
            if now >= deadline:
                break
            if sends and now >= sends[0]:
                sends.pop(0)
                qid = int.from_bytes(os.urandom(2), "big") or 1
                qids.add(qid)
                known = tuple(i.name for i in found.values() if _encodable(i.name))[:32]
                # no route yet, or a full buffer: the next repeat may go out
                with contextlib.suppress(OSError):
                    sock.sendto(
                        build_query(service_type, TYPE_PTR, qid, known), (MDNS_GROUP, MDNS_PORT)
                    )
                if on_asked is not None:
                    on_asked()
                    on_asked = None
                continue
            wake = min(deadline, sends[0]) if sends else deadline
            # poll(), not select(): the socket's number may be beyond select()'s 1024
            if not poller.poll(max(0.0, wake - now) * 1000):
                continue
            try:
                packet, (addr, port) = sock.recvfrom(9000)
                qid, records = parse_message(packet)
            except (OSError, DNSFormatError):
                continue
            if port != MDNS_PORT or qid not in qids:
                continue  # RFC 6762 sections 6.7 and 11: not an answer to us
            for inst in instances_from(records, service_type):
                if inst.name.lower() in found or len(found) < MAX_INSTANCES:
                    inst.responder = addr
                    found[inst.name.lower()] = inst
        return list(found.values())
    finally:
        sock.close()
