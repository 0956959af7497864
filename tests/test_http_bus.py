"""eda-bus serve --http: POST /events with the CloudEvents HTTP binding (binary, structured,
batched), answered once stored; GET /events as Server-Sent Events, identical to eda-sub.
Clients: curl, the official CloudEvents SDK, eda-pub and eda-sub; hostile ones too."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent

from tests.helpers import Proc, Procs, run, trusting, wait_until

SERVING = r"serving .+ on (tcp://\S+) \(seq.*HTTP on (http://\S+)"
BUSSEQ = "edabusseq"


def start(procs: Procs, data: Path, *args: str) -> tuple[Proc, str, str]:
    bus = procs.eda("eda-bus", "serve", "--data", str(data), "--bind", "tcp://127.0.0.1:0",
                    "--no-mdns", "--http", "127.0.0.1:0", *args)  # fmt: skip
    m = bus.wait_stderr(SERVING, 15)
    return bus, m[1], m[2]


def curl(*args: str, data: bytes | None = None) -> tuple[int, dict[str, Any] | None]:
    argv = ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args]
    if data is not None:
        argv += ["--data-binary", "@-"]
    out = subprocess.run(argv, input=data, capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.decode().rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


def post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any] | None]:
    args = [a for k, v in headers.items() for a in ("-H", f"{k}: {v}")]
    if not any(k.lower() == "content-type" for k in headers):
        args += ["-H", "content-type:"]  # (curl would send a form's type)
    return curl(*args, f"{url}/events", data=body)


def sub_all(ep: str, n: int, *args: str) -> list[str]:
    """What eda-sub --bus prints (JSON Lines) for the first *n* events stored."""
    out = run("eda-sub", "--bus", ep, "--from-start", "-C", str(n), "--json", *args, ">")
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_curl_publishes_in_the_three_modes_and_eda_sub_reads_them(procs: Procs, tmp_path: Path) -> None:
    _bus, ep, url = start(procs, tmp_path / "bus")
    status, body = post(url, {"ce-specversion": "1.0", "ce-type": "orders.created",
                              "ce-id": "o-1", "ce-source": "/shop", "ce-region": "eu%20west",
                              "content-type": "application/json"}, b'{"total": 12.5}')  # fmt: skip
    assert (status, body) == (201, {"stored": 1, "first_seq": 1, "last_seq": 1})
    status, body = post(url, {"content-type": "application/cloudevents+json"}, json.dumps(
        {"specversion": "1.0", "type": "orders.paid", "id": "o-2", "source": "/shop",
         "data": "paid"}).encode())  # fmt: skip
    assert (status, body) == (201, {"stored": 1, "first_seq": 2, "last_seq": 2})
    batch = [{"specversion": "1.0", "type": t, "id": f"b-{i}", "source": "/batch", "data": i}
             for i, t in enumerate(["a.x", "a.x", "b.y", "a.x"])]  # fmt: skip
    status, body = post(url, {"content-type": "application/cloudevents-batch+json"},
                        json.dumps(batch).encode())  # fmt: skip
    assert (status, body) == (201, {"stored": 4, "first_seq": 3, "last_seq": 6})
    events = [json.loads(line) for line in sub_all(ep, 6)]
    assert [e["type"] for e in events] == ["orders.created", "orders.paid", "a.x", "a.x", "b.y",
                                           "a.x"]  # fmt: skip
    assert events[0]["data"] == {"total": 12.5} and events[0]["region"] == "eu west"
    assert events[0]["datacontenttype"] == "application/json"
    assert (events[0]["id"], events[0]["source"]) == ("o-1", "/shop")
    assert events[1]["data"] == "paid" and [e["data"] for e in events[2:]] == [0, 1, 2, 3]
    assert [e[BUSSEQ] for e in events] == [1, 2, 3, 4, 5, 6]
    # ... and eda-pub over ZeroMQ shares the same log, after them
    done = run("eda-pub", "--bus", ep, "--confirm", "orders.created", input="zmq\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(sub_all(ep, 7)[6])["data"] == "zmq"


def test_cloudevents_sdk_binary_and_structured_read_back_unchanged(procs: Procs, tmp_path: Path) -> None:
    _bus, ep, url = start(procs, tmp_path / "bus")
    sent = [
        CloudEvent({"type": "sdk.json", "source": "/sdk", "subject": "s1"}, {"a": [1, "é"]}),
        CloudEvent({"type": "sdk.bytes", "source": "/sdk",
                    "datacontenttype": "application/octet-stream"}, b"\x00\xff\x10binary"),
        CloudEvent({"type": "sdk.text", "source": "/sdk", "datacontenttype": "text/plain",
                    "tenant": "t1"}, "plain text"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in (to_binary, to_structured):
            for event in sent:
                headers, body = mode(event)
                assert post(url, dict(headers), body)[0] == 201, (mode, event)
    lines = sub_all(ep, 6)
    got = [json.loads(line) for line in lines]
    for i, back in enumerate(got):
        event = sent[i % 3]
        want = json.loads(to_structured(event)[1])  # the SDK's own structured JSON
        assert (back.pop(BUSSEQ), back.pop("edaseq")) == (i + 1, i + 1)  # eda's hop stamps
        if i % 3 == 2 and i < 3:  # binary text: the SDK v1 JSON-encodes str data in the body
            want["data"] = json.dumps(event.data)
        assert back == want, (i, back, want)
    assert base64.b64decode(got[1]["data_base64"]) == b"\x00\xff\x10binary"
    # the HTTP stream sends each event exactly as eda-sub prints it, byte for byte
    sse = subprocess.run(["curl", "-sSN", "--max-time", "3", f"{url}/events?topic=sdk.>&from-start"],
                         capture_output=True, timeout=20)  # fmt: skip
    datas = [line[6:] for line in sse.stdout.decode().splitlines() if line.startswith("data: ")]
    assert datas == lines


@pytest.mark.long
def test_sse_replays_and_tails_from_each_start(procs: Procs, tmp_path: Path) -> None:
    _bus, ep, url = start(procs, tmp_path / "bus")
    done = run("eda-pub", "--bus", ep, "--confirm", "t.one", input="1\n2\n3\n")
    assert done.returncode == 0, done.stderr
    tail = procs.start(["curl", "-sSN", f"{url}/events?topic=t.*&from-seq=2"])
    live = procs.start(["curl", "-sSN", f"{url}/events?topic=t.*"])
    durable = procs.start(["curl", "-sSN", f"{url}/events?topic=t.>&durable=web"])

    def seqs(proc: Proc) -> list[int]:
        return [int(line[4:]) for line in proc.stdout.splitlines() if line.startswith("id: ")]

    wait_until(lambda: seqs(tail) == [2, 3] and seqs(durable) == [1, 2, 3], what="replay")
    wait_until(lambda: ": from bus sequence" in live.stdout, what="live stream open")
    assert post(url, {"ce-specversion": "1.0", "ce-type": "t.two", "ce-id": "x",
                      "ce-source": "/x"}, b"4")[0] == 201  # fmt: skip
    done = run("eda-pub", "--bus", ep, "--confirm", "other.topic", input="not for them\n")
    assert done.returncode == 0
    wait_until(lambda: seqs(tail) == [2, 3, 4] and seqs(live) == [4] and seqs(durable) == [1, 2, 3, 4],
               what="live event")  # fmt: skip
    # the durable consumer resumes where it was; a browser resumes after its Last-Event-ID
    durable.signal(15)
    durable.wait()
    assert post(url, {"ce-specversion": "1.0", "ce-type": "t.two", "ce-id": "y",
                      "ce-source": "/x"}, b"6")[0] == 201  # fmt: skip
    again = procs.start(["curl", "-sSN", f"{url}/events?topic=t.>&durable=web"])
    resumed = procs.start(["curl", "-sSN", "-H", "Last-Event-ID: 3", f"{url}/events?topic=t.>"])
    wait_until(lambda: seqs(again) == [6] and seqs(resumed) == [4, 6], what="resumed")
    since = subprocess.run(["curl", "-sSN", "--max-time", "2", f"{url}/events?topic=t.>&since=1h"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
    assert [ln for ln in since.stdout.splitlines() if ln.startswith("id: ")] == \
        ["id: 1", "id: 2", "id: 3", "id: 4", "id: 6"]  # fmt: skip


def test_bad_requests_store_nothing_and_the_bus_goes_on(procs: Procs, tmp_path: Path) -> None:
    bus, ep, url = start(procs, tmp_path / "bus", "--max-event-bytes", "1000")
    ce = {"ce-specversion": "1.0", "ce-type": "ok.topic", "ce-id": "1", "ce-source": "/s"}
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({"content-type": "application/cloudevents+json"}, b'{"type": "x", ', 400, "invalid JSON"),
        ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "id": "1"}',
         400, "type"),
        ({"content-type": "application/cloudevents-batch+json"},
         b'[{"specversion": "1.0", "type": "a.b", "id": "1", "source": "/s"}, {"type": 5}]',
         400, "event 2"),
        ({"content-type": "application/json"}, b'{"no": "ce headers"}', 415, "ce-specversion"),
        ({**ce, "ce-type": "bad..topic"}, b"x", 400, "topic"),
        ({**ce, "content-type": "application/json"}, b"{not json", 400, "not valid JSON"),
        ({**ce, "ce-bad_name": "5"}, b"x", 400, "attribute name"),
        (ce, b"x" * 5000, 413, "1000"),
    ]  # fmt: skip
    for headers, body, status, words in cases:
        got, doc = post(url, headers, body)
        assert doc is not None
        assert (got, doc.get("status")) == (status, status), (headers, body, doc)
        assert words in doc["detail"], doc
    assert curl(f"{url}/events")[0] == 400  # no topic
    assert curl(f"{url}/events?topic=a&from-start&from-seq=3")[0] == 400
    assert curl(f"{url}/nothing")[0] == 404
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /events HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    stats = run("eda-bus", "stats", "--bus", ep, "--json")
    rows = [json.loads(line) for line in stats.stdout.splitlines()]
    assert next(r for r in rows if r["kind"] == "bus")["events"] == 0  # nothing of it stored
    assert post(url, ce, b"fine")[0] == 201
    assert bus.popen.poll() is None


def test_secure_mode_refuses_http_off_loopback_and_with_an_acl(procs: Procs, tmp_path: Path) -> None:
    ident = trusting(tmp_path, ["bus"])["bus"]
    acl = tmp_path / "acl.toml"
    acl.write_text('[default]\npublish = [">"]\n')
    for http, extra, words in (("0.0.0.0:0", (), "loopback address only"),
                               ("127.0.0.1:0", ("--acl", str(acl)), "--acl")):  # fmt: skip
        out = run("eda-bus", "serve", "--secure", "--data", str(tmp_path / "d"), "--no-mdns",
                  "--bind", "tcp://127.0.0.1:0", "--http", http, *extra, env=ident.env)  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert words in out.stderr and len(out.stderr.splitlines()) == 1


def test_a_bad_time_is_a_400_and_good_events_around_it_are_stored(procs: Procs, tmp_path: Path) -> None:
    """ce-time (binary mode) and "time" (structured, batched) are RFC 3339 timestamps,
    checked as eda-pub --envelope checks them: a bad one is the client's fault (400,
    nothing of that request stored); the requests before and after it are stored."""
    _bus, ep, url = start(procs, tmp_path / "bus")
    ce = {"ce-specversion": "1.0", "ce-type": "timed.x", "ce-source": "/t"}
    assert post(url, {**ce, "ce-id": "1", "ce-time": "2026-12-07T12:00:00Z"}, b"a")[0] == 201
    for bad in ("yesterday", "2026-12-07 12:00:00Z", "2026-02-30T00:00:00Z"):
        code, doc = post(url, {**ce, "ce-id": "x", "ce-time": bad}, b"b")
        assert code == 400 and doc is not None, doc
        assert "time" in doc["detail"] and "RFC 3339" in doc["detail"], doc
    event = {"specversion": "1.0", "type": "timed.x", "id": "s", "source": "/t", "data": 1}
    code, doc = post(url, {"content-type": "application/cloudevents+json"},
                     json.dumps({**event, "time": "12:00"}).encode())  # fmt: skip
    assert code == 400 and doc is not None and "RFC 3339" in doc["detail"], doc
    batch = [{**event, "id": "b1", "time": "2026-12-07T12:00:01Z"}, {**event, "time": 5}]
    code, doc = post(url, {"content-type": "application/cloudevents-batch+json"},
                     json.dumps(batch).encode())  # fmt: skip
    assert code == 400 and doc is not None and "event 2" in doc["detail"], doc
    stamp = "2026-12-07T13:00:00.5+01:00"
    assert post(url, {**ce, "ce-id": "2", "ce-time": stamp.replace("+", "%2B")}, b"c")[0] == 201
    got = [json.loads(line) for line in sub_all(ep, 2)]
    assert [(e["id"], e["time"], e["data"]) for e in got] == [
        ("1", "2026-12-07T12:00:00Z", "a"), ("2", stamp, "c")]  # fmt: skip
    stats = run("eda-bus", "stats", "--bus", ep, "--json")
    rows = [json.loads(line) for line in stats.stdout.splitlines()]
    assert next(r for r in rows if r["kind"] == "bus")["events"] == 2  # nothing else stored


def test_binary_mode_decodes_ce_headers_as_the_nats_binding_does(procs: Procs, tmp_path: Path) -> None:
    """One decoder for ce-* headers (core/binding.from_headers), over HTTP as over NATS:
    percent-encoded UTF-8, and a double-quoted value (older binding versions) unquoted."""
    from eda.core import binding

    _bus, ep, url = start(procs, tmp_path / "bus")
    headers = {"ce-specversion": "1.0", "ce-type": "dec.x", "ce-id": "1", "ce-source": "/d",
               "ce-subject": '"quoted value"', "ce-region": "Euro%20%E2%82%AC",
               "ce-plain": "a+b"}  # fmt: skip
    assert post(url, headers, b"x")[0] == 201
    (got,) = [json.loads(line) for line in sub_all(ep, 1)]
    want = binding.from_headers(headers.items())
    assert {k: got[k] for k in ("subject", "region", "plain")} == {
        k: want[k] for k in ("subject", "region", "plain")} == {
        "subject": "quoted value", "region": "Euro €", "plain": "a+b"}  # fmt: skip
