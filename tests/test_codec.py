import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
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


@pytest.mark.parametrize("count", [2, 3, 2**32 - 1])
@pytest.mark.parametrize("kind", [codec.TEXT, codec.JSON, codec.ENVELOPE])
def test_a_batch_whose_count_lies_is_refused_by_decode(count, kind):
    # before: decode accepted it, so the subscriber's sequence state moved and
    # `eda-sub -C N` died in codec.take
    header = codec.encode_header(kind, count, 1, 0.0, ORIGIN)
    body = b"1\n2\n3\n4" if count == 2 else b"1\n2"
    with pytest.raises(codec.WireError):
        codec.decode([b"t", header, body])


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
    assert first["id"] == "abcd1234-41" and first["edaseq"] == 41 and "sequence" not in first
    assert first["type"] == "orders.created"
    assert first["datacontenttype"] == "text/plain"
    assert first["data"] == 'he said "hi"'
    assert first["tenant"] == "acme"
    assert first["time"] == "2023-11-14T22:13:20.250000Z"
    assert events[1]["data"] == "été" and events[1]["edaseq"] == 42


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


@given(
    st.lists(
        st.text(alphabet=st.characters(exclude_characters="\n"), min_size=1), min_size=1, max_size=6
    )
)
def test_json_lines_escape_exactly_what_json_needs(texts):
    payloads = [t.encode("utf-8", "surrogatepass") for t in texts]
    batch = codec.decode(frames("t", payloads))
    events = [json.loads(x) for x in envelope.batch_to_json_lines(batch).split("\n")[:-1]]
    for event, raw in zip(events, payloads, strict=True):
        if "data_base64" in event:  # not UTF-8 (a lone surrogate): carried as base64
            assert base64.b64decode(event["data_base64"]) == raw
            with pytest.raises(UnicodeDecodeError):
                raw.decode()
        else:
            assert event["data"] == raw.decode()


def test_single_event_with_newlines_renders_as_one_json_line():
    batch = codec.decode(frames("t", [b'a "quoted"\nsecond\tline\\']))
    (line,) = envelope.batch_to_json_lines(batch).split("\n")[:-1]
    assert json.loads(line)["data"] == 'a "quoted"\nsecond\tline\\'


@pytest.mark.parametrize(
    "bad",
    [
        [b"{oops"],
        [b"1,2"],
        [b"1", b"[1"],
        [b"[" * 5000],
        [b"[1", b"2]", b"3,4"],  # as many values as parts, but not one per part
        [b"NaN"],
        [b'{"a":Infinity}'],
        [b"-Infinity"],
        [b"1e400"],  # overflows to infinity
        [b'"\\ud800"'],  # a lone surrogate cannot be written as UTF-8
        [b"\xff"],
    ],
)
def test_json_payloads_that_are_not_one_strict_json_value_are_refused(bad):
    with pytest.raises(codec.WireError):
        codec.decode(frames("t", bad, kind=codec.JSON))


def test_a_json_payload_spanning_lines_is_compacted_onto_one():
    batch = codec.decode(frames("t", [b'{\n  "a": 1\n}'], kind=codec.JSON))
    (line,) = envelope.batch_to_json_lines(batch).split("\n")[:-1]
    assert json.loads(line)["data"] == {"a": 1}


# -- section 1: a batch is validated once, at the edge --------------------------------------


@pytest.mark.parametrize("when", [1e20, -1e20, float("inf"), float("-inf"), float("nan"), -1.0])
def test_header_time_out_of_range_is_refused(when):
    # before: decode accepted it and rendering died with OverflowError (or ValueError)
    header = codec.encode_header(codec.TEXT, 1, 1, when, ORIGIN)
    with pytest.raises(codec.WireError):
        codec.decode([b"t", header, b"x"])


@pytest.mark.parametrize(
    "topic", [b"", b"a b", b"a..b", b"a.*", b"a.>", b"\xff\xfe", b"t\x1b[2J", b"x" * 300]
)
def test_topic_frame_must_be_a_valid_topic(topic):
    header = codec.encode_header(codec.TEXT, 1, 1, 0.0, ORIGIN)
    with pytest.raises(codec.WireError):
        codec.decode([topic, header, b"x"])


@pytest.mark.parametrize(
    "origin",
    [
        b'p"x\x00src',
        b"p\\\x00src",
        b"p\nq\x00src",
        b"\x00src",
        b"p" * 65 + b"\x00src",
        b"p\x00",
        b"p\x00s\x1b]0;pwned\x07",
        b"p\x00s\nx",
        b"p\x00\xff",
        "é\x00src".encode(),
    ],
)
def test_publisher_id_and_source_are_checked(origin):
    header = codec.encode_header(codec.TEXT, 1, 1, 0.0, origin)
    with pytest.raises(codec.WireError):
        codec.decode([b"t", header, b"x"])


