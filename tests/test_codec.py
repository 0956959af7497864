import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eda.core import codec, envelope
from eda.core.errors import InputError

ORIGIN = codec.encode_origin("abcd1234", "eda://host/pub/abcd1234")


def frames(
    topic: str, payloads: list[bytes], kind: int = codec.TEXT, seq: int = 1, ext: bytes = b""
) -> list[bytes]:
    header = codec.encode_header(kind, len(payloads), seq, 1_700_000_000.25, ORIGIN)
    out = [topic.encode(), header, b"\n".join(payloads)]
    return [*out, ext] if ext else out


def test_round_trip_of_a_batch():
    batch = codec.decode(frames("orders.created", [b"a", b"b", b"c"], seq=7))
    assert (batch.topic, batch.size, batch.seq, batch.pubid) == ("orders.created", 3, 7, "abcd1234")
    assert batch.source == "eda://host/pub/abcd1234"
    assert codec.split_body(batch) == [b"a", b"b", b"c"]


def test_single_event_body_may_hold_newlines():
    batch = codec.decode(frames("t", [b"line1\nline2"]))
    assert codec.split_body(batch) == [b"line1\nline2"]


@pytest.mark.parametrize(
    "bad",
    [
        [b"t"],
        [b"t", b"short", b"x"],
        [b"t", b"\x09" + b"\x00" * 30, b"x"],  # unknown version
        [b"t", codec.encode_header(9, 1, 1, 0.0, ORIGIN), b"x"],  # unknown kind
        [b"t", codec.encode_header(0, 0, 1, 0.0, ORIGIN), b"x"],  # zero events
        [b"t", codec.encode_header(0, 1, 1, 0.0, b"no-separator"), b"x"],
        [b"\xff\xfe", codec.encode_header(0, 1, 1, 0.0, ORIGIN), b"x"],  # topic not UTF-8
    ],
)
def test_malformed_messages_raise_wire_error(bad):
    with pytest.raises(codec.WireError):
        codec.decode(bad)


def test_count_mismatch_is_detected():
    header = codec.encode_header(codec.TEXT, 3, 1, 0.0, ORIGIN)
    batch = codec.decode([b"t", header, b"a\nb"])
    with pytest.raises(codec.WireError):
        codec.split_body(batch)


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_decode_never_raises_anything_but_wire_error(parts):
    with contextlib.suppress(codec.WireError):
        codec.decode(parts)


def test_take_cuts_the_last_batch():
    b1 = codec.decode(frames("t", [b"1", b"2"]))
    b2 = codec.decode(frames("t", [b"3", b"4", b"5"], seq=3))
    taken, left = codec.take([b1, b2], 3)
    assert left == 0
    assert [codec.split_body(b) for b in taken] == [[b"1", b"2"], [b"3"]]
    assert codec.take([b1], 5)[1] == 3


def test_json_lines_are_cloudevents_and_match_the_dict_view():
    ext = json.dumps({"tenant": "acme"}).encode()
    batch = codec.decode(
        frames("orders.created", [b'he said "hi"', b"\xc3\xa9t\xc3\xa9"], seq=41, ext=ext)
    )
    lines = envelope.batch_to_json_lines(batch).split("\n")[:-1]
    events = [json.loads(line) for line in lines]
    assert events == list(envelope.batch_to_events(batch))
    first = events[0]
    assert first["specversion"] == "1.0"
    assert first["id"] == "abcd1234-41" and first["sequence"] == 41
    assert first["type"] == "orders.created"
    assert first["datacontenttype"] == "text/plain"
    assert first["data"] == 'he said "hi"'
    assert first["tenant"] == "acme"
    assert first["time"] == "2023-11-14T22:13:20.250000Z"
    assert events[1]["data"] == "été" and events[1]["sequence"] == 42


def test_json_payloads_are_embedded_as_json():
    batch = codec.decode(frames("t", [b'{"id":7}', b"[1,2]"], kind=codec.JSON))
    events = [json.loads(x) for x in envelope.batch_to_json_lines(batch).split("\n")[:-1]]
    assert [e["data"] for e in events] == [{"id": 7}, [1, 2]]
    assert events[0]["datacontenttype"] == "application/json"


def test_parse_envelope_keeps_id_source_and_headers_and_drops_sequence():
    line = b'{"specversion":"1.0","id":"x-1","source":"s","type":"a.b","sequence":9,"tenant":"t","data":1}'
    topic, raw = envelope.parse_envelope(line, 1, None, "me", lambda: "new")
    event = json.loads(raw)
    assert topic == "a.b"
    assert (event["id"], event["source"], event["tenant"], event["data"]) == ("x-1", "s", "t", 1)
    assert "sequence" not in event
    topic, raw = envelope.parse_envelope(b'{"data":2}', 2, "c.d", "me", lambda: "new")
    assert topic == "c.d" and json.loads(raw)["id"] == "new" and json.loads(raw)["source"] == "me"


@pytest.mark.parametrize("bad", [b"not json", b"[1]", b'{"data":1}', b'{"type":"a b"}'])
def test_parse_envelope_errors_name_the_line(bad):
    with pytest.raises(InputError) as info:
        envelope.parse_envelope(bad, 12, None, "me", lambda: "x")
    assert str(info.value).startswith("line 12:")


@given(st.lists(st.text(alphabet=st.characters(exclude_characters="\n"), min_size=1), min_size=1, max_size=6))
def test_json_lines_escape_exactly_what_json_needs(texts):
    payloads = [t.encode("utf-8", "surrogatepass") for t in texts]
    batch = codec.decode(frames("t", payloads))
    events = [json.loads(x) for x in envelope.batch_to_json_lines(batch).split("\n")[:-1]]
    expected = [p.decode(errors="replace") for p in payloads]
    assert [e["data"] for e in events] == expected


def test_single_event_with_newlines_renders_as_one_json_line():
    batch = codec.decode(frames("t", [b'a "quoted"\nsecond\tline\\']))
    (line,) = envelope.batch_to_json_lines(batch).split("\n")[:-1]
    assert json.loads(line)["data"] == 'a "quoted"\nsecond\tline\\'


def test_body_not_matching_its_count_is_refused():
    header = codec.encode_header(codec.TEXT, 3, 1, 0.0, ORIGIN)
    with pytest.raises(ValueError):
        envelope.batch_to_json_lines(codec.decode([b"t", header, b"a\nb"]))


@pytest.mark.parametrize("bad", [[b"{oops"], [b"1,2"], [b"1", b"[1"], [b"[" * 5000]])
def test_json_payloads_that_are_not_one_json_value_are_refused(bad):
    batch = codec.decode(frames("t", bad, kind=codec.JSON))
    with pytest.raises(codec.WireError):
        envelope.batch_to_json_lines(batch)


def test_a_json_payload_spanning_lines_is_compacted_onto_one():
    batch = codec.decode(frames("t", [b'{\n  "a": 1\n}'], kind=codec.JSON))
    (line,) = envelope.batch_to_json_lines(batch).split("\n")[:-1]
    assert json.loads(line)["data"] == {"a": 1}
