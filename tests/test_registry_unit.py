"""eda-registry's core without processes: records, store rules, DNS packets, rise/fall, journal."""

from __future__ import annotations

import math
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eda.core.errors import NotFoundError
from eda.core.mdns import build_query
from eda.core.registry import dns, model
from eda.core.registry.health import Debounce
from eda.core.registry.persist import Journal
from eda.core.registry.protocol import ProtocolError, decode_request
from eda.core.registry.store import Store
from tests.helpers import readable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec(service: str = "orders", port: int = 8080, **kw: object) -> model.Instance:
    data: dict[str, object] = {
        "service": service,
        "host": "10.0.0.1",
        "port": port,
        "ttl": 3.0,
        "interval": 1.0,
    }
    data.update(kw)
    return model.from_dict(data)


# -- records ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"service": ""}, "missing service name"),
        ({"service": "Bad_Name"}, "bad service name"),
        ({"port": 0}, "bad port"),
        ({"port": "80"}, "bad port"),
        ({"port": True}, "bad port"),
        ({"meta": {"k": "x" * 300}}, "one key=value must fit in 255"),
        ({"meta": {f"k{i}": "x" * 200 for i in range(7)}}, "keep it under 1300"),
        ({"meta": {"svc": "x"}}, "reserved"),
        ({"meta": {"a=b": "x"}}, "bad metadata key"),
        ({"ttl": 1.0, "interval": 2.0}, "must be shorter than ttl"),
        ({"status": "dead"}, "bad status"),
        ({"weight": -1}, "bad weight"),
        ({"id": "has space"}, "bad instance id"),
        ({"heartbeat": float("nan")}, "bad timestamps"),  # would print NaN: not JSON
        ({"registered": 10**400}, "bad timestamps"),  # OverflowError once killed the daemon
        ({"registered": 1e20}, "bad timestamps"),  # no date to print
        ({"heartbeat": -1.0}, "bad timestamps"),
        ({"rev": int("9" * 4300)}, "bad revision"),  # +1 could not be printed: killed serve
        ({"rev": -1}, "bad revision"),
        ({"rev": 2**53}, "bad revision"),
        ({"rev": 1.0}, "bad revision"),
        ({"registry": "r" * 65}, "bad registry id"),
        ({"registry": ["r"]}, "bad registry id"),
        ({"service": "orders\n"}, "bad service name"),  # '$' matched before a newline
        ({"host": "h" * 300}, "bad host"),
        ({"meta": {"k": "\ud800"}}, "UTF-8"),  # a lone surrogate JSON can carry
        ({"meta": {f"k{i}": "" for i in range(700)}}, "items"),
        ({"ttl": float("inf")}, "bad ttl"),
        ({"interval": float("nan")}, "bad interval"),
        ({"weight": 10**30}, "bad weight"),
        ({"status": ["passing"]}, "bad status"),
    ],
)
def test_invalid_records_are_refused_with_a_reason(change: dict[str, object], message: str) -> None:
    data = {"service": "orders", "host": "10.0.0.1", "port": 8080, **change}
    with pytest.raises(model.InvalidRecord, match=message):
        model.from_dict(data)


def test_refusals_of_huge_values_stay_short() -> None:
    with pytest.raises(model.InvalidRecord) as caught:
        model.from_dict({"service": "orders", "host": "h", "port": 10**4000})
    assert len(str(caught.value)) < 100


def test_revisions_saturate_instead_of_growing_past_the_limit() -> None:
    store = Store("r1", Clock())
    [ev] = store.heartbeat(rec(rev=model.MAX_REV), register=True)
    assert ev["instance"]["rev"] == model.MAX_REV
    [gone] = store.deregister(rec().id)
    assert model.from_dict(gone["instance"]).rev == model.MAX_REV  # still a valid record


