"""eda-pub and eda-sub end to end on one host (the suite's private namespace)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime

import zmq

from eda.core import codec
from tests.helpers import command, readable, run, wait_until


def read_line(stream, timeout: float) -> bytes:
    """One line from a pipe, or AssertionError after *timeout* seconds (never blocks forever)."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not readable([fd], left):
            raise AssertionError(f"no line within {timeout}s; got {data!r}")
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.lines()]


def test_stdin_lines_are_events_and_blank_lines_are_skipped(procs):
    sub = procs.sub_ready("logs.>", "-C", "3")
    result = run("eda-pub", "logs.app", input="first\n\nsecond\nthird")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert sub.wait() == 0
    got = events(sub)
    assert [e["data"] for e in got] == ["first", "second", "third"]
    assert [e["edaseq"] for e in got] == [1, 2, 3]
    assert len({e["id"] for e in got}) == 3


def test_whole_stdin_is_one_event(procs):
    sub = procs.sub_ready("doc", "-C", "1")
    assert run("eda-pub", "doc", "-s", input="line1\nline2\n").returncode == 0
    assert sub.wait() == 0
    assert events(sub)[0]["data"] == "line1\nline2\n"


def test_json_mode_skips_invalid_lines_and_reports_them(procs):
    sub = procs.sub_ready("orders.*", "-C", "2")
    result = run("eda-pub", "orders.created", "--json", input='{"id": 1}\nnot json\n{"id": 2}\n')
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("eda-pub: error: line 2: invalid JSON")
    assert lines[-1] == "eda-pub: error: 1 input(s) rejected"
    assert sub.wait() == 0
    got = events(sub)
    assert [e["data"] for e in got] == [{"id": 1}, {"id": 2}]
    assert got[0]["datacontenttype"] == "application/json"


def test_json_argument_is_validated(procs):
    sub = procs.sub_ready("t", "-C", "1")
    result = run("eda-pub", "t", "--json", "{bad", '{"ok": true}')
    assert result.returncode == 1 and "argument 1: invalid JSON" in result.stderr
    assert sub.wait() == 0 and events(sub)[0]["data"] == {"ok": True}


def test_headers_become_extension_attributes(procs):
    sub = procs.sub_ready("t", "-C", "1")
    assert run("eda-pub", "t", "-H", "tenant=acme", "-H", "traceparent=00-ab", "x").returncode == 0
    assert sub.wait() == 0
    event = events(sub)[0]
    assert event["tenant"] == "acme" and event["traceparent"] == "00-ab"


def test_bad_header_and_bad_topic_are_usage_errors():
    result = run("eda-pub", "t", "-H", "novalue", "x")
    assert result.returncode == 2 and result.stderr.startswith("eda-pub: error:")
    assert result.stderr.count("\n") == 1
    result = run("eda-pub", "bad topic", "x")
    assert result.returncode == 2 and "invalid topic" in result.stderr
    result = run("eda-sub", "a.>.b")
    assert result.returncode == 2 and "invalid pattern" in result.stderr


def test_envelope_round_trip_keeps_topic_id_and_headers(procs):
    sub1 = procs.sub_ready("orders.>", "-C", "2")
    assert run("eda-pub", "orders.created", "-H", "tenant=acme", "a", "b").returncode == 0
    assert sub1.wait() == 0
    original = events(sub1)
    sub2 = procs.sub_ready("orders.>", "-C", "2")
    result = run("eda-pub", "--envelope", input=sub1.stdout)
    assert result.returncode == 0, result.stderr
    assert sub2.wait() == 0
    copied = events(sub2)
    for before, after in zip(original, copied, strict=True):
        for key in ("id", "source", "type", "time", "tenant", "data"):
            assert before[key] == after[key]


def test_envelope_with_topic_overrides_type_and_reports_bad_lines(procs):
    sub = procs.sub_ready("copy.x", "-C", "1")
    result = run("eda-pub", "--envelope", "copy.x", input='{"id":"1","type":"a","data":1}\n{oops\n')
    assert result.returncode == 1 and "line 2: invalid JSON envelope" in result.stderr
    assert sub.wait() == 0
    assert events(sub)[0]["type"] == "copy.x" and events(sub)[0]["id"] == "1"


def test_patterns_filter_topics(procs):
    sub = procs.sub_ready("orders.*", "logs.>", "-C", "3", "--format", "{topic}")
    for topic in ("orders.a", "orders.a.b", "other.x", "logs.x.y", "orders", "logs.z"):
        assert run("eda-pub", topic, "m").returncode == 0
    assert sub.wait() == 0
    assert sub.lines() == ["orders.a", "logs.x.y", "logs.z"]


