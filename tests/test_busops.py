"""Everyday operations on eda-bus: list consumers and their lag, delete one, move one,
purge a topic."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Procs, command, run, wait_until
from tests.test_bus import Bus, engine, start_bus  # noqa: F401  (the fixture: both engines)
from tests.test_bus_acl import RIGHTS, as_, ids, serve, topics  # noqa: F401  (ids: a fixture)


def consumers(ep: str) -> list[dict[str, Any]]:
    done = run("eda-bus", "stats", "--consumers", "--bus", ep, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(r["kind"] == "consumer" for r in rows), rows
    return rows


def publish(ep: str, topic: str, lines: range) -> None:
    done = run("eda-pub", "--bus", ep, "--confirm", topic, input="".join(f"{i}\n" for i in lines))
    assert done.returncode == 0, done.stderr


def test_stats_consumers_lists_durables_and_groups_with_patterns_and_lag(
    procs: Procs, engine: Bus  # noqa: F811
) -> None:
    _, ep = engine.start()
    publish(ep, "jobs.a", range(1, 11))
    publish(ep, "other.x", range(1, 4))
    took = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "4")
    assert took.stdout.splitlines() == ["1", "2", "3", "4"], took.stderr
    grp = run("eda-sub", "--bus", ep, "other.*", "--group", "audit", "--from-start", "--raw",
              "-C", "3")  # fmt: skip
    assert grp.returncode == 0, grp.stderr
    rows = {r["name"]: r for r in consumers(ep)}
    assert set(rows) == {"billing", "audit"}
    assert rows["billing"]["consumer"] == "durable"
    assert rows["billing"]["patterns"] == ["jobs.>"]
    assert rows["billing"]["next"] == 5 and rows["billing"]["lag"] == 6
    assert rows["audit"]["consumer"] == "group" and rows["audit"]["patterns"] == ["other.*"]
    assert rows["audit"]["lag"] == 0


@pytest.mark.long
def test_delete_consumer_forgets_its_position_and_refuses_unknown_or_live_names(
    procs: Procs, engine: Bus  # noqa: F811
) -> None:
    _, ep = engine.start()
    publish(ep, "jobs.a", range(1, 6))
    took = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "5")
    assert took.returncode == 0, took.stderr
    # while someone is subscribed as it: refused, kept
    live = procs.eda("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-v")
    live.wait_stderr(r"subscribed to the bus", 20)
    busy = run("eda-bus", "delete-consumer", "billing", "--bus", ep)
    assert busy.returncode == 1 and "live subscriber" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    # it leaves (its bye: a killed one is dropped by the bus only after GONE_AFTER of
    # silence, as test_bus's dead group member shows)
    live.signal(signal.SIGINT)
    assert live.wait() == 130

    def deleted() -> Any:
        done = run("eda-bus", "delete-consumer", "billing", "--bus", ep, "--timeout", "10")
        assert done.returncode == 0 or "live subscriber" in done.stderr, done.stderr
        return done if done.returncode == 0 else None

    done = wait_until(deleted, 60, "the subscriber that left to be forgotten")
    assert json.loads(done.stdout) == {"deleted": "billing"}
    assert consumers(ep) == []
    # the name used again starts anew (from the start, as a new durable does)
    again = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "5")
    assert again.stdout.splitlines() == ["1", "2", "3", "4", "5"], again.stderr
    unknown = run("eda-bus", "delete-consumer", "nobody", "--bus", ep)
    assert unknown.returncode == 1 and "nobody" in unknown.stderr, unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_delete_consumer_is_refused_from_another_host(network: Any, tmp_path: Path) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    bus = a.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--bind", "tcp://*:0",
                "--no-mdns")  # fmt: skip
    port = bus.wait_stderr(r"serving .+ on tcp://\S+:(\d+) \(seq", 15)[1]
    outside = f"tcp://{a.address}:{port}"
    sent = b.run("eda-pub", "--bus", outside, "--confirm", "keep.me", "one", "two")
    assert sent.returncode == 0, sent.stderr
    took = b.run("eda-sub", "--bus", outside, "keep.>", "--durable", "d", "--raw", "-C", "1")
    assert took.returncode == 0, took.stderr
    refused = b.run("eda-bus", "delete-consumer", "d", "--bus", outside)
    assert refused.returncode == 1 and "own host" in refused.stderr, refused.stderr
    listed = b.run("eda-bus", "stats", "--consumers", "--bus", outside, "--json")
    assert [json.loads(x)["name"] for x in listed.stdout.splitlines()] == ["d"]
    kept = a.run("eda-bus", "delete-consumer", "d", "--bus", outside)
    assert kept.returncode == 0, kept.stderr


def test_an_existing_durable_says_it_ignores_a_start_and_a_new_pattern(
    procs: Procs, engine: Bus  # noqa: F811
) -> None:
    _, ep = engine.start()
    publish(ep, "jobs.a", range(1, 11))
    took = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "4")
    assert took.stdout.splitlines() == ["1", "2", "3", "4"] and took.stderr == "", took.stderr
    again = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--from-start",
                "--raw", "-C", "2")  # fmt: skip
    assert again.stdout.splitlines() == ["5", "6"], again.stderr  # the position holds
    assert "'billing' exists: resuming at seq 5" in again.stderr, again.stderr
    assert "--reset" in again.stderr
    assert "had patterns" not in again.stderr
    other = run("eda-sub", "--bus", ep, "jobs.*", "--durable", "billing", "--raw", "-C", "1")
    assert other.stdout.splitlines() == ["7"], other.stderr
    assert "'billing' had patterns jobs.>: now jobs.*" in other.stderr, other.stderr
    assert "start asked for" not in other.stderr
    plain = run("eda-sub", "--bus", ep, "jobs.*", "--durable", "billing", "--raw", "-C", "1")
    assert plain.stdout.splitlines() == ["8"] and plain.stderr == "", plain.stderr


@pytest.mark.long
def test_reset_moves_a_durable_back_to_a_sequence_a_time_or_the_start(
    procs: Procs, engine: Bus  # noqa: F811
) -> None:
    _, ep = engine.start()
    publish(ep, "jobs.a", range(1, 6))
    took = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "d", "--raw", "-C", "5")
    assert took.returncode == 0, took.stderr
    back = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "d", "--reset", "--from-seq", "3",
               "--raw", "-C", "1")  # fmt: skip
    assert back.stdout.splitlines() == ["3"] and back.stderr == "", back.stderr
    assert [c["next"] for c in consumers(ep)] == [4]
    start = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "d", "--reset", "--from-start",
                "--raw", "-C", "2")  # fmt: skip
    assert start.stdout.splitlines() == ["1", "2"], start.stderr
    # by time: nothing was stored since 2100, so it moves past the last event
    later = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "d", "--reset", "--since",
                "2100-01-01T00:00Z", "--raw", "-W", "1")  # fmt: skip
    assert later.stdout == "", later.stderr
    assert [c["next"] for c in consumers(ep)] == [6]
    publish(ep, "jobs.a", range(6, 7))
    after = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "d", "--raw", "-C", "1")
    assert after.stdout.splitlines() == ["6"], after.stderr
    bad = run("eda-sub", "--bus", ep, "jobs.>", "--reset", "--from-start", "--raw", "-C", "1")
    assert bad.returncode == 2 and "--reset needs --durable" in bad.stderr, bad.stderr
    bare = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "d", "--reset", "--raw", "-C", "1")
    assert bare.returncode == 2 and "--reset needs" in bare.stderr, bare.stderr


def test_reset_is_refused_from_another_host(network: Any, tmp_path: Path) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    bus = a.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--bind", "tcp://*:0",
                "--no-mdns")  # fmt: skip
    port = bus.wait_stderr(r"serving .+ on tcp://\S+:(\d+) \(seq", 15)[1]
    outside = f"tcp://{a.address}:{port}"
    sent = b.run("eda-pub", "--bus", outside, "--confirm", "keep.me", "one", "two")
    assert sent.returncode == 0, sent.stderr
    took = b.run("eda-sub", "--bus", outside, "keep.>", "--durable", "d", "--raw", "-C", "2")
    assert took.returncode == 0, took.stderr
    refused = b.run("eda-sub", "--bus", outside, "keep.>", "--durable", "d", "--reset",
                    "--from-start", "--raw", "-C", "1")  # fmt: skip
    assert refused.returncode == 1 and "own host" in refused.stderr, refused.stderr
    assert refused.stdout == ""
    listed = b.run("eda-bus", "stats", "--consumers", "--bus", outside, "--json")
    assert [json.loads(x)["next"] for x in listed.stdout.splitlines()] == [3]
    moved = a.run("eda-sub", "--bus", outside, "keep.>", "--durable", "d", "--reset",
                  "--from-start", "--raw", "-C", "1")  # fmt: skip
    assert moved.stdout.splitlines() == ["one"], moved.stderr


def test_a_durable_that_subscribes_again_after_a_bus_restart_warns_nothing(
    procs: Procs, engine: Bus  # noqa: F811
) -> None:
    bus, ep = engine.start()
    publish(ep, "r.n", range(1, 4))
    sub = procs.eda("eda-sub", "--bus", ep, "r.n", "--durable", "d", "--from-start", "--raw")
    sub.wait_lines(3, 15)
    bus.kill()
    bus, ep = engine.start(bind=ep)
    publish(ep, "r.n", range(4, 7))
    wait_until(lambda: "6" in sub.lines(), 30, "the events published after the restart")
    # at-least-once: an event written but not yet acknowledged may come again
    assert set(sub.lines()) == {"1", "2", "3", "4", "5", "6"}, sub.stderr
    assert "exists" not in sub.stderr and "patterns" not in sub.stderr, sub.stderr


def send(ep: str, topic: str, n: int) -> None:
    """*n* events on *topic*, each saying its topic and number."""
    lines = "".join(f"{topic}-{i}\n" for i in range(1, n + 1))
    done = run("eda-pub", "--bus", ep, "--confirm", topic, input=lines)
    assert done.returncode == 0, done.stderr


def bus_stats(ep: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The bus row of ``eda-bus stats`` and the events per topic."""
    done = run("eda-bus", "stats", "--bus", ep, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    topics = {r["topic"]: r["events"] for r in rows if r["kind"] == "topic"}
    return next(r for r in rows if r["kind"] == "bus"), topics


def read(ep: str, *args: str) -> list[str]:
    """What eda-sub reads with *args*, exiting 0 under --strict (nothing reported lost)."""
    done = run("eda-sub", "--bus", ep, ">", "--raw", "--strict", "-W", "3", *args)
    assert done.returncode == 0 and "lost" not in done.stderr, done.stderr
    return done.stdout.splitlines()


@pytest.mark.long
def test_purge_one_topic_of_three_keeps_sequences_counts_consumers_and_replays(
    procs: Procs, tmp_path: Path
) -> None:
    bus, ep = start_bus(procs, tmp_path / "bus")
    live = procs.eda("eda-sub", "--bus", ep, ">", "--raw", "--strict", "-v")
    live.wait_stderr(r"subscribed to the bus", 20)
    send(ep, "a.x", 3)  # seqs 1-3: the oldest events, purged below
    send(ep, "b.y", 3)  # 4-6
    send(ep, "c.z", 3)  # 7-9
    took = run("eda-sub", "--bus", ep, ">", "--durable", "d", "--raw", "-C", "2")
    assert took.stdout.splitlines() == ["a.x-1", "a.x-2"], took.stderr  # d: next 3
    live.wait_lines(9, 20)
    # a script must say --yes: on a pipe without it, one line and nothing removed
    asked = run("eda-bus", "purge", "a.x", "--bus", ep, input="y\n")
    assert asked.returncode == 2 and "--yes" in asked.stderr, asked.stderr
    assert len(asked.stderr.strip().splitlines()) == 1 and bus_stats(ep)[0]["events"] == 9
    done = run("eda-bus", "purge", "a.x", "--bus", ep, "--yes")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "pattern": "a.x", "events": 3, "bytes": len("a.x-1\na.x-2\na.x-3"), "topics": ["a.x"]
    }  # fmt: skip
    head, topics = bus_stats(ep)
    assert topics == {"b.y": 3, "c.z": 3} and head["events"] == 6
    assert (head["first_seq"], head["last_seq"]) == (4, 9)
    # replays skip the hole, and nobody is told of it as lost
    rest = ["b.y-1", "b.y-2", "b.y-3", "c.z-1", "c.z-2", "c.z-3"]
    assert read(ep, "--from-start", "-C", "6") == rest
    assert read(ep, "--from-seq", "2", "-C", "6") == rest
    assert read(ep, "--since", "2000-01-01T00:00Z", "-C", "6") == rest
    # the durable consumer behind the purge keeps its place and skips the purged events
    assert [c["next"] for c in consumers(ep)] == [3]
    resumed = run("eda-sub", "--bus", ep, ">", "--durable", "d", "--raw", "--strict", "-C", "6")
    assert resumed.stdout.splitlines() == rest and "lost" not in resumed.stderr, resumed.stderr
    # sequences go on after the highest ever assigned (never reused)
    send(ep, "a.x", 1)  # (a new publisher: its a.x-1 is a new event)
    head, topics = bus_stats(ep)
    assert head["last_seq"] == 10 and topics == {"a.x": 1, "b.y": 3, "c.z": 3}
    live.wait_lines(10, 20)
    assert "lost" not in live.stderr, live.stderr
    # the same after a restart; then a pattern purge; then retention still works
    bus.kill()
    bus, ep = start_bus(procs, tmp_path / "bus", bind=ep)
    head, topics = bus_stats(ep)
    assert head["last_seq"] == 10 and topics == {"a.x": 1, "b.y": 3, "c.z": 3}
    patterned = run("eda-bus", "purge", "*.y", "--bus", ep, "-f")
    assert json.loads(patterned.stdout)["topics"] == ["b.y"], patterned.stderr
    assert bus_stats(ep)[1] == {"a.x": 1, "c.z": 3}
    assert read(ep, "--from-start", "-C", "4") == ["c.z-1", "c.z-2", "c.z-3", "a.x-1"]
    kept = run("eda-bus", "retain", "--max-bytes", "6", "--bus", ep)
    assert json.loads(kept.stdout)["first_seq"] == 10, kept.stderr
    assert bus_stats(ep)[1] == {"a.x": 1}
    none = run("eda-bus", "purge", "nothing.here", "--bus", ep, "--yes")
    assert json.loads(none.stdout)["events"] == 0, none.stderr