def test_record_defaults_and_stable_id() -> None:
    inst = rec()
    assert inst.id == "orders-10-0-0-1-8080"
    assert (inst.weight, inst.status, inst.meta) == (1, "passing", {})
    assert model.parse_meta(["Version=2", "zone=a=b"]) == {"version": "2", "zone": "a=b"}
    with pytest.raises(model.InvalidRecord, match="KEY=VALUE"):
        model.parse_meta(["novalue"])


# -- store ------------------------------------------------------------------------
def test_store_register_heartbeat_health_and_expiry() -> None:
    clock = Clock()
    store = Store("r1", clock)
    [ev] = store.heartbeat(rec(), register=True)
    assert (ev["type"], ev["id"], ev["instance"]["registry"]) == (
        "registered",
        "orders-10-0-0-1-8080@1",
        "r1",
    )
    assert store.heartbeat(rec()) == []  # a plain heartbeat is no change
    [ev] = store.heartbeat(rec(status="critical"))
    assert (ev["type"], ev["reason"], ev["id"]) == (
        "health",
        "passing -> critical",
        "orders-10-0-0-1-8080@2",
    )
    assert store.lookup("orders") == []
    assert [i.status for i in store.lookup("orders", include_all=True)] == ["critical"]
    clock.now += 2.9
    assert store.expire() == []
    clock.now += 0.2
    [ev] = store.expire()
    assert (ev["type"], ev["reason"]) == ("expired", "no heartbeat for 3s")
    assert store.instances() == []


def test_store_deregister_unknown_is_not_found_and_keeps_others() -> None:
    store = Store("r1", Clock())
    store.heartbeat(rec(port=1), register=True)
    store.heartbeat(rec(port=2), register=True)
    store.heartbeat(rec(service="billing", port=3), register=True)
    everything = [(i.service, i.port, i.rev) for i in store.instances()]
    with pytest.raises(NotFoundError):
        store.deregister("nope")
    assert [(i.service, i.port, i.rev) for i in store.instances()] == everything
    [ev] = store.deregister(rec(port=1).id)
    assert ev["type"] == "deregistered" and ev["instance"]["port"] == 1
    assert [i.port for i in store.lookup("orders")] == [2]  # the others are kept
    assert [i.port for i in store.lookup("billing")] == [3]


def test_store_refuses_an_id_registered_for_another_service() -> None:
    store = Store("r1", Clock())
    store.heartbeat(rec(port=2), register=True)
    with pytest.raises(model.InvalidRecord, match="registered for service"):
        store.heartbeat(rec(service="billing", port=2, id=rec(port=2).id))
    assert [(i.service, i.port) for i in store.instances()] == [("orders", 2)]


def test_replication_applies_newer_revisions_once_and_deletions_win_ties() -> None:
    a, b = Store("a", Clock()), Store("b", Clock())
    b.peer_alive("a")
    [reg] = a.heartbeat(rec(), register=True)
    [copy] = b.apply_remote(reg)
    assert copy["id"] == reg["id"] and copy["registry"] == "a"
    assert b.entries[rec().id].deadline == math.inf  # the owner is alive: it decides expiry
    assert b.apply_remote(reg) == []  # seen already: not re-published (no loop)
    assert a.apply_remote(copy) == []  # echoed back to its origin: ignored
    [gone] = a.deregister(rec().id)
    assert [e["type"] for e in b.apply_remote(gone)] == ["deregistered"]
    assert b.apply_remote(reg) == []  # a stale registration cannot resurrect it


def test_failover_moves_ownership_and_silent_peer_gets_one_ttl() -> None:
    clock = Clock()
    a, b = Store("a", clock), Store("b", clock)
    b.peer_alive("a")
    b.apply_remote(a.heartbeat(rec(), register=True)[0])
    b.peer_lost("a")
    assert b.entries[rec().id].deadline == clock.now + 3.0
    [moved] = b.heartbeat(rec())  # the instance's heartbeats now arrive at b
    assert moved["type"] == "sync" and moved["instance"]["registry"] == "b"
    assert [e["type"] for e in a.apply_remote(moved)] == ["sync"]
    assert a.entries[rec().id].inst.registry == "b"