@pytest.mark.parametrize(
    "ext",
    [
        b"[1,2]",
        b'"s"',
        b"{oops",
        b'{"a":NaN}',
        b'{"a":1e999}',
        b'{"a":{"b":1}}',
        b'{"a":[1]}',
        b'{"a":null}',
        b'{"type":"orders.spoofed"}',
        b'{"specversion":"2.0"}',
        b'{"data":"forged"}',
        b'{"id":"x"}',
        b'{"source":"x"}',
        b'{"edaseq":1}',
        b'{"Tenant":"upper case"}',
        b'{"a-b":"dash"}',
        b'{"a":"\\ud800"}',
        b'{"' + b"a" * 65 + b'":1}',
        b"\xff",
    ],
)
def test_extension_frame_must_be_an_object_of_extension_attributes(ext):
    with pytest.raises(codec.WireError):
        codec.decode(frames("t", [b"x"], ext=ext))


def test_extensions_are_decoded_once_into_values_and_json():
    batch = codec.decode(frames("t", [b"x"], ext=b'{"tenant":"a\\"b","n":3,"ok":true}'))
    assert dict(batch.extensions.values) == {"tenant": 'a"b', "n": 3, "ok": True}
    (event,) = [json.loads(x) for x in envelope.batch_to_json_lines(batch).splitlines()]
    assert (event["tenant"], event["n"], event["ok"]) == ('a"b', 3, True)


def test_a_source_full_of_json_syntax_stays_one_string():
    source = 'eda://h/"},{"type":"orders.spoofed","x":"\\'
    origin = codec.encode_origin("p1", source)
    header = codec.encode_header(codec.TEXT, 2, 1, 0.0, origin)
    batch = codec.decode([b"orders.x", header, b"a\nb"])
    lines = envelope.batch_to_json_lines(batch).splitlines()
    events = [json.loads(x) for x in lines]
    assert len(events) == 2
    assert all(e["source"] == source and e["type"] == "orders.x" for e in events)


@pytest.mark.parametrize(
    "line",
    [
        b'{"specversion":"1.0","id":"1","source":"s","type":"other.topic","data":1}',
        b'{"specversion":"1.0","id":"1","source":"s","data":1}',
        b'{"specversion":"1.0","id":"","source":"s","type":"t"}',
        b'{"specversion":"1.0","id":1,"source":"s","type":"t"}',
        b'{"specversion":"0.3","id":"1","source":"s","type":"t"}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":NaN}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","x":[1]}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"%%%"}',
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","edaseq":7}',
        b"[1]",
    ],
)
def test_envelopes_on_the_wire_are_checked_events_of_their_topic(line):
    with pytest.raises(codec.WireError):
        codec.decode(frames("t", [line], kind=codec.ENVELOPE))


# -- section 2: JSON Lines output -------------------------------------------------------------


def test_binary_payloads_become_data_base64_and_text_stays_data():
    blob = bytes(range(256)) * 400  # 100 KB, not UTF-8
    batch = codec.decode(frames("t", [blob]))
    (event,) = [json.loads(x) for x in envelope.batch_to_json_lines(batch).splitlines()]
    assert "data" not in event and base64.b64decode(event["data_base64"]) == blob
    assert event["datacontenttype"] == "application/octet-stream"
    assert envelope.batch_to_events(batch) == [event]
    mixed = codec.decode(frames("t", [b"text", b"\xff\xfe", "été".encode()]))
    events = [json.loads(x) for x in envelope.batch_to_json_lines(mixed).splitlines()]
    assert [e.get("data") for e in events] == ["text", None, "été"]
    assert base64.b64decode(events[1]["data_base64"]) == b"\xff\xfe"
    assert envelope.batch_to_events(mixed) == events


def test_binary_round_trips_through_parse_envelope_byte_for_byte():
    blob = b"\x00\xff\x80binary\n\r"
    batch = codec.decode(frames("t", [blob]))
    line = envelope.batch_to_json_lines(batch).strip().encode()
    topic, wire = envelope.parse_envelope(line, 1, None, "me", lambda: "new")
    copy = codec.decode(frames(topic, [wire], kind=codec.ENVELOPE, seq=5))
    (event,) = [json.loads(x) for x in envelope.batch_to_json_lines(copy).splitlines()]
    assert base64.b64decode(event["data_base64"]) == blob
    assert envelope.batch_payloads(copy) == blob + b"\n"
    original = json.loads(line)
    assert {k: v for k, v in event.items() if k != "edaseq"} == {
        k: v for k, v in original.items() if k != "edaseq"
    }