def test_raw_and_format_outputs(procs):
    raw = procs.sub_ready("t", "-C", "2", "--raw")
    fmt = procs.sub_ready("t", "-C", "2", "--format", "{edaseq}\\t{topic}\\t{data}\\t{subject}")
    assert run("eda-pub", "t", "--json", '{"a":1}', '"s"').returncode == 0
    assert raw.wait() == 0 and fmt.wait() == 0
    assert raw.lines() == ['{"a":1}', '"s"']
    assert fmt.lines() == ['1\tt\t{"a":1}\t', "2\tt\ts\t"]


def test_count_exits_zero_and_idle_timeout_exits_four(procs):
    result = run("eda-sub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-W", "0.3")
    assert result.returncode == 4 and result.stdout == ""
    sub = procs.sub_ready("t", "-C", "2", "-W", "20")
    assert run("eda-pub", "t", "1", "2", "3").returncode == 0
    assert sub.wait() == 0 and len(sub.lines()) == 2


def test_explicit_wiring_without_mdns(procs):
    # the publisher binds (a port of its own choosing: no free-port-then-bind race),
    # the subscriber connects
    pub = procs.start(
        command(
            "eda-pub",
            "-v",
            "--no-mdns",
            "--bind",
            "tcp://127.0.0.1:*",
            "--wait-subscribers",
            "1",
            "--wait",
            "20",
            "t",
            "hello",
        )
    )
    endpoint = pub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    sub = procs.eda("eda-sub", "--no-mdns", "--connect", endpoint, "t", "-C", "1")
    assert sub.wait() == 0 and pub.wait() == 0
    assert events(sub)[0]["data"] == "hello"
    # the subscriber binds, the publisher connects (and waits for it by itself)
    sub = procs.eda("eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-C", "1")
    bound = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    assert run("eda-pub", "--no-mdns", "--connect", bound, "t", "x").returncode == 0
    assert sub.wait() == 0 and events(sub)[0]["data"] == "x"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_bound_publisher_delivers_to_a_subscriber_already_connecting_to_it(procs):
    """No --wait-subscribers: a subscriber retrying a --connect to the port gets the events."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    sub = procs.eda(
        "eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "--connect", endpoint,
        "t.>", "-C", "3",
    )  # fmt: skip
    sub.wait_stderr("listening on")  # (its --connect follows at once, and retries)
    result = run("eda-pub", "--no-mdns", "--bind", endpoint, "t.x", "a", "b", "c")
    assert result.returncode == 0, result.stderr
    assert "reached nobody" not in result.stderr
    assert sub.wait(10) == 0
    assert [e["data"] for e in events(sub)] == ["a", "b", "c"]


def test_a_publish_that_reaches_nobody_says_so(tmp_path):
    """Publishing to no subscriber is not an error (exit 0), but it is never silent."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    one_shot = run("eda-pub", "t", "x", "y", env=env)
    assert one_shot.returncode == 0
    assert "no subscriber was found or connected: the 2 event(s) reached nobody" in (
        one_shot.stderr
    )
    bound = run("eda-pub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "x", env=env)
    assert bound.returncode == 0 and "reached nobody" in bound.stderr
    whole = run("eda-pub", "--no-mdns", "-s", "t", input="a\nb\n", env=env)
    assert whole.returncode == 0 and "the 1 event(s) reached nobody" in whole.stderr


def test_wait_subscribers_times_out_with_status_four():
    result = run("eda-pub", "--no-mdns", "--wait-subscribers", "1", "--wait", "0.3", "t", "x")
    assert result.returncode == 4
    assert "only 0 subscriber(s) ready after 0.3s" in result.stderr


def test_subscriber_started_later_finds_a_streaming_publisher(procs, tmp_path):
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    feeder = os.open(fifo, os.O_RDWR)  # keeps the fifo open for the publisher
    try:
        pub = procs.start(command("eda-pub", "-v", "live.feed"), stdin=os.open(fifo, os.O_RDONLY))
        pub.wait_stderr("announced", 15)
        sub = procs.eda("eda-sub", "-v", "live.>", "-C", "1")
        subid = sub.wait_stderr(r"as (\w+)", 15).group(1)
        # the publisher has this subscriber's subscriptions: what it sends now arrives
        pub.wait_stderr(f"subscriber {subid} ready", 15)
        os.write(feeder, b"late hello\n")
        assert sub.wait() == 0
        assert events(sub)[0]["data"] == "late hello"
    finally:
        os.close(feeder)
    assert pub.wait() == 0


def test_loss_is_reported_and_strict_exits_five(procs, tmp_path):
    sub = procs.sub_ready("flood", "--hwm", "1", "--strict", "--exec", "sleep 0.01")
    data = tmp_path / "flood.txt"
    # 24 MB: more than any socket buffers can hold, so the high-water mark must drop
    data.write_text("".join(f"{i:06d} {'x' * 2000}\n" for i in range(12000)))
    with data.open("rb") as fh:
        result = subprocess.run(
            command("eda-pub", "--hwm", "1", "--rate", "1000000", "flood"),
            stdin=fh,
            capture_output=True,
            timeout=60,
        )
    assert sub.wait(30) == 5
    assert "eda-sub: lost " in sub.stderr and " events from eda://" in sub.stderr
    # whether the subscriber left at its first gap (its goodbye carries its loss)
    # or confirmed the end of the stream with its loss first, eda-pub reports it
    stderr = result.stderr.decode()
    assert result.returncode == 5, stderr
    assert re.search(r"subscriber \w+ lost \d+ event", stderr), stderr
    assert "Traceback" not in stderr


def test_exec_runs_once_per_event_with_environment(procs, tmp_path):
    log = tmp_path / "log"
    sub = procs.sub_ready(
        "jobs.*",
        "-C",
        "2",
        "--exec",
        f'printf "%s %s " "$EDA_TOPIC" "$EDA_ID" >> {log}; cat >> {log}',
    )
    assert run("eda-pub", "jobs.new", "a", "b").returncode == 0
    assert sub.wait() == 0 and sub.stdout == ""
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    topic, event_id, body = lines[0].split(" ", 2)
    assert topic == "jobs.new" and json.loads(body)["id"] == event_id


def test_malformed_wire_messages_are_ignored_and_counted(procs):
    sub = procs.eda("eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-C", "1")
    bound = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    rogue = zmq.Context.instance().socket(zmq.PUB)
    rogue.connect(bound)
    try:
        header = codec.encode_header(codec.TEXT, 1, 1, 0.0, codec.encode_origin("r", "rogue"))

        def send_until_seen() -> bool:
            rogue.send_multipart([b"t", b"garbage", b"x"])
            return "malformed" in sub.stderr

        wait_until(send_until_seen, 15, "malformed message report")
        rogue.send_multipart([b"t", header, b"good"])
        assert sub.wait() == 0
    finally:
        rogue.close(0)
    assert events(sub)[0]["data"] == "good"
    assert "ignored" in sub.stderr


def test_duplicates_are_dropped_and_gaps_reported(procs):
    sub = procs.eda(
        "eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-C", "4", "--raw"
    )
    bound = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.connect(bound)
    origin = codec.encode_origin("p1", "eda://test/p1")
    try:

        def batch(seq: int, body: bytes, n: int) -> list[bytes]:
            return [b"t", codec.encode_header(codec.TEXT, n, seq, 0.0, origin), body]

        def first_arrives() -> bool:
            pub.send_multipart(batch(1, b"one", 1))
            return bool(sub.lines())

        wait_until(first_arrives, 15, "first event")
        pub.send_multipart(batch(1, b"one", 1))  # duplicate: dropped
        pub.send_multipart(batch(1, b"one\ntwo", 2))  # overlap: only "two" is new
        pub.send_multipart(batch(5, b"five\nsix", 2))  # 3 and 4 lost
        assert sub.wait() == 0
    finally:
        pub.close(0)
    assert sub.lines()[-3:] == ["two", "five", "six"]
    assert "lost 2 events from eda://test/p1 (topic t)" in sub.stderr


def test_closed_pipe_ends_quietly(tmp_path):
    err = (tmp_path / "err").open("wb")
    proc = subprocess.Popen(
        command("eda-sub", "-v", "t", "--raw"), stdout=subprocess.PIPE, stderr=err
    )
    try:
        wait_until(lambda: "announced" in (tmp_path / "err").read_text(), 15, "announcement")
        assert run("eda-pub", "t", "first").returncode == 0
        assert read_line(proc.stdout, 15) == b"first\n"
        proc.stdout.close()  # like `| head -n 1` exiting
        wait_until(
            lambda: run("eda-pub", "t", "more").returncode == 0 and proc.poll() is not None,
            20,
            "exit on closed pipe",
        )
        assert proc.returncode == 0
        assert (tmp_path / "err").read_text().count("Traceback") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        err.close()


def test_sigterm_flushes_and_exits_cleanly(procs):
    sub = procs.sub_ready("t")
    assert run("eda-pub", "t", "kept").returncode == 0
    sub.wait_lines(1)
    sub.signal(signal.SIGTERM)
    assert sub.wait() == 0
    assert "Traceback" not in sub.stderr and events(sub)[0]["data"] == "kept"


def test_sigint_exits_130(procs):
    sub = procs.sub_ready("t")
    sub.signal(signal.SIGINT)
    assert sub.wait() == 130
    assert "Traceback" not in sub.stderr


def test_rate_limits_the_feed(procs):
    sub = procs.sub_ready("paced", "-C", "20")
    result = run("eda-pub", "paced", "--rate", "100", input="".join(f"{i}\n" for i in range(20)))
    assert result.returncode == 0 and sub.wait() == 0
    got = events(sub)
    assert [e["data"] for e in got] == [str(i) for i in range(20)]
    # measured with the publisher's own send times (no interpreter start-up inside):
    # 19 intervals of 1/100 s, a lower bound only
    times = [datetime.fromisoformat(e["time"].replace("Z", "+00:00")) for e in got]
    assert (times[-1] - times[0]).total_seconds() >= 0.9 * 19 / 100


def test_progress_with_a_file_delivers_everything(procs, tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("".join(f"{i}\n" for i in range(1000)))
    sub = procs.sub_ready("p", "-C", "1000", "--raw")
    with data.open("rb") as fh:
        result = subprocess.run(
            command("eda-pub", "p", "--progress"), stdin=fh, capture_output=True, timeout=60
        )
    assert result.returncode == 0 and sub.wait() == 0
    assert sub.lines() == [str(i) for i in range(1000)]
    assert run("eda-pub", "p", "--progress", "msg").returncode == 2


def test_python_m_and_console_scripts_agree():
    import shutil
    import sys

    for prog in ("eda-pub", "eda-sub"):
        script = shutil.which(prog, path=os.path.dirname(sys.executable))
        assert script, f"{prog} console script not installed"
        by_script = subprocess.run(
            [script, "--version"], capture_output=True, text=True, timeout=30
        )
        by_module = run(prog, "--version")
        assert by_script.stdout == by_module.stdout and by_script.returncode == 0


def test_warm_discovery_cache_never_hides_a_new_subscriber(procs):
    first = procs.sub_ready("t", "-C", "2")
    assert run("eda-pub", "t", "warm the cache").returncode == 0
    first.wait_lines(1)
    second = procs.sub_ready("t", "-C", "1")  # not in the cache yet
    result = run("eda-pub", "-v", "t", "both")
    assert result.returncode == 0
    assert "found 2 subscriber(s)" in result.stderr
    assert first.wait() == 0 and second.wait() == 0
    assert json.loads(second.lines()[0])["data"] == "both"


def test_bad_format_templates_are_one_line_usage_errors(procs):
    result = run("eda-sub", "t", "--format", "{unclosed")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("eda-sub: error: --format '{unclosed'")
    sub = procs.sub_ready("t", "--format", "{edaseq[0]}")
    assert run("eda-pub", "t", "x").returncode == 0
    assert sub.wait() == 2
    assert "eda-sub: error: --format '{edaseq[0]}'" in sub.stderr and "Traceback" not in sub.stderr


def test_absurdly_nested_json_is_one_rejected_line(procs):
    sub = procs.sub_ready("t", "-C", "2", "--raw")
    nested = "[" * 100_000 + "]" * 100_000
    result = run("eda-pub", "t", "--json", input=f"1\n{nested}\n2\n")
    assert result.returncode == 1 and "line 2: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert sub.wait() == 0 and sub.lines() == ["1", "2"]


def test_crafted_envelope_batches_do_not_kill_a_subscriber(procs):
    sub = procs.eda(
        "eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-C", "1", "--raw"
    )
    bound = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    rogue = zmq.Context.instance().socket(zmq.PUB)
    rogue.connect(bound)
    origin = codec.encode_origin("r", "rogue")
    try:

        def rejected() -> bool:
            for seq, body in ((1, b"[1]"), (2, b"[" * 50_000)):
                header = codec.encode_header(codec.ENVELOPE, 1, seq, 0.0, origin)
                rogue.send_multipart([b"t", header, body])
            return "malformed" in sub.stderr

        wait_until(rejected, 15, "malformed report")
        good = codec.encode_header(codec.ENVELOPE, 1, 3, 0.0, origin)
        rogue.send_multipart(
            [b"t", good, b'{"specversion":"1.0","id":"1","source":"r","type":"t","data":"fine"}']
        )
        assert sub.wait() == 0
    finally:
        rogue.close(0)
    assert sub.lines() == ["fine"] and "Traceback" not in sub.stderr