def test_merge_peer_adds_updates_and_removes_what_the_peer_no_longer_holds() -> None:
    a, b = Store("a", Clock()), Store("b", Clock())
    a.heartbeat(rec(port=1), register=True)
    a.heartbeat(rec(port=2), register=True)
    events = b.merge_peer("a", a.instances())
    assert sorted(e["type"] for e in events) == ["registered", "registered"]
    a.deregister(rec(port=1).id)
    a.heartbeat(rec(port=2, status="warning"))
    events = b.merge_peer("a", a.instances())
    assert sorted(e["type"] for e in events) == ["deregistered", "health"]


def test_restarted_replica_serves_a_peers_records_once_the_peer_confirms_them() -> None:
    clock = Clock()
    a, b = Store("a", clock), Store("b", clock)
    a.heartbeat(rec(), register=True)
    b.merge_peer("a", a.instances())
    saved = b.instances(with_stale=True)
    clock.now += 60  # b was down a while; a kept the instance alive (no change to replicate)
    a.heartbeat(rec())
    again = Store("b", clock)
    again.restore(saved, seq=0)
    assert again.lookup("orders") == []  # not served on an old copy...
    again.peer_alive("a")
    again.merge_peer("a", a.instances())
    assert [i.id for i in again.lookup("orders")] == [rec().id]  # ...but once its owner lists it


def test_partition_heal_relearns_what_the_owner_still_holds() -> None:
    clock = Clock()
    a, b = Store("a", clock), Store("b", clock)
    b.peer_alive("a")
    b.apply_remote(a.heartbeat(rec(), register=True)[0])
    b.peer_lost("a")  # cut off: b gives a's instance one TTL, then expires its copy
    clock.now += 3.1
    a.heartbeat(rec())
    assert [e["type"] for e in b.expire()] == ["expired"]
    b.peer_alive("a")
    assert [e["type"] for e in b.merge_peer("a", a.instances())] == ["registered"]
    assert [i.id for i in b.lookup("orders")] == [rec().id]


def test_deeply_nested_json_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode_request(b"[" * 60000)


def test_restore_serves_records_inside_ttl_and_holds_back_the_others() -> None:
    clock = Clock()
    fresh = rec(port=1, heartbeat=clock.now - 1, registry="r1")
    old = rec(port=2, heartbeat=clock.now - 10, registry="r1")
    store = Store("r1", clock)
    store.restore([fresh, old], seq=7)
    assert [i.port for i in store.lookup("orders")] == [1]
    assert store.seq == 7
    assert store.heartbeat(rec(port=2)) == []  # its owner is alive: revived silently
    assert [i.port for i in store.lookup("orders")] == [1, 2]
    store2 = Store("r1", clock)
    store2.restore([old], seq=0)
    clock.now += 2.1  # two heartbeat intervals without news
    [ev] = store2.expire()
    assert ev["reason"] == "no heartbeat since the registry restarted"


# -- journal ----------------------------------------------------------------------
def test_journal_replays_log_after_snapshot_and_skips_a_torn_line(tmp_path: Path) -> None:
    store = Store("r1", Clock())
    journal = Journal(tmp_path)
    assert journal.registry_id() == Journal(tmp_path).registry_id()
    for ev in store.heartbeat(rec(port=1), register=True):
        journal.append(ev)
    journal.snapshot(store.instances(), store.seq)
    for ev in store.heartbeat(rec(port=2), register=True) + store.deregister(rec(port=1).id):
        journal.append(ev)
    with (tmp_path / "changes.log").open("ab") as fh:
        fh.write(b'{"type": "registered", "instance": {"serv')  # killed mid-write
    again = Journal(tmp_path)
    records, seq = again.load()
    assert [r.port for r in records] == [2]
    assert seq == 3 and again.skipped == 1


# -- DNS --------------------------------------------------------------------------
def _answers(packet: bytes) -> tuple[int, int, int]:
    _qid, flags, _qd, an, _ns, ar = struct.unpack_from("!HHHHHH", packet)
    return flags & 0xF, an, ar