def test_purge_is_refused_by_the_nats_engine_and_from_another_host(
    procs: Procs, tmp_path: Path, network: Any
) -> None:
    nats = Bus("nats", procs, tmp_path)
    _, ep = nats.start()
    send(ep, "a.x", 2)
    refused = run("eda-bus", "purge", "a.x", "--bus", ep, "--yes")
    assert refused.returncode == 2 and "NATS engine" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert bus_stats(ep)[1] == {"a.x": 2}
    a, b = network.add_host("a"), network.add_host("b")
    bus = a.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--bind", "tcp://*:0",
                "--no-mdns")  # fmt: skip
    port = bus.wait_stderr(r"serving .+ on tcp://\S+:(\d+) \(seq", 15)[1]
    outside = f"tcp://{a.address}:{port}"
    assert b.run("eda-pub", "--bus", outside, "--confirm", "keep.me", "one").returncode == 0
    far = b.run("eda-bus", "purge", "keep.me", "--bus", outside, "--yes")
    assert far.returncode == 1 and "own host" in far.stderr, far.stderr
    near = a.run("eda-bus", "purge", "keep.me", "--bus", outside, "--yes")
    assert json.loads(near.stdout)["events"] == 1, near.stderr


def test_purge_asks_first_on_a_terminal_and_does_nothing_unless_told_yes(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    send(ep, "a.x", 2)
    send(ep, "b.y", 1)

    def answer(text: str) -> subprocess.CompletedProcess[bytes]:
        main, tty = pty.openpty()  # a terminal on stdin: the operator is asked
        try:
            os.write(main, text.encode())
            return subprocess.run(command("eda-bus", "purge", "a.x", "--bus", ep), stdin=tty,
                                  capture_output=True, timeout=30, check=False)  # fmt: skip
        finally:
            os.close(main)
            os.close(tty)

    no = answer("n\n")
    assert b"Remove every stored event of a.x?" in no.stderr, no.stderr
    assert no.returncode == 1 and b"not purged" in no.stderr and no.stdout == b""
    assert bus_stats(ep)[1] == {"a.x": 2, "b.y": 1}
    yes = answer("y\n")
    assert yes.returncode == 0, yes.stderr
    assert json.loads(yes.stdout)["events"] == 2 and bus_stats(ep)[1] == {"b.y": 1}


def test_purge_under_an_acl_needs_admin(procs: Procs, tmp_path: Path, ids: Any) -> None:  # noqa: F811
    _, ep = serve(procs, tmp_path, ids, RIGHTS)
    alice, ops = ids["alice"], ids["ops"]
    assert as_(alice, "eda-pub", ep, "orders.created", "one").returncode == 0
    refused = as_(alice, "eda-bus", ep, "purge", "orders.created", "--yes")
    assert refused.returncode == 1, refused.stderr
    assert "alice may not purge: it needs admin = true" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert topics(ep, ops) == {"orders.created"}
    done = as_(ops, "eda-bus", ep, "purge", "orders.created", "--yes")
    assert done.returncode == 0 and json.loads(done.stdout)["events"] == 1, done.stderr
    assert topics(ep, ops) == set()
