import contextlib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eda.core import discovery, mdns


def _rr(name: str, rtype: int, rdata: bytes) -> bytes:
    return mdns.encode_name(name) + struct.pack("!HHIH", rtype, 1, 120, len(rdata)) + rdata


def _response() -> bytes:
    stype = "_eda-sub._tcp.local"
    inst = "sub-x._eda-sub._tcp.local"
    txt = b"".join(bytes([len(s)]) + s for s in (b"id=abc", b"p=orders.> logs.*", b"v=1"))
    records = [
        _rr(stype, mdns.TYPE_PTR, mdns.encode_name(inst)),
        _rr(inst, mdns.TYPE_SRV, struct.pack("!HHH", 0, 0, 4242) + mdns.encode_name("h.local")),
        _rr(inst, mdns.TYPE_TXT, txt),
        _rr("h.local", mdns.TYPE_A, socket.inet_aton("10.0.0.9")),
    ]
    return struct.pack("!HHHHHH", 0, 0x8400, 0, 1, 0, 3) + b"".join(records)


def test_response_is_assembled_into_an_instance():
    (inst,) = mdns.instances_from(mdns.parse_records(_response()), "_eda-sub._tcp.local.")
    assert inst.port == 4242 and inst.addresses == ["10.0.0.9"]
    assert inst.txt == {"id": "abc", "p": "orders.> logs.*", "v": "1"}
    peer = discovery._peer_from_instance(inst)
    assert peer is not None
    assert peer.endpoint == "tcp://10.0.0.9:4242" and peer.patterns == ("orders.>", "logs.*")


def test_responder_address_wins_over_a_records():
    (inst,) = mdns.instances_from(mdns.parse_records(_response()), "_eda-sub._tcp.local.")
    inst.responder = "10.0.0.7"
    assert inst.best_address() == "10.0.0.7"


def test_compression_pointers_are_followed_and_loops_refused():
    query = mdns.build_query("_x._tcp.local", qid=5)
    assert mdns._read_name(query, 12)[0] == "_x._tcp.local."
    loop = b"\x00" * 12 + b"\xc0\x0c"
    with pytest.raises(mdns.DNSFormatError):
        mdns._read_name(loop, 12)


@pytest.mark.parametrize("cut", [5, 13, 30, 60, 100])
def test_truncated_packets_raise_format_error(cut):
    with pytest.raises(mdns.DNSFormatError):
        mdns.parse_records(_response()[:cut])


@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_parser(packet):
    with contextlib.suppress(mdns.DNSFormatError):
        mdns.parse_records(packet)


@given(st.binary(min_size=1, max_size=200))
def test_flipped_bytes_in_a_real_response_never_crash(noise):
    packet = bytearray(_response())
    for i, byte in enumerate(noise):
        packet[(i * 37) % len(packet)] ^= byte
    with contextlib.suppress(mdns.DNSFormatError):
        mdns.instances_from(mdns.parse_records(bytes(packet)), "_eda-sub._tcp.local.")


def test_txt_patterns_respect_the_size_advice():
    text = discovery.txt_patterns([f"topic{i}.>" for i in range(100)])
    assert len(text) <= discovery.TXT_LIMIT and text.endswith(">")
