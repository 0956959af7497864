"""eda-sub --everywhere: brokerless publishers and the bus as one stream, each event
marked with where it came from (real processes in the test namespace)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import Identity, Procs, run, wait_until
from tests.test_bus import start_bus
from tests.test_secure_bus import SERVING, ids, serve

__all__ = ["ids"]  # the fixture: the secure identities


def _fresh_home(tmp_path: Path) -> dict[str, str]:
    """A discovery cache of its own: no bus an earlier test cached is found."""
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


def _published(*args: str, env: dict[str, str] | None = None) -> None:
    done = run("eda-pub", *args, env=env)
    assert done.returncode == 0, done.stderr


def test_one_stream_from_brokerless_publishers_and_the_bus(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    _published("--bus", ep, "--confirm", "demo.stored", "b1", "b2")
    sub = procs.sub_ready("--everywhere", "--bus", ep, "--from-start", "demo.>", "-C", "4",
                          "-W", "60", env=_fresh_home(tmp_path))  # fmt: skip
    _published("demo.direct", "d1", "d2")
    assert sub.wait(30) == 0, sub.stderr
    events = [json.loads(line) for line in sub.lines()]
    marked = sorted((e["edavia"], e["data"], e.get("edabusseq")) for e in events)
    assert marked == [("bus", "b1", 1), ("bus", "b2", 2), ("direct", "d1", None),
                      ("direct", "d2", None)]  # fmt: skip
    # the replay option applied to the bus; nothing was lost, nothing said about it
    assert "lost" not in sub.stderr and "warning" not in sub.stderr, sub.stderr


def test_count_and_format_across_both_sources(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    _published("--bus", ep, "--confirm", "demo.stored", "b1", "b2")
    sub = procs.sub_ready("--everywhere", "--bus", ep, "--from-start", "demo.>", "-C", "3",
                          "--format", "{via} {topic} {data}", env=_fresh_home(tmp_path))  # fmt: skip
    wait_until(lambda: len(sub.lines()) >= 2, 30, "the two stored events")
    _published("demo.direct", "d1", "d2")
    assert sub.wait(30) == 0, sub.stderr
    lines = sub.lines()
    assert len(lines) == 3, lines  # -C counts events from both sources
    assert lines[:2] == ["bus demo.stored b1", "bus demo.stored b2"]
    assert lines[2] == "direct demo.direct d1"


def test_exec_runs_for_events_from_both_sources(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    _published("--bus", ep, "--confirm", "job.stored", "b1")
    out = tmp_path / "handled"
    sub = procs.sub_ready("--everywhere", "--bus", ep, "--from-start", "job.>", "-C", "2",
                          "--exec", f'jq -c "[.edavia, .data]" >> {out}',
                          env=_fresh_home(tmp_path))  # fmt: skip
    wait_until(out.exists, 30, "the stored event handled")
    _published("job.direct", "d1")
    assert sub.wait(30) == 0, sub.stderr
    assert out.read_text().splitlines() == ['["bus","b1"]', '["direct","d1"]']


def test_raw_is_payloads_only(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    _published("--bus", ep, "--confirm", "demo.stored", "b1")
    sub = procs.sub_ready("--everywhere", "--bus", ep, "--from-start", "demo.>", "-C", "2",
                          "--raw", env=_fresh_home(tmp_path))  # fmt: skip
    wait_until(lambda: sub.lines(), 30, "the stored event")
    _published("demo.direct", "d1")
    assert sub.wait(30) == 0, sub.stderr
    assert sub.lines() == ["b1", "d1"]


def test_no_bus_is_a_warning_and_brokerless_events_flow(procs: Procs, tmp_path: Path) -> None:
    sub = procs.sub_ready("--everywhere", "demo.>", "-C", "2", "-W", "60",
                          env=_fresh_home(tmp_path))  # fmt: skip
    sub.wait_stderr("warning: no bus found", 30)
    _published("demo.direct", "d1", "d2")
    assert sub.wait(30) == 0, sub.stderr
    assert [(json.loads(line)["edavia"], json.loads(line)["data"]) for line in sub.lines()] == [
        ("direct", "d1"),
        ("direct", "d2"),
    ]
    assert sub.stderr.count("no bus found") == 1, sub.stderr


def test_no_bus_and_no_event_times_out_with_status_4(procs: Procs, tmp_path: Path) -> None:
    done = run("eda-sub", "--everywhere", "demo.>", "-W", "1", env=_fresh_home(tmp_path))
    assert done.returncode == 4, done.stderr
    assert "no bus found" in done.stderr and "no event for 1 s" in done.stderr


def test_a_bus_that_starts_later_is_found(procs: Procs, tmp_path: Path) -> None:
    home = _fresh_home(tmp_path)
    sub = procs.sub_ready("--everywhere", "demo.>", "-C", "1", "-W", "120", env=home)
    sub.wait_stderr("no bus found", 30)
    bus = procs.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"),
                    "--bind", "tcp://127.0.0.1:0", "-v")  # fmt: skip
    ep = bus.wait_stderr(SERVING, 30)[1]
    bus.wait_stderr("announced bus", 15)
    sub.wait_stderr(re.escape(f"found the bus at {ep}"), 60)
    _published("--bus", ep, "--confirm", "demo.stored", "b1")
    assert sub.wait(30) == 0, sub.stderr
    assert [json.loads(line)["edavia"] for line in sub.lines()] == ["bus"]


def test_a_bus_that_restarts_is_followed(procs: Procs, tmp_path: Path) -> None:
    bus, ep = start_bus(procs, tmp_path / "bus")
    sub = procs.sub_ready("--everywhere", "--bus", ep, "demo.>", "-C", "2", "-W", "120",
                          env=_fresh_home(tmp_path))  # fmt: skip
    sub.wait_stderr("subscribed to the bus", 30)
    _published("--bus", ep, "--confirm", "demo.stored", "b1")
    sub.wait_lines(1, 30)
    bus.kill()
    start_bus(procs, tmp_path / "bus", bind=ep)  # the same endpoint, as a restart
    _published("--bus", ep, "--confirm", "demo.stored", "b2")
    assert sub.wait(60) == 0, sub.stderr
    assert [json.loads(line)["data"] for line in sub.lines()] == ["b1", "b2"]


@pytest.mark.parametrize(
    "args",
    [("--durable", "d"), ("--group", "g"), ("--until-end",)],
)
def test_what_only_the_bus_can_do_is_a_usage_error(args: tuple[str, ...]) -> None:
    done = run("eda-sub", "--everywhere", "demo.>", *args)
    assert done.returncode == 2, done.stderr
    assert "--everywhere excludes" in done.stderr and done.stderr.count("\n") == 1
    by_env = run("eda-sub", "demo.>", *args, env={"EDA_SUB_EVERYWHERE": "1"})
    assert by_env.returncode == 2 and "--everywhere excludes" in by_env.stderr


def test_via_is_a_field_of_everywhere_only() -> None:
    done = run("eda-sub", "--no-mdns", "--connect", "tcp://127.0.0.1:1", "t", "--format", "{via}")
    assert done.returncode == 2, done.stderr


def test_a_publisher_cannot_claim_where_its_event_came_from() -> None:
    done = run("eda-pub", "--no-mdns", "--connect", "tcp://127.0.0.1:1", "-H", "edavia=bus",
               "t", "x")  # fmt: skip
    assert done.returncode == 2, done.stderr


def test_secure_everywhere_takes_both_sources_securely(
    procs: Procs, tmp_path: Path, ids: dict[str, Identity]
) -> None:
    serve(procs, tmp_path, ids["bus"])
    alice, bob = ids["alice"].env, ids["bob"].env
    _published("--secure", "--bus", "--confirm", "demo.stored", "b1", env=alice)
    sub = procs.sub_ready("--secure", "--everywhere", "--from-start", "demo.>", "-C", "2",
                          "-W", "60", env=bob)  # fmt: skip
    wait_until(lambda: sub.lines(), 30, "the stored event")
    _published("--secure", "demo.direct", "d1", env=alice)
    assert sub.wait(30) == 0, sub.stderr
    got = [(json.loads(line)["edavia"], json.loads(line)["data"]) for line in sub.lines()]
    assert got == [("bus", "b1"), ("direct", "d1")]
    assert "error" not in sub.stderr and "warning" not in sub.stderr, sub.stderr


def test_secure_everywhere_refused_by_the_bus_keeps_brokerless_events(
    procs: Procs, tmp_path: Path, ids: dict[str, Identity]
) -> None:
    """carol and alice trust each other, carol trusts the bus, the bus does not trust
    carol: the bus part is refused with the one-line message, brokerless events go on."""
    _, endpoint = serve(procs, tmp_path, ids["bus"])
    carol = Identity(tmp_path / "carol")
    carol.trust("bus", ids["bus"])
    carol.trust("alice", ids["alice"])
    ids["alice"].trust("carol", carol)
    sub = procs.sub_ready("--secure", "--everywhere", "--bus", f"bus@{endpoint}", "demo.>",
                          "-C", "1", "-W", "60", env=carol.env)  # fmt: skip
    refused = f"the bus at {endpoint} does not trust this key (eda-keys show: {carol.public})"
    sub.wait_stderr(re.escape(f"eda-sub: error: {refused}"), 30)
    _published("--secure", "demo.direct", "d1", env=ids["alice"].env)
    assert sub.wait(30) == 0, sub.stderr
    assert [json.loads(line)["data"] for line in sub.lines()] == ["d1"]


def test_a_republished_event_drops_where_it_came_from() -> None:
    """``eda-sub --everywhere | eda-pub --envelope``: each hop stamps its own edavia."""
    from eda.core.envelope import parse_envelope

    line = b'{"type":"t","data":"x","edavia":"bus","edabusseq":3}'
    topic, event = parse_envelope(line, 1, None, "eda://test", lambda: "id-1")
    assert topic == "t" and json.loads(event) == {
        "type": "t", "data": "x", "specversion": "1.0", "id": "id-1", "source": "eda://test",
    }  # fmt: skip


def test_the_terminal_view_shows_where_an_event_came_from() -> None:
    from eda.cli.sub import _terminal_line

    event = {"time": "2026-12-07T12:00:00.123456Z", "type": "orders.created", "data": "x"}
    assert _terminal_line(event).plain == "12:00:00.123 orders.created x"
    assert _terminal_line({**event, "edavia": "bus"}).plain == "12:00:00.123 bus    orders.created x"
