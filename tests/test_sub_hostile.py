"""eda-sub attacked by a hostile peer: crafted batches never kill it, forge output or move its
state, and it keeps delivering the well-behaved publisher's events during and after the attack."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from contextlib import contextmanager

import pytest
import zmq

from eda.core import codec
from tests.helpers import command, readable, run, wait_until

GOOD = codec.encode_origin("good1", "eda://test/good")
ROGUE = codec.encode_origin("rogue1", "eda://test/rogue")


def batch(topic, payloads, *, seq=1, kind=codec.TEXT, origin=GOOD, when=0.0, count=None, ext=b""):
    n = len(payloads) if count is None else count
    frames = [topic.encode(), codec.encode_header(kind, n, seq, when, origin), b"\n".join(payloads)]
    return [*frames, ext] if ext else frames


def bound_sub(procs, *args, **kw):
    """eda-sub bound on loopback without mDNS, and its endpoint."""
    sub = procs.eda("eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", *args, **kw)
    return sub, sub.wait_stderr(r"listening on (tcp://\S+)").group(1)


@contextmanager
def peer(endpoint):
    """An XPUB connected to *endpoint*, once the subscriber's subscriptions have arrived."""
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)  # this peer never drops what a test sends
    sock.connect(endpoint)
    try:
        assert sock.poll(15_000), "no subscription arrived from eda-sub"
        while sock.poll(200):
            sock.recv()
        yield sock
    finally:
        sock.close(0)


HOSTILE = [
    batch("t", [b"huge time"], when=1e20, origin=ROGUE),
    batch("t", [b"negative time"], when=-1e20, origin=ROGUE),
    batch("t", [b"infinite time"], when=float("inf"), origin=ROGUE),
    batch("t", [b"lying count"], count=1000, origin=ROGUE),
    batch("t", [b"x"], ext=b"[1,2]", origin=ROGUE),
    batch("t", [b"x"], ext=b'{"type":"orders.spoofed"}', origin=ROGUE),
    batch("t", [b"NaN"], kind=codec.JSON, origin=ROGUE),
    batch("t", [b"x"], origin=b'r","type":"orders.spoofed\x00rogue'),
    batch(
        "t", [b'{"specversion":"1.0","id":"1","source":"s","type":"other"}'], kind=codec.ENVELOPE
    ),
    [b"t"],
    [b"t", b"\x01" * 40, b"x", b"y", b"z"],
]


@pytest.mark.parametrize(
    "mode", [[], ["--format", "{topic} {data} {ext}"], ["--exec", "cat"], ["-C", "2"]]
)
def test_hostile_batches_neither_kill_nor_reach_the_output(procs, mode):
    args = ["t", "-C", "2", *[m for m in mode if m not in ("-C", "2")]]
    sub, endpoint = bound_sub(procs, *args)
    with peer(endpoint) as sock:
        sock.send_multipart(batch("t", [b"before"], seq=1))
        for frames in HOSTILE:
            sock.send_multipart(frames)
        # the lying count said 1000 events from seq 1: had it moved the sequence
        # state, this legitimate event would be dropped as a duplicate
        sock.send_multipart(batch("t", [b"after"], seq=1, origin=ROGUE))
        assert sub.wait(20) == 0, sub.stderr
    assert "Traceback" not in sub.stderr
    assert "ignored" in sub.stderr and "malformed" in sub.stderr
    out = sub.stdout
    assert "before" in out and "after" in out
    assert "spoofed" not in out and "huge" not in out and "lying" not in out
    if not mode:
        events = [json.loads(line, parse_constant=float.__call__) for line in sub.lines()]
        assert [e["data"] for e in events] == ["before", "after"]


def test_malformed_warnings_are_rate_limited_during_a_flood(procs):
    sub, endpoint = bound_sub(procs, "t", "-C", "1", "--raw")
    with peer(endpoint) as sock:
        for _ in range(2000):
            sock.send_multipart(HOSTILE[0])
        sock.send_multipart(batch("t", [b"survived"]))
        assert sub.wait(20) == 0
    assert sub.lines() == ["survived"]
    reports = [line for line in sub.stderr.splitlines() if "malformed" in line]
    assert 1 <= len(reports) <= 5, reports
    total = sum(int(line.split("ignored ")[1].split()[0]) for line in reports)
    assert total == 2000


def _endpoint_from(proc: subprocess.Popen) -> str:
    err = b""
    deadline = time.monotonic() + 15
    while b"listening on" not in err or not err.endswith(b"\n"):
        assert time.monotonic() < deadline, err
        if readable([proc.stderr], 0.5):
            err += os.read(proc.stderr.fileno(), 4096)
    return err.decode().split("listening on ")[1].split()[0]


