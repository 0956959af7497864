"""eda's events as the official CloudEvents Python SDK sees them, and republishing loops.

The SDK (``cloudevents`` on PyPI) is a foreign client: it parses what eda-sub
prints, and its own events go through ``eda-pub --envelope`` and ``eda-sub``
unchanged.  The loop tests run the README's ``eda-sub | eda-pub --envelope``.
"""

from __future__ import annotations

import base64
import json
import shlex
from pathlib import Path

from cloudevents.v1.conversion import from_json, to_json
from cloudevents.v1.http import CloudEvent

from tests.helpers import command, run, wait_until

BLOB = bytes(range(256)) * 40 + b"\n\x00\xff"


def events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.lines()]


def test_sdk_parses_text_json_and_binary_events(procs):
    sub = procs.sub_ready("ce.>", "-C", "3")
    assert run("eda-pub", "ce.text", "-H", "tenant=acme", "hello").returncode == 0
    assert run("eda-pub", "ce.json", "--json", '{"id": 7, "x": [1.5, null]}').returncode == 0
    assert run("eda-pub", "ce.bin", "-s", input=BLOB).returncode == 0
    assert sub.wait() == 0
    parsed = {
        e["type"]: from_json(CloudEvent, line)
        for e, line in zip(events(sub), sub.lines(), strict=True)
    }
    assert parsed["ce.text"].data == "hello" and parsed["ce.text"]["tenant"] == "acme"
    assert parsed["ce.json"].data == {"id": 7, "x": [1.5, None]}
    assert parsed["ce.bin"].data == BLOB  # was mangled into U+FFFD characters before
    for event in parsed.values():
        assert event["specversion"] == "1.0" and event["source"].startswith("eda://")


def test_sdk_events_round_trip_through_eda_unchanged(procs):
    originals = [
        CloudEvent({"type": "ce.orders", "source": "sdk://shop", "subject": "order-7"}, BLOB),
        CloudEvent(
            {
                "type": "ce.orders",
                "source": "sdk://shop",
                "subject": "order-8",
                "datacontenttype": "application/json",
                "sequence": "0000000042",  # the CloudEvents sequence extension: kept as it is
                "tenant": "acme",
            },
            {"total": 12.5, "items": ["a", "b"]},
        ),
        CloudEvent({"type": "ce.orders", "source": "sdk://shop"}, "plain text"),
    ]
    lines = [to_json(e) for e in originals]
    sub = procs.sub_ready("ce.>", "-C", str(len(lines)))
    result = run("eda-pub", "--envelope", input=b"\n".join(lines) + b"\n")
    assert result.returncode == 0, result.stderr
    assert sub.wait() == 0
    received = events(sub)
    for line, got, printed in zip(lines, received, sub.lines(), strict=True):
        assert isinstance(got.pop("edaseq"), int)
        assert got == json.loads(line)  # every attribute, the data, byte for byte
        again = from_json(CloudEvent, printed)
        original = from_json(CloudEvent, line)
        assert again.data == original.data
        assert {k: v for k, v in again.get_attributes().items() if k != "edaseq"} == dict(
            original.get_attributes()
        )
    assert base64.b64decode(received[0]["data_base64"]) == BLOB


def _text(path: str) -> str:
    file = Path(path)
    return file.read_text() if file.exists() else ""


def _pipeline(tmp_path, name: str, sub_args: list[str], pub_args: list[str]) -> tuple[str, str]:
    """`eda-sub ... | tee COPIES | eda-pub --envelope ...` as one shell command; eda-pub
    starts once eda-sub is announced.  Returns (command, the file of eda-sub's stderr)."""
    err, copies = tmp_path / f"{name}.err", tmp_path / f"{name}.copies"
    sub = shlex.join(command("eda-sub", "-v", *sub_args))
    pub = shlex.join(command("eda-pub", "--envelope", *pub_args))
    ready = f"until grep -q 'announced as' {err}; do sleep 0.05; done"
    return f"{sub} 2>{err} | tee {copies} | {{ {ready}; exec {pub}; }}", str(err)


def test_republishing_loop_dies_after_one_hop(procs, tmp_path):
    watcher = procs.sub_ready("orders.>")
    shell, err = _pipeline(tmp_path, "loop", ["orders.>"], [])
    loop = procs.start(["bash", "-c", shell])
    wait_until(lambda: "announced as" in _text(err), 15, "the loop's eda-sub")
    assert run("eda-pub", "orders.created", "round and round").returncode == 0
    # the copy eda-pub --envelope sent back has the same source, id and type: dropped
    wait_until(lambda: "dropped 1 event(s)" in _text(err), 20, f"a dropped copy: {_text(err)!r}")
    watcher.wait_stderr(r"dropped 1 event\(s\)", 20)
    copies = (tmp_path / "loop.copies").read_text().splitlines()
    assert len(copies) == 1 and json.loads(copies[0])["data"] == "round and round"
    assert [e["data"] for e in events(watcher)] == ["round and round"]
    assert loop.popen.poll() is None  # still serving


