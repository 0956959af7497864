"""eda-registry serve under attack: crafted and random frames, floods, a lying peer.

Each test keeps a well-behaved client registered and looking up while the
attack runs and after it; the daemon must stay up, keep its state, and say
what it dropped in a few rate-limited warnings.  Property tests check the
request decoder and the DNS responder on any input.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eda.core.errors import EdaError
from eda.core.mdns import build_query
from eda.core.registry import dns, protocol
from eda.core.registry.model import MAX_REV, from_dict
from tests.helpers import Proc, Procs, command, run, wait_until

GOOD = {"service": "orders", "host": "127.0.0.1", "port": 8080, "ttl": 30.0, "interval": 10.0}


def serve(procs: Procs, *args: str) -> tuple[Proc, str]:
    proc = procs.eda(
        "eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "--tick", "0.1", *args
    )
    return proc, proc.wait_stderr(r"listening on (tcp://\S+)").group(1)


class Dealer:
    """A raw client socket: sends any frames, waits for replies with a deadline."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frames: list[bytes], timeout: float = 5.0) -> dict[str, Any]:
        self.sock.send_multipart(frames)
        assert self.sock.poll(int(timeout * 1000)), f"no reply to {frames[0][:60]!r}"
        reply = json.loads(self.sock.recv())
        assert isinstance(reply, dict)
        return reply

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.ask([json.dumps(msg).encode()])


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def good_client_works(client: Dealer, port: int = 8080) -> None:
    """The well-behaved client: its heartbeat is taken and its lookup finds it."""
    beat = client.request({"op": "heartbeat", "rid": 1, "instance": {**GOOD, "port": port}})
    assert beat["ok"] is True, beat
    found = client.request({"op": "lookup", "rid": 2, "service": "orders"})
    assert found["ok"] is True and port in [i["port"] for i in found["instances"]], found


def register_body(**change: object) -> bytes:
    return json.dumps({"op": "register", "rid": 9, "instance": {**GOOD, **change}}).encode()


HUGE = "9" * 4300  # the largest int JSON can carry in Python (int() limit); +1 has 4301 digits
CRAFTED: list[bytes] = [
    # the 4.4 KB request that once killed the daemon at its next snapshot or expiry
    b'{"op":"register","instance":{"service":"evil","host":"10.0.0.9","port":1,"ttl":0.2,'
    b'"interval":0.1,"rev":' + HUGE.encode() + b"}}",
    b'{"op":"heartbeat","instance":{"service":"evil","host":"h","port":2,"rev":'
    + HUGE.encode()
    + b"}}",
    register_body(rev=-1),
    register_body(rev=MAX_REV + 1),
    register_body(rev=1.5),
    register_body(port=2**70),
    register_body(port=-1),
    register_body(weight=10**30),
    register_body(ttl=1e308, interval=1.0),
    register_body(interval=-5),
    register_body(registered=1e20),
    register_body(heartbeat=-1e20),
    b'{"op":"register","instance":{"service":"x","host":"h","port":1,"ttl":NaN}}',
    b'{"op":"register","instance":{"service":"x","host":"h","port":1,"heartbeat":Infinity}}',
    b'{"op":"register","instance":{"service":"x","host":"h","port":1,"registered":-Infinity}}',
    register_body(meta={"k": "\ud800"}),  # a lone surrogate: not UTF-8 text
    register_body(meta={f"k{i}": "" for i in range(2000)}),
    register_body(meta={"k": {"nested": [1, 2, 3]}}),
    register_body(meta=[["k", "v"]]),
    register_body(service="orders\n"),
    register_body(host="h" * 10_000),
    register_body(id="x" * 64),
    register_body(status=["passing"]),
    register_body(registry="r" * 100),
    register_body(registry={"id": 1}),
    b'{"op":"register","instance":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"op":"register","rid":' + b"[" * 20_000 + b"}",
    b'{"op":"lookup","service":"orders","rid":"\\ud800"}',  # an unencodable rid to echo
    b'{"op":"lookup","service":"orders","rid":' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"op":"lookup","service":"orders","rid":' + HUGE.encode() + b"}",
    b'{"op":"lookup","service":"orders","all":"yes"}',
    b'{"op":"lookup","service":7}',
    b'{"op":["lookup"]}',
    b'{"op":"deregister","id":' + HUGE.encode() + b"}",
    b'{"op":"deregister","id":"' + b"x" * 5000 + b'"}',
    b'{"op":"snapshot","service":{"a":1},"owned":1}',
    b"\xff\xfe\x00garbage",
    b'{"op":"lookup","service":"or\xffders"}',  # invalid UTF-8 inside a string
    b"",
    b"null",
    b"1e999999",
]


