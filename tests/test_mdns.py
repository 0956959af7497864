import contextlib
import json
import signal
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core import discovery, mdns
from tests.helpers import (
    MdnsResponder,
    dns_response,
    dns_rr,
    run,
    service_records,
    wait_until,
)


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


def _well_formed(records: list[tuple[str, int, object]]) -> None:
    assert len(records) <= mdns.MAX_RECORDS
    for name, rtype, value in records:
        assert isinstance(name, str) and name.endswith(".") and len(name) <= 4 * mdns.MAX_NAME
        assert isinstance(rtype, int)
        if rtype in (mdns.TYPE_PTR,):
            assert isinstance(value, str)
        elif rtype == mdns.TYPE_SRV:
            assert isinstance(value, tuple) and 0 <= value[0] < 65536 and isinstance(value[1], str)
        elif rtype == mdns.TYPE_TXT:
            assert isinstance(value, dict) and len(value) <= mdns.MAX_TXT_KEYS
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        elif rtype == mdns.TYPE_A:
            assert isinstance(value, str) and len(value.split(".")) == 4
        else:
            assert value is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_format_error_or_well_formed_records(packet):
    try:
        records = mdns.parse_records(packet)
    except mdns.DNSFormatError:
        return
    _well_formed(records)
    for inst in mdns.instances_from(records, "_eda-sub._tcp.local."):
        assert 0 < inst.port < 65536 and len(inst.addresses) <= 8
        discovery._peer_from_instance(inst)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([mdns.TYPE_A, mdns.TYPE_PTR, mdns.TYPE_TXT, mdns.TYPE_SRV, 99]),
            st.binary(max_size=40),
        ),
        max_size=6,
    )
)
def test_records_with_any_rdata_parse_within_their_bounds(items):
    """Random rdata in well-framed records: each value comes from its own rdata only."""
    records = [dns_rr("x.local", rtype, rdata) for rtype, rdata in items]
    sentinel = dns_rr("s.local", mdns.TYPE_TXT, b"\x0bsentinel=ok")
    try:
        parsed = mdns.parse_records(dns_response(0, [*records, sentinel]))
    except mdns.DNSFormatError:
        return
    _well_formed(parsed)
    assert parsed[-1] == ("s.local.", mdns.TYPE_TXT, {"sentinel": "ok"})
    for (rtype, rdata), (_, _, value) in zip(items, parsed, strict=False):
        if rtype == mdns.TYPE_TXT:  # what the record holds, read on its own: nothing more
            assert value == mdns._read_txt(rdata, 0, len(rdata))


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


# -- crafted packets ------------------------------------------------------------------------
def test_a_txt_string_longer_than_its_record_is_refused():
    """Old parser: the TXT value ran on into the next record's bytes."""
    txt = b"\x06id=abc" + b"\x30p="  # claims 48 bytes; its record holds 2
    packet = dns_response(
        0,
        [
            dns_rr("sub-x._eda-sub._tcp.local", mdns.TYPE_TXT, txt),
            dns_rr("h.local", mdns.TYPE_A, socket.inet_aton("10.0.0.9")),
        ],
    )
    with pytest.raises(mdns.DNSFormatError):
        mdns.parse_records(packet)


def test_names_records_and_pointers_are_limited():
    long_name = ".".join(["a" * 60] * 5)  # 305 bytes on the wire
    packet = dns_response(0, [dns_rr("x.local", mdns.TYPE_A, b"\x01\x02\x03\x04")])
    too_long = packet[:12] + b"".join(bytes([60]) + b"a" * 60 for _ in range(5)) + b"\x00"
    assert len(long_name) > mdns.MAX_NAME
    with pytest.raises(mdns.DNSFormatError):
        mdns._read_name(too_long, 12)
    many = struct.pack("!HHHHHH", 0, 0x8400, 0, 0xFFFF, 0, 0) + b"\x00" * 100
    with pytest.raises(mdns.DNSFormatError):
        mdns.parse_records(many)
    forward = b"\x00" * 12 + b"\xc0\x0e\x01a\x00"  # a pointer that points ahead
    with pytest.raises(mdns.DNSFormatError):
        mdns._read_name(forward, 12)
    ping_pong = b"\x00" * 12 + b"\x01a\xc0\x0c"  # label then a pointer back to itself
    with pytest.raises(mdns.DNSFormatError):
        mdns._read_name(ping_pong, 12)