def test_republishing_under_a_new_type_reaches_both_topics(procs, tmp_path):
    archive = procs.sub_ready("archive.>", "-C", "1")
    both = procs.sub_ready("orders.>", "archive.>", "-C", "2")
    shell, err = _pipeline(tmp_path, "archive", ["orders.>", "-C", "1"], ["archive.orders"])
    copier = procs.start(["bash", "-c", shell])
    wait_until(lambda: "announced as" in _text(err), 15, "the copier's eda-sub")
    assert run("eda-pub", "orders.created", "keep me").returncode == 0
    assert archive.wait(20) == 0 and both.wait(20) == 0 and copier.wait(20) == 0
    (copy,) = events(archive)
    original, again = sorted(events(both), key=lambda e: e["type"] != "orders.created")
    assert (copy["type"], again["type"], original["type"]) == ("archive.orders",) * 2 + (
        "orders.created",
    )
    for event in (copy, again):
        assert (event["id"], event["source"], event["data"]) == (
            original["id"],
            original["source"],
            "keep me",
        )


# -- ce-time: an RFC 3339 timestamp (core/attributes.check_time) ---------------------------
GOOD_TIMES = ["2026-12-07T12:00:00Z", "2026-12-07t12:00:00z", "2026-12-07T12:00:00.123456Z",
              "2026-12-07T13:00:00.5+01:00", "2024-02-29T23:59:60-00:00", "0001-01-01T00:00:00Z",
              "9999-12-31T23:59:59.999999999+23:59"]  # fmt: skip
BAD_TIMES = ["", "now", "2026-12-07", "2026-12-07 12:00:00Z", "2026-12-07T12:00:00",
             "2026-12-07T12:00Z", "2026-13-01T00:00:00Z", "2026-02-29T00:00:00Z",
             "2026-04-31T00:00:00Z", "2026-12-00T00:00:00Z", "2026-12-07T24:00:00Z",
             "2026-12-07T12:60:00Z", "2026-12-07T12:00:61Z", "2026-12-07T12:00:00+24:00",
             "2026-12-07T12:00:00+01:60", "2026-12-07T12:00:00.Z", "26-12-07T12:00:00Z",
             "2026-12-07T12:00:00+0100", "２０２６-12-07T12:00:00Z", "2026-12-07T12:00:00Z\n",
             "1900-02-29T00:00:00Z"]  # fmt: skip


def test_time_must_be_an_rfc3339_timestamp() -> None:
    import pytest

    from eda.core.attributes import check_event, check_time

    for text in GOOD_TIMES:
        assert check_time(text) == text
    for text in BAD_TIMES:
        with pytest.raises(ValueError, match="RFC 3339"):
            check_time(text)
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    assert check_event({**event, "time": GOOD_TIMES[0]})
    with pytest.raises(ValueError, match="RFC 3339"):
        check_event({**event, "time": "yesterday"})


def test_any_timestamp_python_writes_is_accepted_and_what_is_accepted_is_a_time() -> None:
    from datetime import datetime, timedelta, timezone

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from eda.core.attributes import check_time

    offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
        lambda m: timezone(timedelta(minutes=m)))

    @settings(max_examples=300, deadline=None)
    @given(st.datetimes(timezones=offsets))
    def written(when: datetime) -> None:
        assert check_time(when.isoformat()) == when.isoformat()

    @settings(max_examples=500, deadline=None)
    @given(st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
                         r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})?", fullmatch=True)
           | st.text(max_size=40))  # fmt: skip
    def accepted(text: str) -> None:
        try:
            check_time(text)
        except ValueError:
            return
        # what is accepted is a real instant (Python reads it, a leap second aside)
        fixed = text.upper().replace("Z", "+00:00").replace(":60", ":59")
        head, dot, rest = fixed.partition(".")
        if dot:  # (Python reads at most 6 fraction digits)
            digits = rest[: len(rest) - 6]
            fixed = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
        assert datetime.fromisoformat(fixed).tzinfo is not None

    written()
    accepted()


def test_eda_pub_skips_an_envelope_with_a_bad_time_and_sends_the_others(procs):
    sub = procs.sub_ready("ce.timed", "-C", "2")
    good = {"specversion": "1.0", "type": "ce.timed", "source": "/t", "data": 1}
    lines = [json.dumps({**good, "id": "a", "time": "2026-12-07T12:00:00Z"}),
             json.dumps({**good, "id": "b", "time": "07/12/2026 12:00"}),
             json.dumps({**good, "id": "c", "time": "2026-12-07T13:00:00.25+01:00"})]  # fmt: skip
    result = run("eda-pub", "--envelope", input="\n".join(lines) + "\n")
    assert result.returncode == 1, result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 2, errors
    assert errors[0].startswith("eda-pub: error: line 2: invalid envelope: attribute 'time'")
    assert "RFC 3339" in errors[0]
    assert errors[1] == "eda-pub: error: 1 input(s) rejected"
    assert sub.wait() == 0
    got = events(sub)
    assert [(e["id"], e["time"]) for e in got] == [("a", "2026-12-07T12:00:00Z"),
                                                  ("c", "2026-12-07T13:00:00.25+01:00")]