def test_peer_text_is_escaped_on_a_terminal():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    try:
        proc = subprocess.Popen(
            command("eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-C", "1"),
            stdout=slave,
            stderr=subprocess.PIPE,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "200"},
            start_new_session=True,
        )
        try:
            endpoint = _endpoint_from(proc)
            evil = b"\x1b]0;pwned\x07\x1b[2Jcleared"
            with peer(endpoint) as sock:
                sock.send_multipart(batch("t", [evil]))
                assert proc.wait(15) == 0
            screen = b""
            while select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                screen += chunk
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
    finally:
        os.close(master)
        os.close(slave)
    assert b"cleared" in screen
    assert b"\x1b]0;" not in screen and b"\x1b[2J" not in screen
    assert b"\\x1b]0;pwned\\x07" in screen


def test_exec_gets_no_nul_from_a_peer_and_failures_exit_one(procs, tmp_path):
    log = tmp_path / "ids"
    sub, endpoint = bound_sub(
        procs, "t", "-C", "2", "--exec", f'printf "%s\\n" "$EDA_ID" >> {log}; exit 3'
    )
    line = b'{"specversion":"1.0","id":"a\\u0000b","source":"s","type":"t","data":1}'
    with peer(endpoint) as sock:
        sock.send_multipart(batch("t", [line], kind=codec.ENVELOPE))
        sock.send_multipart(batch("t", [b"second"], seq=2, origin=ROGUE))
        assert sub.wait(20) == 1
    assert "Traceback" not in sub.stderr
    assert sub.stderr.count("--exec command exited 3") == 2
    assert sub.stderr.splitlines()[-1] == "eda-sub: error: --exec command failed for 2 item(s)"
    assert log.read_text().splitlines() == ["a\\x00b", "rogue1-2"]


def _pipe_fill(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_idle_timeout_does_not_count_time_blocked_on_a_slow_reader():
    read_end, write_end = os.pipe()
    sub = subprocess.Popen(
        command(
            "eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-W", "2", "--raw"
        ),
        stdout=write_end,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(write_end)
    try:
        endpoint = _endpoint_from(sub)
        with peer(endpoint) as sock:
            big = [b"%06d %s" % (i, b"x" * 200) for i in range(2000)]  # 400 KB: fills the pipe
            sock.send_multipart(batch("t", big, seq=1))
            # eda-sub is now blocked writing into the full pipe; the next batch waits in its queue
            wait_until(lambda: _pipe_fill(read_end) >= 60_000, 15, "a full pipe")
            sock.send_multipart(batch("t", [b"queued while blocked"], seq=2001))
            time.sleep(3)  # a slow reader: longer than -W, on purpose
            out = b""
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, "eda-sub did not end"
                if select.select([read_end], [], [], 0.5)[0]:
                    chunk = os.read(read_end, 1 << 16)
                    if not chunk:
                        break
                    out += chunk
        assert sub.wait(15) == 4
        err = sub.stderr.read().decode()
    finally:
        os.close(read_end)
        if sub.poll() is None:
            sub.kill()
        sub.wait()
        sub.stderr.close()
    lines = out.splitlines()
    assert len(lines) == 2001 and lines[-1] == b"queued while blocked"
    assert "eda-sub: no event for 2 s (-W/--timeout): exiting with status 4" in err


def test_idle_timeout_says_why_it_exits():
    result = run("eda-sub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", "-W", "0.3")
    assert result.returncode == 4
    assert result.stderr == "eda-sub: no event for 0.3 s (-W/--timeout): exiting with status 4\n"


@pytest.mark.parametrize(
    ("pattern", "hint"),
    [("orders.#", "orders.>"), ("orders/#", "orders.>"), ("orders/+", "orders.*")],
)
def test_mqtt_patterns_are_refused_with_a_hint(pattern, hint):
    result = run("eda-sub", pattern)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"use '{hint}'" in result.stderr


def test_non_utf8_topic_argument_is_one_line_error():
    for prog, args in (("eda-sub", [b"orders.\xff"]), ("eda-pub", [b"orders.\xff", b"x"])):
        argv = [os.fsencode(a) for a in command(prog)] + args
        result = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert err.count("\n") == 1 and "not valid UTF-8" in err and "Traceback" not in err


def test_unknown_format_field_is_refused_and_dicts_render_as_json(procs):
    result = run("eda-sub", "t", "--format", "{tpoic} {data}")
    assert result.returncode == 2 and "unknown field {tpoic}" in result.stderr
    sub, endpoint = bound_sub(
        procs, "t", "-C", "1", "--format", "{ext}|{ext[tenant]}|{ext[nope]}|{data}"
    )
    with peer(endpoint) as sock:
        sock.send_multipart(batch("t", [b'{"a":[1,2]}'], kind=codec.JSON, ext=b'{"tenant":"acme"}'))
        assert sub.wait(20) == 0
    assert sub.lines() == ['{"tenant":"acme"}|acme||{"a":[1,2]}']


def test_shared_json_encoder_is_safe_for_values_from_the_wire():
    from eda.cli.output import json_text

    def refuse(name):
        raise AssertionError(name)

    text = json_text(
        {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "bad": "a\ud800b", "ok": 1.5}
    )
    text.encode()  # valid UTF-8
    assert json.loads(text, parse_constant=refuse) == {
        "nan": None,
        "inf": [None, None],
        "bad": "a\ud800b",
        "ok": 1.5,
    }