def test_a_dot_inside_a_label_cannot_pose_as_a_service_type():
    # one label "_eda-sub._tcp" under "local": not the type _eda-sub._tcp.local
    label = b"\x0d_eda-sub._tcp\x05local\x00"
    target = mdns.encode_name("a._eda-sub._tcp.local")
    rr = label + struct.pack("!HHIH", mdns.TYPE_PTR, 1, 120, len(target)) + target
    records = mdns.parse_records(dns_response(0, [rr]))
    assert records[0][0] == "_eda-sub\\._tcp.local."
    assert mdns.instances_from(records, "_eda-sub._tcp.local.") == []


def test_a_ptr_to_a_name_outside_the_type_is_not_an_instance():
    records = service_records("_eda-sub._tcp.local", "x", 4242, {"id": "a"}, "10.0.0.1")
    records[0] = dns_rr("_eda-sub._tcp.local", mdns.TYPE_PTR, mdns.encode_name("x-host.local"))
    assert mdns.instances_from(mdns.parse_records(dns_response(0, records)), "_eda-sub._tcp") == []


# -- the one-shot query against a scripted responder ------------------------------------------
STYPE = "_eda-t._tcp.local."


@pytest.fixture
def responder():
    fake = MdnsResponder()
    yield fake
    fake.close()


def test_only_answers_from_the_mdns_port_repeating_our_id_count(responder):
    good = service_records(STYPE, "good", 1111, {"id": "g"}, "127.0.0.1")
    forged = service_records(STYPE, "forged", 2222, {"id": "f"}, "127.0.0.1")

    def answer(qid, qname):
        return [
            (dns_response(qid ^ 0x5A5A, forged, 1), True),  # not our id
            (dns_response(qid, forged, 1), False),  # not from port 5353
            (dns_response(qid, good, 1), True),
        ]

    responder.answer = answer
    found = mdns.one_shot_query(STYPE, timeout=0.3)
    assert [i.txt["id"] for i in found] == ["g"]


def test_the_question_is_repeated_until_answered(responder):
    """A lost question (here: the first three ignored) is asked again within the wait."""
    records = service_records(STYPE, "late", 3333, {"id": "l"}, "127.0.0.1")
    seen = []

    def answer(qid, qname):
        seen.append(qid)
        return [(dns_response(qid, records, 1), True)] if len(seen) > 3 else []

    responder.answer = answer
    found = mdns.one_shot_query(STYPE, timeout=0.3)
    assert [i.port for i in found] == [3333] and len(seen) >= 4


def test_repeats_carry_the_answers_already_heard(responder):
    records = service_records(STYPE, "known", 4444, {"id": "k"}, "127.0.0.1")
    known_counts = []

    def answer(qid, qname):
        return [(dns_response(qid, records, 1), True)]

    original = mdns.build_query

    def spy(name, qtype=mdns.TYPE_PTR, qid=0, known=()):
        known_counts.append(len(known))
        return original(name, qtype, qid, known)

    responder.answer = answer
    mdns.build_query = spy
    try:
        found = mdns.one_shot_query(STYPE, timeout=0.3)
    finally:
        mdns.build_query = original
    assert [i.port for i in found] == [4444]
    assert known_counts[0] == 0 and known_counts[-1] == 1
    query = original(STYPE, mdns.TYPE_PTR, 7, ("known." + STYPE,))
    assert struct.unpack_from("!H", query, 6)[0] == 1  # one known answer