def test_dns_rotates_a_records_and_serves_srv_with_weights() -> None:
    insts = [rec(port=1, host="10.0.0.1", weight=5), rec(port=2, host="10.0.0.2")]
    responder = dns.Responder(lambda name: insts if name == "orders" else None)
    first = responder.answer(build_query("orders.service.eda", dns.TYPE_A, 7))
    second = responder.answer(build_query("orders.service.eda", dns.TYPE_A, 8))
    assert first is not None and second is not None
    assert _answers(first) == (dns.NOERROR, 2, 0)
    ips = [socket.inet_aton(a) for a in ("10.0.0.1", "10.0.0.2")]
    assert first.index(ips[0]) < first.index(ips[1]) and second.index(ips[1]) < second.index(ips[0])
    srv = responder.answer(build_query("_orders._tcp.service.eda", dns.TYPE_SRV, 9))
    assert srv is not None and _answers(srv) == (dns.NOERROR, 2, 2)
    assert struct.pack("!HHH", 1, 5, 1) in srv


def test_dns_errors_and_garbage() -> None:
    responder = dns.Responder(lambda name: [] if name == "idle" else None)
    nx = responder.answer(build_query("nope.service.eda", dns.TYPE_A, 1))
    empty = responder.answer(build_query("idle.service.eda", dns.TYPE_A, 1))
    refused = responder.answer(build_query("example.com", dns.TYPE_A, 1))
    assert nx is not None and _answers(nx)[0] == dns.NXDOMAIN
    assert empty is not None and _answers(empty) == (dns.NOERROR, 0, 0)
    assert refused is not None and _answers(refused)[0] == dns.REFUSED
    assert responder.answer(b"\x00\x01") is None
    bad = responder.answer(b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c")
    assert bad is not None and bad[:2] == b"\x12\x34" and _answers(bad)[0] == dns.FORMERR


# -- rise / fall ------------------------------------------------------------------
def test_debounce_needs_rise_and_fall_results_in_a_row() -> None:
    deb = Debounce(rise=2, fall=3)
    assert deb.feed("passing") and deb.status == "passing"
    for result in ["critical", "passing"] * 5:  # flapping never reaches fall=3
        assert not deb.feed(result)
    assert not deb.feed("critical") and not deb.feed("critical")
    assert deb.feed("critical") and deb.status == "critical"
    assert not deb.feed("passing")
    assert deb.feed("passing") and deb.status == "passing"


def test_debounce_counts_warning_and_critical_as_one_failing_run() -> None:
    deb = Debounce(rise=2, fall=3)
    assert deb.feed("passing")
    assert not deb.feed("warning") and not deb.feed("critical")
    assert deb.feed("warning") and deb.status == "warning"  # three failing in a row
    assert not deb.feed("critical") and not deb.feed("critical")
    assert deb.feed("critical") and deb.status == "critical"


@pytest.mark.parametrize(
    "bad", [b"[1, 2]", b'"text"', b'{"seq": "x"}', b'{"instances": 5}', b"\xff\xfe"]
)
def test_journal_survives_a_mangled_snapshot(tmp_path: Path, bad: bytes) -> None:
    store = Store("r1", Clock())
    journal = Journal(tmp_path)
    for ev in store.heartbeat(rec(port=1), register=True):
        journal.append(ev)
    (tmp_path / "snapshot.json").write_bytes(bad)
    again = Journal(tmp_path)
    records, _seq = again.load()
    assert [r.port for r in records] == [1]  # the log still has every change
    assert again.skipped == 1


def _with_edns(query: bytes, size: int) -> bytes:
    header = bytearray(query[:12])
    header[10:12] = (1).to_bytes(2, "big")  # one additional record: OPT
    return bytes(header) + query[12:] + b"\x00" + struct.pack("!HHIH", dns.TYPE_OPT, size, 0, 0)


def test_dns_replies_fit_the_clients_udp_size() -> None:
    many = [rec(port=1000 + i, host=f"10.0.{i // 200}.{i % 200 + 1}") for i in range(40)]
    responder = dns.Responder(lambda name: many if name == "orders" else None)
    plain = responder.answer(build_query("orders.service.eda", dns.TYPE_SRV, 1))
    assert plain is not None and len(plain) <= 512
    flags = struct.unpack_from("!H", plain, 2)[0]
    assert flags & 0x0200  # TC: cut, and the client is told so
    assert 0 < _answers(plain)[1] < 40
    big = responder.answer(_with_edns(build_query("orders.service.eda", dns.TYPE_SRV, 2), 4096))
    assert big is not None and len(big) <= 4096
    assert not struct.unpack_from("!H", big, 2)[0] & 0x0200
    assert _answers(big)[1] == 40


def test_dns_refuses_classes_other_than_in() -> None:
    responder = dns.Responder(lambda name: [rec(port=1)])
    query = bytearray(build_query("orders.service.eda", dns.TYPE_A, 3))
    query[-2:] = (3).to_bytes(2, "big")  # class CH
    reply = responder.answer(bytes(query))
    assert reply is not None and _answers(reply)[0] == dns.REFUSED


@pytest.mark.parametrize(
    "line",
    [
        b'{"seq": Infinity, "type": "registered", "instance": {}}',  # int(inf) raised
        b'{"seq": 1e400}',
        b'{"seq": ' + b"9" * 4300 + b"}",
        b"[" * 50_000,
        b'{"type": "deregistered", "instance": {"id": ["x"]}}',
        b'{"type": "registered", "instance": {"service": "orders", "host": "h", "port": 1, '
        b'"meta": {"k": "\\ud800"}}}',
        b'{"type": "registered", "instance": {"service": "orders", "host": "h", "port": 1, '
        b'"rev": ' + b"9" * 4300 + b"}}",
        b"7",
    ],
)
def test_journal_skips_any_bad_log_line_and_keeps_the_rest(tmp_path: Path, line: bytes) -> None:
    store = Store("r1", Clock())
    journal = Journal(tmp_path)
    for ev in store.heartbeat(rec(port=1), register=True):
        journal.append(ev)
    with (tmp_path / "changes.log").open("ab") as fh:
        fh.write(line + b"\n")
    for ev in store.heartbeat(rec(port=2), register=True):
        journal.append(ev)
    again = Journal(tmp_path)
    records, seq = again.load()
    assert [r.port for r in records] == [1, 2]
    assert seq == 2 and again.skipped == 1


def test_journal_refuses_a_snapshot_with_a_bad_sequence(tmp_path: Path) -> None:
    (tmp_path / "snapshot.json").write_bytes(b'{"seq": -5, "instances": []}')
    again = Journal(tmp_path)
    assert again.load() == ([], 0) and again.skipped == 1


# -- browse rendering --------------------------------------------------------------
def test_browse_prefers_ipv4_and_global_addresses_and_prints_txt_as_key_value() -> None:
    from eda.cli.registryviews import browse_line as _browse_line
    from eda.core.registry.browse import address_order

    found = ["fe80::1%eth0", "2001:db8::1", "169.254.1.1", "10.0.0.5"]
    ordered = sorted(found, key=address_order)
    assert ordered == ["10.0.0.5", "169.254.1.1", "2001:db8::1", "fe80::1%eth0"]
    item = {
        "event": "added",
        "name": "web\x1b[2J",
        "addresses": ordered,
        "port": 80,
        "txt": {"path": "/index.html", "v": "1"},
    }
    line = _browse_line(item).plain
    assert line.startswith("added    web\\x1b[2J  10.0.0.5:80 (also 169.254.1.1, ")
    assert line.endswith("  path=/index.html v=1")
    assert "{" not in line and "\x1b" not in line


def test_debounce_first_pass_counts_at_once_then_rise_and_fall_apply() -> None:
    deb = Debounce(rise=3, fall=3)
    assert deb.feed("critical") and deb.status == "critical"  # the service is not up yet
    assert not deb.feed("critical")
    assert deb.feed("passing") and deb.status == "passing"  # the first pass: at once
    assert not deb.feed("critical") and not deb.feed("critical")
    assert deb.feed("critical")  # fall applies now
    assert not deb.feed("passing") and not deb.feed("passing")
    assert deb.feed("passing")  # and rise on the way back


def test_a_failed_snapshot_keeps_the_old_one_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    store = Store("r1", Clock())
    journal = Journal(tmp_path)
    store.heartbeat(rec(port=1), register=True)
    journal.snapshot(store.instances(), store.seq)
    store.heartbeat(rec(port=2), register=True)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        journal.snapshot(store.instances(), store.seq)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changes.log", "snapshot.json"]
    monkeypatch.undo()
    assert [r.port for r in Journal(tmp_path).load()[0]] == [1]


def test_watch_terminal_line_is_plain_text_with_peer_escapes_shown() -> None:
    import io

    from rich.console import Console

    from eda.cli.registryviews import event_line as _event_line

    event = {
        "type": "registered[/]",
        "time": "2026-01-01T00:00:00.000Z",
        "reason": "[bold]\x1b]0;title\x07",
        "instance": {"service": "orders", "id": "a[/]", "host": "h", "port": 1, "status": "ok"},
    }
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(_event_line(event, {}))
    text = out.getvalue()
    assert "registered[/]" in text and "a[/]" in text and "[bold]" in text
    assert "\x1b" not in text and "\\x1b]0;title\\x07" in text


# -- DNS over TCP ------------------------------------------------------------------
def test_dns_over_tcp_answers_pipelined_and_split_queries_and_bounds_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    insts = [rec(port=1000 + i, host=f"10.0.1.{i + 1}") for i in range(40)]
    responder = dns.Responder(lambda name: insts if name == "orders" else None)
    listener = socket.create_server(("127.0.0.1", 0))
    watched: dict[int, tuple[bool, bool]] = {}

    def watch(fd: int, readable: bool, writable: bool) -> None:
        if readable or writable:
            watched[fd] = (readable, writable)
        else:
            watched.pop(fd, None)

    tcp = dns.TcpConnections(listener, responder, watch)

    def pump() -> None:
        for _ in range(20):
            fds = [fd for fd, (r, _w) in watched.items() if r]
            ready = readable(fds, 0.2)
            if not ready:
                return
            for fd in ready:
                tcp.ready(fd, 1, 1, 4)

    client = socket.create_connection(listener.getsockname(), 5)
    queries = [build_query("orders.service.eda", dns.TYPE_SRV, qid) for qid in (1, 2)]
    framed = b"".join(struct.pack("!H", len(q)) + q for q in queries)
    client.sendall(framed[:5])  # split mid-frame...
    pump()
    client.sendall(framed[5:])  # ...then the rest and a second query at once
    pump()
    data = b""
    client.settimeout(5)
    while len(data) < 4 or len(data) < 2 + struct.unpack_from("!H", data)[0] + 2:
        data += client.recv(65536)
        pump()
    first = struct.unpack_from("!H", data)[0]
    reply1 = data[2 : 2 + first]
    while len(data) < 2 + first + 2 + struct.unpack_from("!H", data, 2 + first)[0]:
        data += client.recv(65536)
    assert struct.unpack_from("!H", reply1)[0] == 1
    assert _answers(reply1) == (dns.NOERROR, 40, 40)  # over TCP nothing is cut
    assert not struct.unpack_from("!H", reply1, 2)[0] & 0x0200
    # at most MAX_TCP_CONNECTIONS: the least recently active makes room
    monkeypatch.setattr(dns, "MAX_TCP_CONNECTIONS", 3)
    extra = [socket.create_connection(listener.getsockname(), 5) for _ in range(4)]
    pump()
    assert len(tcp.conns) == 3
    tcp.clock = lambda: time.monotonic() + dns.TCP_IDLE_SECONDS + 1
    tcp.expire()
    assert tcp.conns == {}
    for sock in [client, *extra]:
        sock.close()
    tcp.close()


_JOURNAL_SAMPLES = [
    b'{"seq": 3, "type": "registered", "instance": {"service": "orders", "host": "h", "port": 1}}',
    b'{"seq": 4, "type": "expired", "instance": {"id": "orders-h-1"}}',
    b'{"seq": 1e999, "instances": [{"service": "x", "host": "h", "port": 2, "rev": -1}]}',
    b'{"seq": 2, "instances": [{"service": "x", "host": "h", "port": 2}]}',
]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.lists(st.binary(max_size=200) | st.sampled_from(_JOURNAL_SAMPLES), max_size=8))
def test_journal_load_survives_any_log_contents(tmp_path: Path, lines: list[bytes]) -> None:
    directory = tmp_path / "j"
    directory.mkdir(exist_ok=True)
    (directory / "changes.log").write_bytes(b"\n".join(lines))
    (directory / "snapshot.json").write_bytes(lines[0] if lines else b"")
    records, seq = Journal(directory).load()
    assert 0 <= seq <= model.MAX_REV
    for record in records:
        assert model.from_dict(record.to_dict()) == record


