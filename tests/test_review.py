"""Findings of the new-user / hostile-peer review of issue 6."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
from pathlib import Path

import pytest

from .helpers import Procs, command, readable, run


def test_no_gone_warning_for_a_running_subscriber_of_other_topics(procs: Procs) -> None:
    """A cached subscriber that is alive but wants other topics is not "gone"."""
    sub = procs.sub_ready("review.orders.>")
    first = run("eda-pub", "review.orders.created", "x")
    assert first.returncode == 0, first.stderr  # the subscriber is now in the cache
    other = run("eda-pub", "review.logs.app", "y")
    assert other.returncode == 0, other.stderr
    assert "although" not in other.stderr and "gone" not in other.stderr, other.stderr
    # the warning still comes when a subscriber that wanted the topic really is gone
    sub.signal(signal.SIGKILL)
    sub.wait()
    gone = run("eda-pub", "review.orders.created", "z")
    assert "no subscriber is listening, although 1 were seen before" in gone.stderr, gone.stderr


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("eda-pub", ["--no-mdns", "--bind", "tcp://127.0.0.1:99999", "t", "m"]),
        ("eda-pub", ["--no-mdns", "--connect", "tcp://127.0.0.1:65536", "t", "m"]),
        ("eda-sub", ["--no-mdns", "--bind", "tcp://127.0.0.1:99999", "x", "-W", "5"]),
        ("eda-sub", ["--no-mdns", "--connect", "tcp://127.0.0.1:70000", "x", "-W", "5"]),
    ],
)
def test_a_port_out_of_range_is_a_usage_error(program: str, args: list[str]) -> None:
    """libzmq takes port 99999 modulo 65536 (binds 34463): refuse it instead."""
    result = run(program, *args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and "port" in result.stderr, result.stderr


def test_registry_serve_refuses_a_port_out_of_range() -> None:
    result = run("eda-registry", "serve", "--no-mdns", "--bind", "tcp://127.0.0.1:99999")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "port out of range" in result.stderr, result.stderr


def test_progress_writes_nothing_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    dump.write_text("".join(f"{i}\n" for i in range(20)))
    with dump.open("rb") as stdin:
        result = subprocess.run(
            command("eda-pub", "--no-mdns", "--rate", "1000", "--progress", "review.replay"),
            stdin=stdin,
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"", result.stderr


def test_progress_draws_a_bar_with_the_file_size_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    dump.write_text("".join(f"{i:05}\n" for i in range(2000)))  # 12,000 bytes
    leader, follower = pty.openpty()
    with dump.open("rb") as stdin:
        proc = subprocess.Popen(
            command("eda-pub", "--no-mdns", "--rate", "2000", "--progress", "review.replay"),
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=follower,
        )
    os.close(follower)
    drawn = b""
    try:
        while True:  # until the pty closes: the program ended
            if not readable([leader], 60):
                break
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
    assert b"eda-pub" in drawn, drawn  # the bar's label
    assert b"12.0 kB" in drawn, drawn  # and the file's size, from DownloadColumn


def test_a_subcommand_usage_error_points_to_the_subcommand_help() -> None:
    result = run("eda-registry", "lookup")
    assert result.returncode == 2
    assert "(see eda-registry lookup --help)" in result.stderr, result.stderr
    top = run("eda-sub", "--no-such-option")
    assert top.returncode == 2 and "(see eda-sub --help)" in top.stderr, top.stderr


def test_a_bad_sequence_number_in_the_snapshot_keeps_its_good_records(tmp_path: Path) -> None:
    """The log is truncated at each snapshot: dropping the whole snapshot loses records."""
    import json
    import time

    from eda.core.registry.persist import Journal

    now = time.time()
    good = {
        "service": "orders",
        "id": "orders-good",
        "host": "127.0.0.1",
        "port": 8080,
        "weight": 1,
        "meta": {},
        "status": "passing",
        "ttl": 60,
        "interval": 20,
        "registered": now,
        "heartbeat": now,
        "registry": "abcd1234",
        "rev": 5,
    }
    for seq in (10**30, -1, "7", None):
        (tmp_path / "snapshot.json").write_text(json.dumps({"seq": seq, "instances": [good]}))
        journal = Journal(tmp_path)
        records, loaded_seq = journal.load()
        assert [r.id for r in records] == ["orders-good"], seq
        assert loaded_seq == 0 and journal.skipped == 1, seq


def test_a_forged_name_with_a_control_character_does_not_kill_the_browser(procs: Procs) -> None:
    """zeroconf refuses such a name with an exception that ended the browser thread:
    every later announcement went unseen, and a traceback reached the terminal."""
    from .helpers import MdnsResponder, dns_response, service_records, wait_until

    browse = procs.eda("eda-registry", "browse", "_review._tcp", "--duration", "20")
    responder = MdnsResponder()
    try:

        def announce(label: str) -> None:
            records = service_records("_review._tcp.local", label, 80, {"a": "1"}, "127.0.0.1")
            responder.multicast(dns_response(0, records))

        def seen_good() -> bool:
            announce("bad\x1b]0;T\x07name")
            announce("goodname")
            return "goodname" in browse.stdout

        wait_until(seen_good, 15, "the good announcement after a forged one")
    finally:
        responder.close()
    assert "Traceback" not in browse.stderr, browse.stderr
    assert "BadTypeInName" not in browse.stderr, browse.stderr