def attack(client: Dealer, frames: list[bytes]) -> list[dict[str, Any]]:
    """Send each frame; every one must be answered with a refusal."""
    replies = []
    for frame in frames:
        reply = client.ask([frame])
        assert reply.get("ok") is False and reply.get("code") in (1, 2, 3), (frame[:80], reply)
        replies.append(reply)
    return replies


@pytest.mark.parametrize("with_data", [False, True], ids=["memory", "data"])
def test_a_huge_revision_cannot_kill_serve(
    procs: Procs, zctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path, with_data: bool
) -> None:
    args = ("--data", str(tmp_path / "data")) if with_data else ()
    server, ep = serve(procs, *args)
    client = Dealer(zctx, ep)
    good_client_works(client)
    reply = client.ask([CRAFTED[0]])
    assert (reply["ok"], reply["code"]) == (False, 2) and "revision" in reply["error"]
    # past its would-be TTL, an expiry sweep and a snapshot: still serving
    wait_until(lambda: "dropped malformed request" in server.stderr, 5, "the warning")
    for _ in range(10):
        good_client_works(client)
    assert server.popen.poll() is None, server.stderr
    assert lookup_ports(ep, "evil") == []


def lookup_ports(ep: str, name: str) -> list[int]:
    result = run("eda-registry", "lookup", name, "--registry", ep, "--all")
    return sorted(json.loads(line)["port"] for line in result.stdout.splitlines())


def random_frames(rng: random.Random, n: int) -> Iterator[bytes]:
    """Random bytes, and random JSON that looks like requests."""
    values: list[object] = [
        None, True, -1, 0, 2**64, 10**300, 1e308, -1e-308, "", "x" * 300, "\u202e", [], {}, [[[]]],
        "orders", 8080, "passing", "127.0.0.1",
    ]  # fmt: skip
    keys = ["op", "rid", "instance", "service", "host", "port", "rev", "ttl", "interval", "meta"]
    ops = [*protocol.OPS, "nope"]
    for _ in range(n):
        if rng.random() < 0.3:
            yield rng.randbytes(rng.randint(0, 300))
            continue
        inst = {k: rng.choice(values) for k in rng.sample(keys[3:], rng.randint(0, 7))}
        msg: dict[str, object] = {"op": rng.choice(ops), "rid": rng.choice(values)}
        msg["instance"] = {**GOOD, **inst} if rng.random() < 0.5 else inst
        msg.update({k: rng.choice(values) for k in rng.sample(keys[1:], 2)})
        if isinstance(msg["instance"], dict):  # never a valid record: state must not change
            msg["instance"]["port"] = rng.choice([0, -1, 2**64, "80", None, 1.5])
        yield json.dumps(msg).encode()


