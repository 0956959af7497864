"""A one-shot mDNS query (RFC 6762 section 5.1) without zeroconf.

Short-lived commands must not pay for starting a full mDNS stack and
browsing for a second.  A one-shot query is a plain DNS question sent from an
ephemeral port to 224.0.0.251:5353; responders answer it at once by unicast
(no 20-120 ms multicast delay), with the SRV, TXT and A records as
additionals.  This module builds that question and parses the answers.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_SRV = 1, 12, 16, 33


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


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode()
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def build_query(name: str, qtype: int = TYPE_PTR, qid: int = 0) -> bytes:
    return (
        struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0)
        + encode_name(name)
        + struct.pack("!HH", qtype, 1)
    )


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        if offset >= len(packet):
            raise DNSFormatError("name runs past the packet")
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(packet):
                raise DNSFormatError("truncated pointer")
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | packet[offset + 1]
            jumps += 1
            if jumps > 32:
                raise DNSFormatError("compression loop")
            continue
        if length & 0xC0:
            raise DNSFormatError("bad label type")
        offset += 1
        if length == 0:
            break
        labels.append(packet[offset : offset + length].decode(errors="replace"))
        offset += length
    return ".".join(labels) + ".", (end if end >= 0 else offset)


def parse_records(packet: bytes) -> list[tuple[str, int, object]]:
    """Every resource record of a response as (name, type, value)."""
    if len(packet) < 12:
        raise DNSFormatError("short packet")
    _qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", packet)
    if not flags & 0x8000:
        return []  # a query, not a response
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
        value: object = None
        if rtype == TYPE_PTR:
            value = _read_name(packet, offset)[0]
        elif rtype == TYPE_SRV and rdlen >= 7:
            _prio, _weight, port = struct.unpack_from("!HHH", packet, offset)
            value = (port, _read_name(packet, offset + 6)[0])
        elif rtype == TYPE_TXT:
            txt: dict[str, str] = {}
            pos = offset
            while pos < rdata_end:
                size = packet[pos]
                key, _, val = (
                    packet[pos + 1 : pos + 1 + size].decode(errors="replace").partition("=")
                )
                if key:
                    txt[key.lower()] = val
                pos += 1 + size
            value = txt
        elif rtype == TYPE_A and rdlen == 4:
            value = socket.inet_ntoa(packet[offset:rdata_end])
        records.append((name.lower(), rtype, value))
        offset = rdata_end
    return records


def instances_from(records: list[tuple[str, int, object]], service_type: str) -> list[Instance]:
    """Assemble the instances of *service_type* named by PTR records."""
    stype = service_type.lower().rstrip(".") + "."
    by_name: dict[str, Instance] = {}
    hosts: dict[str, list[str]] = {}
    for name, rtype, value in records:
        if rtype == TYPE_PTR and name == stype and isinstance(value, str):
            by_name.setdefault(value.lower(), Instance(value))
        elif rtype == TYPE_A and isinstance(value, str):
            hosts.setdefault(name, []).append(value)
    for name, rtype, value in records:
        inst = by_name.get(name)
        if inst is None:
            continue
        if rtype == TYPE_SRV and isinstance(value, tuple):
            inst.port, inst.target = value[0], value[1].lower()
        elif rtype == TYPE_TXT and isinstance(value, dict):
            inst.txt.update(value)
    for inst in by_name.values():
        inst.addresses = hosts.get(inst.target, [])
    return [i for i in by_name.values() if i.port]


def one_shot_query(
    service_type: str,
    *,
    interface: str | None = None,
    timeout: float = 0.25,
    settle: float = 0.05,
    expect: set[str] | None = None,
) -> list[Instance]:
    """Ask the LAN once for instances of *service_type*; gather answers.

    Waits at most *timeout* seconds.  When every instance name in *expect*
    (for example the ones a cache remembers) has answered, it waits only
    *settle* more seconds for any newcomer, so a warm cache answers quickly
    while a subscriber the cache does not know yet is still heard.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        if interface:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.bind((interface or "", 0))
        qid = int.from_bytes(os.urandom(2), "big") or 1
        sock.sendto(build_query(service_type, TYPE_PTR, qid), (MDNS_GROUP, MDNS_PORT))
        found: dict[str, Instance] = {}
        waiting = {e.lower() for e in expect or ()}
        start = time.monotonic()
        deadline = start + timeout
        while True:
            now = time.monotonic()
            if waiting and waiting <= found.keys():
                deadline = min(deadline, now + settle)
            if now >= deadline:
                break
            ready, _, _ = select.select([sock], [], [], deadline - now)
            if not ready:
                break
            packet, (addr, _port) = sock.recvfrom(9000)
            try:
                records = parse_records(packet)
            except DNSFormatError:
                continue
            for inst in instances_from(records, service_type):
                inst.responder = addr
                found[inst.name.lower()] = inst
        return list(found.values())
    finally:
        sock.close()