def test_parse_envelope_sequence_rules():
    base = '{"specversion":"1.0","id":"1","source":"s","type":"t"'
    _, raw = envelope.parse_envelope((base + ',"edaseq":3}').encode(), 1, None, "me", str)
    assert "edaseq" not in json.loads(raw)
    _, raw = envelope.parse_envelope((base + ',"sequence":3}').encode(), 1, None, "me", str)
    assert "sequence" not in json.loads(raw)  # eda's own number, as printed before 0.2
    _, raw = envelope.parse_envelope((base + ',"sequence":"0007"}').encode(), 1, None, "me", str)
    assert json.loads(raw)["sequence"] == "0007"  # the CloudEvents extension is kept


@pytest.mark.parametrize(
    "bad",
    [
        b'{"type":"t","data_base64":"not base64!"}',
        b'{"type":"t","data":1,"data_base64":"AA=="}',
        b'{"type":"t","data":NaN}',
        b'{"type":"t","x":{"nested":1}}',
        b'{"type":"t","id":""}',
        b'{"type":"t","specversion":"0.3"}',
    ],
)
def test_parse_envelope_refuses_what_a_subscriber_would_refuse(bad):
    with pytest.raises(InputError) as info:
        envelope.parse_envelope(bad, 3, None, "me", lambda: "x")
    assert str(info.value).startswith("line 3:")


def test_recent_events_drop_copies_of_delivered_events_only():
    recent = envelope.RecentEvents()
    batch = codec.decode(frames("orders.x", [b"a", b"b"], seq=1))
    assert recent.fresh(batch) == [batch]
    lines = envelope.batch_to_json_lines(batch).splitlines()
    # the same events, republished unchanged by another publisher (a loop)
    copy = codec.decode(
        frames(
            "orders.x",
            [envelope.parse_envelope(x.encode(), 1, None, "q", str)[1] for x in lines],
            kind=codec.ENVELOPE,
        )
    )
    assert recent.fresh(copy) == [] and recent.dropped == 2
    # under a new type they are new events
    renamed = [envelope.parse_envelope(x.encode(), 1, "archive.x", "q", str)[1] for x in lines]
    archived = codec.decode(frames("archive.x", renamed, kind=codec.ENVELOPE))
    assert recent.fresh(archived) == [archived]
    assert recent.fresh(archived) == []
    # a copy mixed with a new event keeps the new one and its own sequence number
    new = b'{"specversion":"1.0","id":"n1","source":"s","type":"orders.x"}'
    old = envelope.parse_envelope(lines[1].encode(), 1, None, "q", str)[1]
    mixed = codec.decode(frames("orders.x", [old, new], kind=codec.ENVELOPE, seq=10))
    (kept,) = recent.fresh(mixed)
    assert (kept.seq, kept.size, kept.body) == (11, 1, new)


def test_recent_events_window_is_bounded():
    recent = envelope.RecentEvents(ids=3)

    def env(i):
        line = f'{{"specversion":"1.0","id":"e{i}","source":"s","type":"t"}}'.encode()
        return codec.decode(frames("t", [line], kind=codec.ENVELOPE, seq=i))

    for i in range(5):
        assert len(recent.fresh(env(i))) == 1
    assert recent.fresh(env(4)) == [] and len(recent.fresh(env(0))) == 1  # e0 was forgotten


# -- the property: any bytes in any frame -------------------------------------------------------