def test_forged_registry_announcements_cost_a_connect_not_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eda.core import cache, discovery
    from eda.core.registry import client as client_mod

    dead = []
    for _ in range(20):  # ports that were just free: nothing listens there
        with socket.create_server(("127.0.0.1", 0)) as s:
            dead.append(f"tcp://127.0.0.1:{s.getsockname()[1]}")

    class Peer:
        def __init__(self, endpoint: str) -> None:
            self.endpoint = endpoint
            self.key = ""  # plain mode: no announced key

    monkeypatch.setattr(discovery, "find_once", lambda *a, **kw: [Peer(e) for e in dead])
    monkeypatch.setattr(cache, "cached", lambda key: [])  # the client base reads it
    client = client_mod.Client(timeout=1.0)
    probed: list[object] = []
    asked: list[object] = []
    real_reachable, real_roundtrip = client.reachable, client.roundtrip
    monkeypatch.setattr(client, "reachable", lambda ep: probed.append(ep) or real_reachable(ep))
    monkeypatch.setattr(
        client, "roundtrip", lambda msg, t: asked.append(msg) or real_roundtrip(msg, t)
    )
    with pytest.raises(client_mod.NoRegistry):
        client.request({"op": "hello"})
    client.close()
    # a forged registry costs a refused TCP connect (at most MAX_ANNOUNCED of them are
    # tried); no request waited for a reply (before: one request timeout each, 20 s)
    from eda.core.reqrep import MAX_ANNOUNCED

    assert len(probed) == min(len(dead), MAX_ANNOUNCED) and asked == []


