"""Everyday operations of eda-sub and eda-pub: relative --since, --until-end, topic rules, --progress."""

from __future__ import annotations

import os
import pty
import subprocess
import time
from pathlib import Path

import pytest

from eda.core.bus.startat import start_spec as _bus_start
from eda.core.errors import UsageError
from tests.helpers import Procs, command, readable, run
from tests.test_bus import Bus, engine, start_bus

__all__ = ["engine"]  # the fixture: each engine of the bus


@pytest.mark.parametrize(("age", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600),
                                              ("2d", 2 * 86400), ("1w", 7 * 86400)])  # fmt: skip
def test_since_takes_an_age_ago(age: str, seconds: int) -> None:
    before = time.time()
    start = _bus_start(False, None, age, None)
    after = time.time()
    assert before - seconds <= start["time"] <= after - seconds


@pytest.mark.parametrize("bad", ["0h", "1y", "h", "-1h", "yesterday"])
def test_a_bad_since_is_a_usage_error_naming_the_option(bad: str) -> None:
    with pytest.raises(UsageError, match="--since"):
        _bus_start(False, None, bad, None)


def test_since_an_age_replays_what_the_bus_stored_since(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    done = run("eda-pub", "--bus", ep, "--confirm", "s.n", input="a\nb\n")
    assert done.returncode == 0, done.stderr
    for age in ("1h", "30m", "2d"):
        got = run("eda-sub", "--bus", ep, "s.n", "--since", age, "-C", "2", "--raw")
        assert got.returncode == 0 and got.stdout.splitlines() == ["a", "b"], got.stderr
    bad = run("eda-sub", "--bus", ep, "s.n", "--since", "2y")
    assert bad.returncode == 2 and "--since" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("bad", ["orders/#", "orders/+/eu", "orders.+", "orders.#", "#", "+"])
def test_a_topic_follows_the_pattern_token_rules(bad: str) -> None:
    done = run("eda-pub", "--no-mdns", "--connect", "tcp://127.0.0.1:1", bad, "hi")
    assert done.returncode == 2, done.stderr
    assert "invalid topic" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    refused = run("eda-sub", "--no-mdns", "--connect", "tcp://127.0.0.1:1", bad)
    assert refused.returncode == 2, refused.stderr  # the same rule on both sides


@pytest.mark.parametrize("good", ["orders.created", "c++.builds", "a/b", "eu#1.x", "é.ü"])
def test_topics_without_wildcards_are_still_accepted(good: str) -> None:
    from eda.core.topics import validate_pattern, validate_topic

    assert validate_topic(good) == good
    assert validate_pattern(good) == good


def _drawn_on_a_pty(argv: list[str], stdin_path: Path) -> bytes:
    """What *argv* draws on a terminal stderr (a pty) until it ends, stdin from a file."""
    leader, follower = pty.openpty()
    with stdin_path.open("rb") as stdin:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    drawn = b""
    try:
        while readable([leader], 60):  # until the pty closes: the program ended
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            drawn += chunk
        assert proc.wait(30) == 0, drawn
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return drawn


def test_progress_counts_the_events_sent(tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    dump.write_text("".join(f"{i:05}\n" for i in range(2000)))  # 12,000 bytes
    drawn = _drawn_on_a_pty(command("eda-pub", "--no-mdns", "--progress", "subops.p"), dump)
    assert b"12.0 kB" in drawn, drawn  # the file's size, as before
    assert b"2000 events sent" in drawn, drawn


def test_progress_through_the_bus_counts_sent_and_confirmed(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    dump = tmp_path / "dump.txt"
    dump.write_text("".join(f"{i:05}\n" for i in range(2000)))
    argv = command("eda-pub", "--bus", ep, "--confirm", "--progress", "subops.p")
    drawn = _drawn_on_a_pty(argv, dump)
    assert b"2000 events sent, 2000 confirmed" in drawn, drawn
    got = run("eda-sub", "--bus", ep, "subops.p", "--from-start", "-C", "2000", "--raw")
    assert got.stdout.splitlines() == [f"{i:05}" for i in range(2000)], got.stderr


@pytest.mark.long
def test_until_end_dumps_what_is_stored_and_exits_0(procs: Procs, engine: Bus) -> None:
    _, ep = engine.start()
    for topic, body in [("a.x", "1\n2\n"), ("b.y", "3\n"), ("a.z", "4\n"), ("b.y", "5\n6\n")]:
        done = run("eda-pub", "--bus", ep, "--confirm", topic, input=body)
        assert done.returncode == 0, done.stderr

    def dump(*args: str) -> list[str]:
        got = run("eda-sub", "--bus", ep, *args, "--until-end", "--raw", "-W", "60")
        assert got.returncode == 0, got.stderr
        return got.stdout.splitlines()

    # fewer stored than asked for: what exists, then the end (kcat -o -10 -e)
    assert dump("a.>", "--last", "10") == ["1", "2", "4"]
    assert dump("a.>", "--last", "2") == ["2", "4"]
    assert dump(">") == ["1", "2", "3", "4", "5", "6"]  # from the start unless told
    assert dump("b.y", "--from-seq", "4") == ["5", "6"]
    assert dump("a.>", "--since", "1h") == ["1", "2", "4"]
    assert dump("a.>", "--from-seq", "5") == []  # nothing matching left: ends at once
    assert dump("nothing.here") == []
    assert dump(">", "-C", "2") == ["1", "2"]
    refused = run("eda-sub", "--bus", ep, "a.>", "--until-end", "--durable", "d")
    assert refused.returncode == 2 and "--until-end" in refused.stderr