_ENVELOPE_LINE = b'{"specversion":"1.0","id":"e1","source":"s","type":"t","data":1}'
_payloads = st.one_of(
    st.binary(max_size=24),
    st.text(max_size=12).map(str.encode),
    st.sampled_from(
        [
            b'{"a":1}',
            b"[1",
            b"2]",
            b"NaN",
            b"1e400",
            b'"\\ud800"',
            b"\xff",
            b'"q\\"',
            _ENVELOPE_LINE,
        ]
    ),
)
_extension_values = st.one_of(
    st.text(max_size=6),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
_ext = st.one_of(
    st.just(b""),
    st.binary(max_size=24),
    st.sampled_from([b'{"tenant":"a"}', b'{"type":"x"}', b"[1]", b'{"a":NaN}', b'{"data":1}']),
    st.dictionaries(st.text(max_size=6), _extension_values, max_size=3).map(
        lambda d: json.dumps(d).encode()
    ),
)
_origin = st.one_of(
    st.just(ORIGIN),
    st.binary(max_size=24),
    st.tuples(st.binary(max_size=8), st.binary(max_size=16)).map(lambda t: t[0] + b"\x00" + t[1]),
)


_json_values = st.lists(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=6),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def _wire_frames(draw):
    """Frames that are mostly well formed, each part now and then replaced by anything."""

    def mostly(good, anything):
        return draw(anything) if draw(st.integers(0, 6)) == 3 else good

    kind = mostly(draw(st.integers(0, 2)), st.integers(0, 255))
    parts = draw(st.lists(_payloads, min_size=1, max_size=4))
    if kind == codec.JSON and draw(st.booleans()):
        parts = [
            json.dumps(v, ensure_ascii=draw(st.booleans())).encode() for v in draw(_json_values)
        ]
    if kind == codec.ENVELOPE and draw(st.booleans()):
        parts = [_ENVELOPE_LINE.replace(b'"e1"', b'"e%d"' % i) for i in range(len(parts))]
    count = mostly(len(parts), st.integers(0, 2**32 - 1))
    when = mostly(draw(st.floats(0, 4e9)), st.floats())
    seq = draw(st.integers(0, 2**63))
    header = codec.encode_header(kind, count, seq, when, mostly(ORIGIN, _origin))
    topic = mostly(b"t", st.one_of(st.sampled_from([b"orders.x", b"t."]), st.binary(max_size=8)))
    frames = [topic, mostly(header, st.binary(max_size=40)), b"\n".join(parts)]
    ext = mostly(draw(st.sampled_from([b"", b'{"tenant":"a","n":1}'])), _ext)
    if draw(st.integers(0, 20)) == 7:
        frames.append(ext)
        frames.append(draw(st.binary(max_size=4)))
    return [*frames, ext] if ext or draw(st.booleans()) else frames


def _strict(line: str) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} in output")

    return json.loads(line, parse_constant=refuse)


@settings(max_examples=300, deadline=None)
@given(_wire_frames())
def test_any_frames_give_strict_json_lines_of_exactly_the_events_sent(frames):
    try:
        batch = codec.decode(frames)
    except codec.WireError:
        return
    text = envelope.batch_to_json_lines(batch)
    text.encode()  # valid UTF-8 throughout
    lines = text.split("\n")
    assert lines.pop() == ""
    assert len(lines) == batch.size  # no event added, none lost
    events = [_strict(line) for line in lines]
    assert events == envelope.batch_to_events(batch)
    pubid, _, source = frames[1][codec._HEADER_SIZE :].partition(b"\x00")
    body = frames[2].split(b"\n") if batch.size > 1 else [frames[2]]
    for i, (event, raw) in enumerate(zip(events, body, strict=True)):
        assert event["type"] == frames[0].decode() and event["edaseq"] == batch.seq + i
        if batch.kind == codec.ENVELOPE:
            assert event == {**json.loads(raw), "edaseq": batch.seq + i}
            continue
        ext = json.loads(frames[3]) if len(frames) == 4 and frames[3] else {}
        payload = "data_base64" if "data_base64" in event else "data"
        core = {"specversion", "id", "source", "type", "time", "datacontenttype", "edaseq", payload}
        assert set(event) == core | set(ext) and not core & set(ext)
        assert event["id"] == f"{pubid.decode()}-{batch.seq + i}"
        assert event["source"] == source.decode()
        if payload == "data_base64":
            assert base64.b64decode(event["data_base64"]) == raw
        elif batch.kind == codec.JSON:
            assert event["data"] == json.loads(raw)
        else:
            assert event["data"] == raw.decode()


def test_checked_payloads_are_parsed_once_per_batch(monkeypatch) -> None:
    """decode() parses JSON and envelope payloads to check them; rendering reuses that."""
    from eda.core import attributes, envelope

    calls = []
    real = attributes.loads
    monkeypatch.setattr(attributes, "loads", lambda raw: calls.append(raw) or real(raw))
    origin = codec.encode_origin("p1", "src")
    for kind, body in [
        (codec.JSON, b'{"a":1}\n[2]'),
        (codec.ENVELOPE, b'{"specversion":"1.0","id":"x","source":"s","type":"t","data":1}'),
    ]:
        calls.clear()
        count = body.count(b"\n") + 1
        batch = codec.decode([b"t", codec.encode_header(kind, count, 1, 1e9, origin), body])
        lines = envelope.batch_to_json_lines(batch).splitlines()
        events = envelope.batch_to_events(batch)
        assert len(lines) == len(events) == count
        assert len(calls) == count  # once, in decode; not again to render
        sliced, _ = codec.take([batch], 1)  # a new body: parsed afresh, and right
        assert len(envelope.batch_to_events(sliced[0])) == 1