def test_serve_keeps_serving_a_good_client_through_crafted_random_and_flooded_frames(
    procs: Procs, zctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    data = str(tmp_path / "data")
    server, ep = serve(procs, "--data", data, "--dns", "127.0.0.1:0")
    dns_port = int(server.wait_stderr(r"DNS on 127\.0\.0\.1:(\d+)").group(1))
    good, hostile = Dealer(zctx, ep), Dealer(zctx, ep)
    good_client_works(good)
    replies = attack(hostile, CRAFTED)
    good_client_works(good)
    # random frames, with the good client served between every batch
    rng = random.Random(6)
    frames = list(random_frames(rng, 600))
    for start in range(0, len(frames), 50):
        for frame in frames[start : start + 50]:
            reply = hostile.ask([frame])
            assert isinstance(reply.get("ok"), bool)
        good_client_works(good)
    # multipart frames, and a flood from many sockets that never read their replies
    hostile.sock.send_multipart([b"{}", b"x", b"y"])
    assert hostile.sock.poll(5000)
    assert json.loads(hostile.sock.recv())["ok"] is False
    flooders = [Dealer(zctx, ep) for _ in range(20)]
    for flooder in flooders:
        for frame in CRAFTED[:10] * 10:
            flooder.sock.send(frame, zmq.NOBLOCK)
    good_client_works(good)
    # oversized: the registry drops that connection; the others go on
    big = Dealer(zctx, ep)
    big.sock.send(b"x" * (protocol.MAX_MESSAGE + 1))
    good_client_works(good)
    # DNS: garbage over UDP, idle and half-sent TCP connections, then real questions
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(200):
        udp.sendto(rng.randbytes(rng.randint(0, 600)), ("127.0.0.1", dns_port))
    udp.close()
    idle = [socket.create_connection(("127.0.0.1", dns_port), 5) for _ in range(80)]
    for conn in idle[:40]:
        conn.sendall(b"\xff\xff" + rng.randbytes(100))  # announces 64 KiB, sends 100 bytes
    answer = dig(dns_port, "+tcp")
    assert answer.returncode == 0 and "8080 orders-127-0-0-1-8080" in answer.stdout, answer
    for conn in idle:
        conn.close()
    good_client_works(good)
    assert server.popen.poll() is None, server.stderr
    # everything refused changed nothing: only the good instance is registered
    listed = run("eda-registry", "list", "--registry", ep)
    assert [json.loads(line)["port"] for line in listed.stdout.splitlines()] == [8080]
    # the refusals were said, in a few rate-limited lines, not one per frame
    warnings = [line for line in server.stderr.splitlines() if "malformed" in line]
    assert 1 <= len(warnings) <= 10, server.stderr
    assert "revision" in replies[0]["error"]
    # and what it saved reads back: a restart serves the good instance
    server.kill()
    again, ep2 = serve(procs, "--data", data)
    assert again.popen.poll() is None
    wait_until(lambda: lookup_ports(ep2, "orders") == [8080], 10, "restored instance")
    assert "unreadable" not in again.stderr


def dig(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=3", *args,
         "orders.service.eda", "SRV"],
        capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip


class FakePeer:
    """A registry that lies: its hello, snapshot replies and change stream are garbage."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.xpub: zmq.Socket[bytes] = ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.LINGER, 0)
        self.pub_port = self.xpub.bind_to_random_port("tcp://127.0.0.1")

    def answer(self, replies: list[bytes], timeout: float = 10.0) -> None:
        """Answer the next request(s) with *replies*, one each."""
        for reply in replies:
            assert self.router.poll(int(timeout * 1000)), "the registry never asked"
            ident, _body = self.router.recv_multipart()
            self.router.send_multipart([ident, reply])


def test_a_lying_peer_registry_cannot_crash_or_corrupt_serve(
    procs: Procs, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    peer = FakePeer(zctx)
    server, ep = serve(procs, "--peer", peer.endpoint, "--peer-timeout", "5")
    good = Dealer(zctx, ep)
    good_client_works(good)
    # a hello naming thousands of peers and a bad port first, then a usable one
    peer.answer(
        [
            json.dumps({"registry": "liar", "pub_port": 2**40, "peers": []}).encode(),
        ]
    )
    peer.answer(
        [
            json.dumps(
                {
                    "registry": "liar",
                    "pub_port": peer.pub_port,
                    "peers": [f"tcp://127.0.0.{i % 250 + 1}:{i + 1}" for i in range(5000)]
                    + [{"x": 1}, "not an endpoint"],
                }
            ).encode()
        ],
        timeout=15,
    )
    # wait for the registry's subscriptions (events and ticks), then stream garbage
    for _ in range(2):
        assert peer.xpub.poll(10_000)
        peer.xpub.recv()
    evil = {**GOOD, "service": "evil", "registry": "liar", "rev": 1}
    stream: list[list[bytes]] = [
        [b"tick", json.dumps({"registry": "liar", "seq": 1}).encode()],
        [b"ev.evil.", b"\xff"],
        [b"ev.evil.", json.dumps({"type": "registered", "instance": {**evil, "rev": 2**80}}).encode()],
        [b"ev.evil.", json.dumps({"type": "registered", "instance": {**evil, "heartbeat": 1e300}}).encode()],
        [b"ev.evil.", json.dumps({"type": "registered", "registry": ["x"], "instance": evil}).encode()],
        [b"ev.evil.", json.dumps({"type": "registered", "reason": "r" * 10_000, "instance": evil}).encode()],
        [b"ev.evil.", b"[" * 5000],
        [b"ev.evil.", b"{}", b"third frame"],
        [b"tick", json.dumps({"registry": {"nested": 1}}).encode()],
    ]  # fmt: skip
    for frames in stream:
        peer.xpub.send_multipart(frames)
    # once alive, the registry asks for the peer's records: the snapshot reply lies too
    peer.answer(
        [json.dumps({"registry": "liar", "instances": [evil, {**evil, "port": -1}]}).encode()]
    )
    for _ in range(5):
        good_client_works(good)
    assert server.popen.poll() is None, server.stderr
    assert lookup_ports(ep, "evil") == []  # nothing invalid was stored
    assert "dropped malformed" in server.stderr
    peer.router.close()
    peer.xpub.close()


# -- properties ----------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from([*protocol.OPS, "x"])},
    optional={
        "rid": json_values,
        "service": st.sampled_from(["orders", "", "Bad!"]) | json_values,
        "id": json_values,
        "all": json_values,
        "owned": json_values,
        "instance": st.fixed_dictionaries(
            {},
            optional={
                k: json_values | st.just(v)
                for k, v in {**GOOD, "rev": 3, "meta": {"a": "b"}}.items()
            },
        )
        | json_values,
    },
)


def _checked(frame: bytes) -> None:
    try:
        req = protocol.parse_request(frame)
    except EdaError:
        return
    if req.instance is not None:  # what is accepted survives JSON and validation again
        data = json.loads(protocol.encode(req.instance.to_dict()))
        assert from_dict(data) == req.instance
    assert req.rid is None or isinstance(req.rid, (int, str))
    protocol.encode({"rid": req.rid})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_request_decoder_takes_any_bytes(frame: bytes) -> None:
    _checked(frame)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_like)
def test_request_decoder_takes_any_request_shaped_json(msg: dict[str, Any]) -> None:
    _checked(json.dumps(msg).encode())


def _walk_reply(reply: bytes, limit: int) -> None:
    """A reply is well formed: header counts match records that end exactly at the end."""
    assert 12 <= len(reply) <= limit
    _qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0x8000  # a response
    offset = 12
    for _ in range(qd):
        _labels, offset = dns.read_name(reply, offset)
        offset += 4
    for _ in range(an + ns + ar):
        _labels, offset = dns.read_name(reply, offset)
        rtype, _cls, _ttl, size = struct.unpack_from("!HHIH", reply, offset)
        offset += 10
        if rtype == dns.TYPE_SRV:
            dns.read_name(reply, offset + 6)
        offset += size
    assert offset == len(reply)


INSTANCES = [
    from_dict({**GOOD, "port": 1000 + i, "host": f"10.0.0.{i + 1}", "weight": i}) for i in range(30)
]
RESPONDER = dns.Responder(lambda name: INSTANCES if name == "orders" else None)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_dns_responder_takes_any_bytes(packet: bytes) -> None:
    for tcp in (False, True):
        reply = RESPONDER.answer(packet, tcp=tcp)
        if reply is not None:
            _walk_reply(reply, 65535 if tcp else 4096)
            assert reply[:2] == packet[:2]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["orders", "_orders", "_tcp", "service", "eda", "x", "Orders-1000"]),
        max_size=6,
    ),
    st.sampled_from([1, 33, 255, 28, 0]),
    st.integers(0, 65535),
    st.booleans(),
)
def test_dns_responder_answers_well_formed_questions(
    labels: list[str], qtype: int, qid: int, tcp: bool
) -> None:
    name = ".".join(labels) or "eda"
    reply = RESPONDER.answer(build_query(name, qtype, qid), tcp=tcp)
    assert reply is not None
    _walk_reply(reply, 65535 if tcp else 512)
    assert struct.unpack_from("!H", reply)[0] == qid


def test_a_lying_registry_cannot_feed_lookup_bad_records(
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    liar = FakePeer(zctx)  # answers the client's requests itself
    bad = [
        {**GOOD, "port": 2**40},
        {**GOOD, "host": "h\x1b]0;x\x07"},
        {**GOOD, "heartbeat": 1e300},
        "not a record",
    ]
    good = {**GOOD, "id": "fine", "registry": "liar"}
    proc = subprocess.Popen(
        [*command("eda-registry", "lookup", "orders", "--registry", liar.endpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    liar.answer([json.dumps({"rid": 1, "ok": True, "instances": [*bad, good]}).encode()])
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert [json.loads(line)["id"] for line in out.decode().splitlines()] == ["fine"]
    assert "left out 4 invalid record(s)" in err.decode()
    liar.router.close()
    liar.xpub.close()


def test_a_lying_registry_cannot_stop_watch(zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    liar = FakePeer(zctx)
    proc = subprocess.Popen(
        command("eda-registry", "watch", "orders", "-C", "1", "--registry", liar.endpoint),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    record = {**GOOD, "id": "fine", "registry": "liar", "rev": 1}

    def reply_to_next(**fields: object) -> str:
        assert liar.router.poll(15_000), "watch never asked"
        ident, body = liar.router.recv_multipart()
        request = json.loads(body)
        liar.router.send_multipart(
            [ident, json.dumps({"rid": request["rid"], "ok": True, **fields}).encode()]
        )
        return str(request["op"])

    peers = ["tcp://*:1", "garbage", 5, "tcp://10.0.0.1:99999"]
    assert reply_to_next(registry="liar", tick=1.0, pub_port=liar.pub_port, peers=peers) == "hello"
    for _ in range(2):  # its subscriptions (ticks and events): now tell it the stream is live
        assert liar.xpub.poll(10_000)
        liar.xpub.recv()
    liar.xpub.send_multipart([b"tick", b'{"registry":"liar","seq":5}'])
    bad_records = [{**record, "port": 0}, {**record, "rev": -1}, ["x"]]
    assert reply_to_next(registry="liar", seq=5, instances=[*bad_records, record]) == "snapshot"
    topic = b"ev.orders."
    good_event = {"id": "fine@2", "type": "health", "reason": "r", "service": "orders",
                  "time": "2026-01-01T00:00:00.000Z", "registry": "liar", "seq": 6,
                  "instance": {**record, "rev": 2, "status": "critical"}}  # fmt: skip
    for frames in (
        [topic, b'{"seq": Infinity}'],  # int(inf) once ended the watch with a traceback
        [topic, b"\xff"],
        [topic, json.dumps({**good_event, "seq": "6"}).encode()],
        [topic, json.dumps({**good_event, "seq": 10**30}).encode()],
        [topic, json.dumps({**good_event, "type": "exploded"}).encode()],
        [topic, json.dumps({**good_event, "instance": {**record, "rev": 2**80}}).encode()],
        [topic, json.dumps({**good_event, "reason": ["x"]}).encode()],
        [topic, json.dumps({**good_event, "instance": "fine"}).encode()],
        [topic, json.dumps(good_event).encode()],
    ):
        liar.xpub.send_multipart(frames)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    [shown] = [json.loads(line) for line in out.decode().splitlines()]
    assert (shown["type"], shown["instance"]["status"], shown["seq"]) == ("health", "critical", 6)
    liar.router.close()
    liar.xpub.close()


def test_idle_dns_tcp_connections_are_closed_by_serve(procs: Procs) -> None:
    from eda.cli.registryserve import serve as serve_command

    [option] = [p for p in serve_command.params if p.name == "dns_idle"]
    assert option.default == dns.TCP_IDLE_SECONDS  # what the test shortens is the default
    server, _ep = serve(procs, "--dns", "127.0.0.1:0", "--dns-idle", "0.5")
    port = int(server.wait_stderr(r"DNS on 127\.0\.0\.1:(\d+)").group(1))
    idle = socket.create_connection(("127.0.0.1", port), 5)
    idle.settimeout(30)  # a deadline (the idle time, plus much slack)
    with idle:
        idle.sendall(b"\x00\x40")  # announces a 64-byte query, never sends it
        assert idle.recv(10) == b""  # closed by the registry, not left open forever
    assert dig(port, "+tcp").returncode == 0
    assert server.popen.poll() is None
