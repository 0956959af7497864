"""--nats-format cloudevents: the NATS engine's stream in the CloudEvents NATS binding.

nats-py stands in for any foreign NATS client (and for the ``nats sub`` of the
README: the NATS CLI is not packaged for this machine): it reads the stream a
real eda-bus front wrote and decodes each message by the binding alone
(``ce-`` headers percent-decoded with the standard library, the body as the
data; a structured message's body as a JSON event), and what it finds must
be what eda-sub --bus prints, attribute for attribute, the data byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import hypothesis.strategies as st
import pytest
from hypothesis import given

from eda.core import binding
from eda.core.errors import UsageError
from tests import bus_engines
from tests.bus_engines import Opener, Server
from tests.helpers import Procs, run
from tests.test_bus import replay
from tests.test_bus_nats_cli import new_stream, start_front
from tests.test_bus_store import batch

nats_opener = bus_engines.nats_opener  # a fixture, on this module's server:


@pytest.fixture
def server(procs: Procs, tmp_path: Path) -> Server:
    """This test's own nats-server -js (its processes are checked, as a front's are)."""
    return Server(procs, tmp_path / "jetstream")


async def _read_stream(url: str, subject: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message of the stream on *subject*, as a plain NATS client gets them."""
    import nats

    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject)  # an ephemeral consumer
        out = []
        while (await sub.consumer_info()).num_pending:
            for msg in await sub.fetch(10, timeout=10):
                out.append((msg.subject, msg.data, dict(msg.headers or {})))
                await msg.ack()
        return out
    finally:
        await nc.close()