def test_browse_resolves_a_flood_of_names_on_a_few_threads(monkeypatch) -> None:
    """browse() uses the shared discovery layer and its bounded resolver pool."""
    import threading

    import zeroconf

    from eda.core import discovery
    from eda.core.registry import browse

    gate = threading.Event()
    seen_handlers: list = []

    class SlowInfo(zeroconf.ServiceInfo):  # an announcement that does not resolve in time
        def load_from_cache(self, zc, now=None) -> bool:
            return False

        def request(self, zc, timeout, *args, **kwargs) -> bool:
            gate.wait(10)
            self.port = 631
            return True

    class Browser:  # hands us the handler zeroconf would call
        def __init__(self, zc, service_type, handlers: list) -> None:
            seen_handlers.extend(handlers)

        def cancel(self) -> None:
            pass

    class Stack:  # no sockets: the names arrive from the test
        def close(self) -> None:
            pass

    monkeypatch.setattr(zeroconf, "ServiceInfo", SlowInfo)
    monkeypatch.setattr(zeroconf, "ServiceBrowser", Browser)
    monkeypatch.setattr(discovery, "make_zeroconf", lambda interface=None: Stack())
    before = threading.active_count()
    items = browse.browse("_ipp._tcp")
    assert next(items) is None  # idle: nothing announced yet
    [changed] = seen_handlers
    stype = "_ipp._tcp.local."

    def announce(name: str, state: object) -> None:
        changed(zeroconf=None, service_type=stype, name=f"{name}.{stype}", state_change=state)

    def next_item() -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            item = next(items)
            if item is not None:
                return item
        raise AssertionError("no item within 10 s")

    for i in range(2000):
        announce(f"forged-{i}", zeroconf.ServiceStateChange.Added)
    assert threading.active_count() - before <= discovery.RESOLVER_THREADS
    gate.set()
    added = [next_item() for _ in range(discovery.MAX_PENDING)]
    deadline = time.monotonic() + 1.0  # the backlog is drained: any more would come now
    while time.monotonic() < deadline:
        item = next(items)
        if item is not None:
            added.append(item)
    # what waited (the bounded queue) plus what the few threads had taken: not 2000
    assert len(added) <= discovery.MAX_PENDING + discovery.RESOLVER_THREADS
    assert {(i["event"], i["type"], i["port"]) for i in added} == {("added", "_ipp._tcp", 631)}
    names = [i["name"] for i in added]
    assert len(set(names)) == len(names) and "forged-0" in names

    # a name seen again is an update; removed, then seen again, it is added anew
    announce("forged-0", zeroconf.ServiceStateChange.Updated)
    assert next_item()["event"] == "updated"
    announce("forged-0", zeroconf.ServiceStateChange.Removed)
    assert next_item()["event"] == "removed"
    announce("forged-0", zeroconf.ServiceStateChange.Added)
    assert next_item()["event"] == "added"
    items.close()