# -- the discovery layer: any service type, one announce, one resolve path ----------------------
def test_any_service_type_is_announced_browsed_resolved_and_withdrawn():
    import queue

    stype = "_eda-any._tcp.local."
    ann = discovery.Discovery("127.0.0.1")
    other = discovery.Discovery("127.0.0.1")
    try:
        info = ann.announce(stype, "web one", 8080, {"path": "/x"}, background=False)
        found = wait_until(lambda: mdns.one_shot_query(stype, timeout=0.3), 10, "one-shot answer")
        assert [(i.name, i.port, i.txt) for i in found] == [
            (f"web one.{stype}", 8080, {"path": "/x"})
        ]
        seen: queue.Queue[mdns.Instance | str] = queue.Queue()
        other.browse_instances(stype, seen.put, seen.put)
        inst = seen.get(timeout=10)
        assert isinstance(inst, mdns.Instance)
        assert (inst.name, inst.port, inst.txt) == (f"web one.{stype}", 8080, {"path": "/x"})
        assert "127.0.0.1" in inst.addresses
        resolved = other.resolve(stype, inst.name)
        assert resolved is not None and resolved.port == 8080
        info = ann.update(info, {"path": "/y"})
        updated = wait_until(
            lambda: next(
                (i for i in _drain(seen) if isinstance(i, mdns.Instance) and i.txt["path"] == "/y"),
                None,
            ),
            10,
            "the update",
        )
        assert updated.port == 8080
        ann.withdraw(info)
        gone = wait_until(lambda: [i for i in _drain(seen) if isinstance(i, str)], 10, "goodbye")
        assert gone == [f"web one.{stype}"]
    finally:
        ann.close()
        other.close()


def _drain(q):
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def test_local_addresses_put_the_interface_first_and_loopback_last():
    assert discovery.local_addresses("10.1.2.3") == ["10.1.2.3"]
    found = discovery.local_addresses()
    assert found and found[-1].startswith("127.")


@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=4))
def test_names_read_from_the_wire_encode_back_to_the_same_bytes(labels):
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    name, _ = mdns._read_name(b"\x00" * 12 + wire, 12)
    if all(b"\xff" not in label and _utf8(label) for label in labels):
        assert mdns.encode_name(name) == wire  # dots and backslashes inside labels survive


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_a_hostile_instance_name_cannot_break_the_repeated_question(responder):
    """A 63-byte label with a backslash and one with invalid UTF-8: heard, and repeats go on."""
    for label in (b"a" * 62 + b"\\", b"\xff\xfe" * 31):
        inst = bytes([len(label)]) + label + b"\x06_eda-t\x04_tcp\x05local\x00"
        stype = mdns.encode_name(STYPE)
        ptr = stype + struct.pack("!HHIH", mdns.TYPE_PTR, 1, 120, len(inst)) + inst
        srv_rdata = struct.pack("!HHH", 0, 0, 5555) + mdns.encode_name("h.local")
        srv = inst + struct.pack("!HHIH", mdns.TYPE_SRV, 1, 120, len(srv_rdata)) + srv_rdata
        responder.answer = lambda qid, qname, p=ptr, s=srv: [(dns_response(qid, [p, s], 1), True)]
        found = mdns.one_shot_query(STYPE, timeout=0.2)  # known answers must not fail
        assert [i.port for i in found] == [5555]


def test_a_starting_subscriber_answers_at_once_without_probing(procs):
    """Its mDNS names come from a random id of its own: no probe queries (RFC 6762 8.1,
    about a second) delay it; the first packet naming it is its announcement."""
    from tests.helpers import mdns_socket, readable

    capture = mdns_socket()
    try:
        sub = procs.eda("eda-sub", "-v", "probe.>")
        subid = sub.wait_stderr(r"announced as (\w+)", 15).group(1)
        packets: list[bytes] = []
        deadline = time.monotonic() + 10
        while not any(subid.encode() in p for p in packets) and time.monotonic() < deadline:
            if readable([capture], 0.1):
                packets.append(capture.recv(9000))
    finally:
        capture.close()
    naming = [p for p in packets if subid.encode() in p]
    assert naming, "the subscriber was never announced"
    assert naming[0][2] & 0x80, "a probe query came before the announcement"
    # and a publisher finds it now (it said it is announced)
    result = run("eda-pub", "probe.x", "hello")
    assert result.returncode == 0 and "reached nobody" not in result.stderr, result.stderr
    sub.signal(signal.SIGTERM)
    assert sub.wait() == 0
    assert json.loads(sub.lines()[0])["data"] == "hello"