def _foreign_decode(data: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """A message as the binding defines it, decoded without eda: structured when
    Content-Type says application/cloudevents, else binary (ce- headers)."""
    if headers.get("Content-Type", "").lower().startswith("application/cloudevents"):
        return {"mode": "structured", "event": json.loads(data)}
    attrs = {
        name[3:].lower(): unquote_to_bytes(value).decode("utf-8", errors="strict")
        for name, value in headers.items()
        if name.lower().startswith("ce-")
    }
    return {"mode": "binary", "attributes": attrs, "data": data}


def _canonical(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.long
def test_a_foreign_nats_client_reads_each_event_as_eda_sub_prints_it(
    procs: Procs, server: Server
) -> None:
    srv = server
    stream = new_stream()
    bus, ep = start_front(procs, srv.url, stream, "--nats-format", "cloudevents")
    text = 'plain\nspace and "quote" 100%\ncafé € 😀\n'
    pub = run("eda-pub", "--bus", ep, "--confirm", "-H", "tenant=ac me", "-H", "n=5",
              "-H", "city=zürich", "orders.text", input=text)  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    pub = run("eda-pub", "--bus", ep, "--confirm", "--json", "orders.json",
              input='{"id": 1, "ok": true}\n[1,2]\n')  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    from eda.core.bus.client import BusPublisher

    raw = BusPublisher(ep)  # a payload that is not UTF-8: binary data
    try:
        raw.send("orders.raw", b"\xff\x00\xfe", 1)
        raw.finish()
    finally:
        raw.close()
    envelope = {"specversion": "1.0", "id": "e-1", "source": "/elsewhere", "type": "x",
                "datacontenttype": "application/xml", "data": "<a/>", "sequence": "7"}  # fmt: skip
    pub = run("eda-pub", "--bus", ep, "--confirm", "--envelope", "orders.env",
              input=json.dumps(envelope) + "\n")  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    printed = [json.loads(line) for line in replay(ep, "orders.>", 7)]

    got = asyncio.run(_read_stream(srv.url, "eda.orders.>"))
    assert len(got) == 7  # one message per event
    # (eda-pub --json sends each JSON value compact: that is the published payload)
    assert [subject for subject, _, _ in got] == [f"eda.{e['type']}" for e in printed]
    published = [b"plain", b'space and "quote" 100%', "café € 😀".encode(),
                 b'{"id":1,"ok":true}', b"[1,2]", b"\xff\x00\xfe"]  # fmt: skip
    for (_, data, headers), event, body in zip(got[:6], printed[:6], published, strict=True):
        seen = _foreign_decode(data, headers)
        assert seen["mode"] == "binary"
        expected = {k: _canonical(v) for k, v in event.items() if k not in ("data", "data_base64")}
        assert seen["attributes"] == expected
        assert seen["data"] == body  # byte for byte, as published
        if "data_base64" in event:
            assert base64.b64decode(event["data_base64"]) == body
        elif event["datacontenttype"] == "application/json":
            assert json.loads(body) == event["data"]
        else:
            assert body.decode() == event["data"]
    # the header values are percent-encoded as the binding says (space, '"', '%', non-ASCII)
    assert got[1][2]["ce-tenant"] == "ac%20me" and got[0][2]["ce-city"] == "z%C3%BCrich"
    assert got[0][2]["ce-n"] == "5" and got[0][2]["ce-specversion"] == "1.0"
    # an envelope travels in structured mode: the event as published
    env = _foreign_decode(got[6][1], got[6][2])
    assert env["mode"] == "structured"
    assert env["event"] == {**envelope, "type": "orders.env"}
    assert {k: v for k, v in printed[6].items() if k not in ("edaseq", "edabusseq")} == env["event"]
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0


def test_the_stream_keeps_its_format_and_refuses_another_once_it_holds_events(
    nats_opener: Opener,
) -> None:
    with nats_opener(message_format="cloudevents") as s:
        assert s.format == "cloudevents"
        s.append([batch(1, 3)])
        s.commit()
    with nats_opener() as s:  # not given: the stream's own
        assert s.format == "cloudevents"
        s.append([batch(4, 2)])
        assert s.commit() == 5
        assert [(r.seq, r.size, r.pubseq) for r in s.read(1)] == [(1, 3, 1), (4, 2, 4)]
    with pytest.raises(UsageError, match=r"holds events in the cloudevents message format"):
        nats_opener(message_format="eda")


def test_an_empty_stream_takes_the_format_asked_for(nats_opener: Opener) -> None:
    with nats_opener() as s:
        assert s.format == "eda"
    with nats_opener(message_format="cloudevents") as s:
        assert s.format == "cloudevents" and s.changes[-1].endswith("format eda -> cloudevents")


def test_an_event_too_large_for_a_message_with_its_headers_is_refused(
    nats_opener: Opener,
) -> None:
    from eda.core.bus import EventTooLargeError

    with nats_opener(message_format="cloudevents", max_event_bytes=4 << 20) as s:
        with pytest.raises(EventTooLargeError, match="max payload"):
            s.append([batch(1, 1, width=(1 << 20) - 100)])
        assert s.last_seq == 0


def test_header_values_are_percent_encoded_as_the_binding_says() -> None:
    assert binding.encode_value("Euro € 😀") == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert binding.encode_value('a"b%c') == "a%22b%25c"
    assert binding.encode_value("tcp://x:1/a?b=c&d") == "tcp://x:1/a?b=c&d"
    assert binding.decode_value("Euro%20%e2%82%ac") == "Euro €"  # lower-case hex accepted
    assert binding.decode_value('"a \\"b\\""') == 'a "b"'  # a double-quoted value (older senders)
    with pytest.raises(ValueError, match="not percent-encoded UTF-8"):
        binding.decode_value("%C0%A0")  # an overlong space
    headers = binding.to_headers({"id": "1", "ok": True, "n": 3, "data": "x"})
    assert headers == {"ce-id": "1", "ce-ok": "true", "ce-n": "3"}
    assert binding.from_headers([("CE-Id", "1"), ("Content-Type", "text/plain")]) == {"id": "1"}


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_any_attribute_string_survives_the_headers(text: str) -> None:
    value = binding.encode_value(text)
    assert all(0x21 <= ord(c) <= 0x7E for c in value) and '"' not in value
    assert binding.decode_value(value) == text


def test_durable_consumers_and_groups_go_on_through_a_front_in_the_cloudevents_format(
    procs: Procs, server: Server
) -> None:
    srv = server
    bus, ep = start_front(procs, srv.url, new_stream(), "--nats-format", "cloudevents")
    pub = run("eda-pub", "--bus", ep, "--confirm", "jobs.a", input="".join(f"{i}\n" for i in range(6)))
    assert pub.returncode == 0, pub.stderr
    for want in (["0", "1", "2"], ["3", "4", "5"]):  # each run resumes where the last acked
        took = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "3",
                   "-W", "10")  # fmt: skip
        assert took.stdout.splitlines() == want, took.stderr
    took = run("eda-sub", "--bus", ep, "jobs.>", "--group", "workers", "--from-start", "--raw",
               "-C", "6", "-W", "10")  # fmt: skip
    assert took.stdout.splitlines() == [str(i) for i in range(6)], took.stderr
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0
