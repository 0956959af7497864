"""Any ZeroMQ binding can talk to eda's servers with a plain REQ socket.

A REQ socket puts an empty delimiter frame before its request and takes only
a reply that starts with one; eda's ROUTER services echo back the envelope a
request came with (up to and including the delimiter), as the zguide's
servers do, so REQ and DEALER clients are answered alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import zmq

from eda.core import reqrep
from tests import helpers
from tests.helpers import Procs
from tests.test_bus import start_bus
from tests.test_bus_nats import free_port
from tests.test_registry import serve as serve_registry

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")


def req(endpoint: str, frames: list[bytes], timeout: float = 10.0) -> list[bytes] | None:
    """What a fresh REQ socket gets back for *frames* (None: no reply in *timeout*)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(int(timeout * 1000)):
            return None
        return sock.recv_multipart()
    finally:
        sock.close()


def ask(endpoint: str, msg: dict[str, Any]) -> dict[str, Any]:
    reply = req(endpoint, [json.dumps(msg).encode()])
    assert reply is not None, f"no reply to a REQ socket from {endpoint}"
    assert len(reply) == 1, reply
    decoded = json.loads(reply[0])
    assert isinstance(decoded, dict)
    return decoded


def test_the_registry_answers_a_req_socket(procs: Procs) -> None:
    _, ep = serve_registry(procs)
    record = {"service": "orders", "host": "10.1.0.1", "port": 8080, "ttl": 120, "interval": 40}
    registered = ask(ep, {"op": "register", "instance": record, "rid": 6})
    assert registered["ok"] is True and registered["rid"] == 6
    hello = ask(ep, {"op": "hello", "rid": 7})
    assert hello["ok"] is True and hello["rid"] == 7 and hello["registry"]
    found = ask(ep, {"op": "lookup", "service": "orders", "rid": "r2"})
    assert found["ok"] is True and found["rid"] == "r2"
    assert [i["port"] for i in found["instances"]] == [8080]
    refused = ask(ep, {"op": "explode", "rid": 3})  # refused requests are answered too
    assert refused["ok"] is False and "unknown operation" in refused["error"]
    # and a DEALER (no delimiter) is still answered as before
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(ep)
    dealer.send(json.dumps({"op": "hello", "rid": 8}).encode())
    assert dealer.poll(10_000)
    assert json.loads(dealer.recv())["rid"] == 8
    dealer.close()


def test_the_bus_answers_a_req_socket(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    reply = req(ep, [b"R", json.dumps({"op": "stats", "rid": 1}).encode()])
    assert reply is not None and reply[0] == b"A" and len(reply) == 2, reply
    stats = json.loads(reply[1])
    assert stats["ok"] is True and stats["rid"] == 1 and "stats" in stats
    # a subscription streams: a REQ socket is told so, in one reply, and the bus serves on
    sub = req(ep, [b"R", json.dumps({"op": "sub", "patterns": [">"], "rid": 2}).encode()])
    assert sub is not None and sub[0] == b"A", sub
    refused = json.loads(sub[1])
    assert refused["ok"] is False and "DEALER" in refused["error"] and refused["rid"] == 2
    publish = req(ep, [b"P", b"\0" * 8, b"t", b"h", b"body"])
    assert publish is not None and json.loads(publish[1])["ok"] is False
    again = req(ep, [b"R", json.dumps({"op": "stats", "rid": 3}).encode()])
    assert again is not None and json.loads(again[1])["rid"] == 3


def test_the_txn_coordinator_answers_a_req_socket(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    coordinator = procs.eda("eda-txn", "coordinator", "--name", "c1", "--no-mdns",
                            "--log", str(tmp_path / "txn"),
                            "--bind", f"tcp://127.0.0.1:{port}")  # fmt: skip
    coordinator.wait_stderr("coordinator c1 listening", 15)
    stats = ask(f"tcp://127.0.0.1:{port}", {"op": "stats", "rid": 5})
    assert stats["ok"] is True and stats["rid"] == 5 and stats["name"] == "c1"
    # a commit is answered later (deferred): the reply still finds the REQ socket
    msg = {"op": "commit", "participants": ["ghost"], "timeout": 1, "rid": 6}
    commit = ask(f"tcp://127.0.0.1:{port}", msg)
    assert commit["ok"] is True and commit["rid"] == 6 and commit["outcome"] == "aborted"


@pytest.mark.parametrize(
    ("frames", "envelope", "body"),
    [
        ([b"id", b"{}"], [b"id"], [b"{}"]),  # a DEALER
        ([b"id", b"", b"{}"], [b"id", b""], [b"{}"]),  # a REQ
        ([b"proxy", b"id", b"", b"{}"], [b"proxy", b"id", b""], [b"{}"]),  # through a proxy
        ([b"id", b"P", b"tag", b"t", b"h", b""], [b"id"], [b"P", b"tag", b"t", b"h", b""]),
        ([b"id"], [b"id"], []),
        ([b"id", b""], [b"id"], [b""]),  # a DEALER's empty request: malformed, answered
    ],
)
def test_split_envelope(frames: list[bytes], envelope: list[bytes], body: list[bytes]) -> None:
    assert reqrep.split_envelope(frames, (b"P", b"R")) == (envelope, body)