def test_a_terminal_too_narrow_for_the_table_gets_every_field_of_every_instance() -> None:
    from eda.cli.common import Context
    from eda.cli.output import Environment, Output
    from eda.cli.registryviews import print_instances as _print_instances

    record = {
        "service": "orders",
        "id": "orders-10-200-200-200-65535",
        "host": "10.200.200.200",
        "port": 65535,
        "status": "passing",
        "weight": 3,
        "meta": {"zone": "a"},
        "heartbeat": 0,
    }
    screen = bytearray()
    env = Environment(write=screen.extend, stdout_isatty=True, width=40, colour=False)
    _print_instances([record, {**record, "id": "second"}], Output(Context("t", False), env=env))
    shown = screen.decode()
    for text in ("orders-10-200-200-200-65535", "second", "10.200.200.200:65535", "zone=a"):
        assert text in shown, shown
    assert "SERVICE" in shown and "META" in shown


def test_a_serverless_announcement_carries_the_registrants_key_and_lookups_admit_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TXT k= is the record's key (never user metadata); a plain lookup keeps keyless
    instances only, and an announced key that is not a key drops the record."""
    from eda.core import mdns
    from eda.core.registry import serverless

    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    txt = serverless.txt_of(rec(key=key, meta={"zone": "a"}))
    assert txt["k"] == key
    heard = [
        mdns.Instance("secure._eda-svc._tcp.local.", 8080, "", ["10.0.0.1"], txt),
        mdns.Instance(
            "plain._eda-svc._tcp.local.", 8081, "", ["10.0.0.1"], {**txt, "id": "plain", "k": ""}
        ),
        mdns.Instance(
            "forged._eda-svc._tcp.local.", 8082, "", ["10.0.0.1"], {**txt, "id": "forged", "k": "?"}
        ),
    ]
    secure = serverless.instance_of(heard[0])
    assert secure is not None and (secure.key, secure.meta) == (key, {"zone": "a"})
    assert serverless.instance_of(heard[2]) is None
    monkeypatch.setattr(mdns, "one_shot_query", lambda *_a, **_k: heard)
    said: list[str] = []
    assert [i.id for i in serverless.query(log=said.append)] == ["plain"]
    assert said == [
        "ignoring instance orders/orders-10-0-0-1-8080 at 10.0.0.1:8080: "
        "it is in secure mode (--secure) and this program is not"
    ]
