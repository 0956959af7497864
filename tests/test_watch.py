"""--watch (cli/watch.py) with real daemons: piped, a JSON line per snapshot with rates;
on a terminal (a pty), a live view redrawn in place; Ctrl-C ends it with 0, a lost
daemon as the command without --watch ends."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers import PROGRAMS, Proc, Procs, command, run, wait_until
from tests.test_bus import start_bus
from tests.test_registry import register
from tests.test_registry import serve as serve_registry
from tests.test_txn_status import running_saga


def publish(ep: str, topic: str, n: int) -> None:
    done = run("eda-pub", "--bus", ep, "--confirm", topic, input="x\n" * n)
    assert done.returncode == 0, done.stderr


def snapshots(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.lines() if line.endswith("}")]


def row(snapshot: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(r for r in snapshot["rows"] if r["kind"] == kind)


def test_bus_stats_watch_piped_prints_a_snapshot_per_interval_with_rates(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    publish(ep, "t.a", 3)
    watch = procs.eda("eda-bus", "stats", "--watch", "--interval", "0.2", "--bus", ep)
    watch.wait_lines(3, 30)
    first = snapshots(watch)
    assert first[0]["interval"] is None and row(first[0], "bus")["events_per_s"] is None
    assert all(s["interval"] > 0 for s in first[1:])
    assert row(first[1], "topic") == {**row(first[1], "topic"), "topic": "t.a", "events": 3,
                                       "events_per_s": 0.0}  # fmt: skip
    publish(ep, "t.a", 40)
    wait_until(lambda: any(row(s, "bus")["events"] == 43 for s in snapshots(watch)), 30,
               "a snapshot with the new events")  # fmt: skip
    got = snapshots(watch)
    i = next(i for i, s in enumerate(got) if row(s, "bus")["events"] == 43)
    before, after = row(got[i - 1], "bus"), row(got[i], "bus")
    rate = (after["events"] - before["events"]) / got[i]["interval"]
    assert after["events_per_s"] > 0
    assert abs(after["events_per_s"] - rate) <= 0.05 * rate  # from the two snapshots
    times = [s["time"] for s in got]
    assert times == sorted(times) and len(set(times)) == len(times)
    watch.signal(signal.SIGINT)
    assert watch.wait(10) == 0, watch.stderr
    assert watch.stderr == ""


def test_watch_ends_on_a_lost_bus_as_stats_without_watch_does(procs: Procs, tmp_path: Path) -> None:
    bus, ep = start_bus(procs, tmp_path / "bus")
    watch = procs.eda("eda-bus", "stats", "--watch", "--interval", "0.2", "--timeout", "1",
                      "--bus", ep)  # fmt: skip
    watch.wait_lines(2, 30)
    bus.kill()
    code = watch.wait(30)
    once = run("eda-bus", "stats", "--timeout", "1", "--bus", ep)
    assert code == once.returncode != 0, (watch.stderr, once.stderr)
    assert watch.stderr.splitlines()[-1] == once.stderr.strip()
    assert len(watch.stderr.strip().splitlines()) == 1


def test_registry_list_watch_shows_an_instance_come_and_go(procs: Procs) -> None:
    _, ep = serve_registry(procs)
    watch = procs.eda("eda-registry", "list", "--watch", "--interval", "0.2", "--registry", ep)
    watch.wait_lines(1, 30)
    assert snapshots(watch)[0]["rows"] == []
    inst = register(procs, ep, "orders", 8080)

    def ids() -> list[list[str]]:
        return [[r["id"] for r in s["rows"]] for s in snapshots(watch)]

    wait_until(lambda: any(ids()), 30, "a snapshot with the instance")
    shown = next(s for s in snapshots(watch) if s["rows"])["rows"][0]
    assert shown["service"] == "orders" and shown["port"] == 8080
    assert shown["status"] == "passing"
    inst.signal(signal.SIGINT)  # deregisters
    assert inst.wait(15) == 130  # (a daemon stopped by SIGINT)
    wait_until(lambda: any(ids()) and ids()[-1] == [], 30, "a snapshot without it")
    watch.signal(signal.SIGINT)
    assert watch.wait(10) == 0, watch.stderr


def test_txn_status_watch_shows_a_saga_change_state(tmp_path: Path, procs: Procs) -> None:
    saga = running_saga(tmp_path, "true")
    watch = procs.start([sys.executable, "-m", "eda.cli.txn", "status", "--watch", "--interval",
                         "0.2", "--log", str(tmp_path / "txn")])  # fmt: skip
    watch.wait_lines(2, 30)

    def states() -> list[list[tuple[str, str]]]:
        return [[(r["txn"], r["state"]) for r in s["rows"]] for s in snapshots(watch)]

    assert states()[0] == [("order-7", "running")]
    (tmp_path / "go").write_text("")
    assert saga.wait(30) == 0
    wait_until(lambda: states()[-1] == [("order-7", "completed")], 30, "the saga completed")
    watch.signal(signal.SIGINT)
    assert watch.wait(10) == 0, watch.stderr


def _read_pty(fd: int, into: bytearray, until: float) -> None:
    while time.monotonic() < until:
        # poll, not select: an xdist worker may hold more than 1,024 fds (select's limit)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ready = poller.poll(max(0.0, until - time.monotonic()) * 1000)
        if not ready:
            return
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other side closed
            return
        if not chunk:
            return
        into += chunk


def test_bus_stats_watch_on_a_terminal_redraws_in_place(procs: Procs, tmp_path: Path) -> None:
    _, ep = start_bus(procs, tmp_path / "bus")
    publish(ep, "t.a", 3)
    main, tty = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "30", "TERM": "xterm"}
    proc = subprocess.Popen(command("eda-bus", "stats", "--watch", "--interval", "0.2",
                                    "--bus", ep), stdin=tty, stdout=tty, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)  # fmt: skip
    os.close(tty)
    seen = bytearray()
    try:

        def shows(text: bytes) -> bool:
            _read_pty(main, seen, time.monotonic() + 0.2)
            return text in seen

        wait_until(lambda: shows(b"events/s") and shows(b"t.a"), 30, f"the live view: {seen!r}")
        publish(ep, "t.a", 4)
        wait_until(lambda: shows(b" 7 "), 30, f"the new count: {seen!r}")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
        _read_pty(main, seen, time.monotonic() + 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(main)
    text = seen.decode(errors="replace")
    # redrawn in place: the cursor goes back up over the previous frame, never a scroll
    # of frames; and nothing of the JSON mode
    assert "\x1b[1A" in text or "\x1b[A" in text or "\x1b[2K" in text, text
    assert '"rows"' not in text
    assert text.count("kind") >= 2  # several frames, each with the table's heading


def test_lb_stats_watch_gives_requests_per_second_and_ends_when_no_instance_is_left(
    procs: Procs,
) -> None:
    PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
    broker = procs.eda("eda-lb", "serve", "watched", "-v", "--heartbeat", "0.2",
                       "--bind", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0")  # fmt: skip
    worker = procs.eda("eda-lb", "worker", "watched", "-v", "--heartbeat", "0.2", "--id", "w1",
                       "--persistent", "--", "cat")  # fmt: skip
    broker.wait_stderr(r"listening on .*\((registered|announced by mDNS)\)", 15)
    watch = procs.eda("eda-lb", "stats", "watched", "--watch", "--interval", "0.3",
                      "--timeout", "1")  # fmt: skip

    def requests() -> list[Any]:
        return [[(r["instance"], r["requests"]) for r in s["rows"]] for s in snapshots(watch)]

    wait_until(lambda: any(("w1", 0) in s for s in requests()), 30, "the worker at the broker")
    done = run("eda-lb", "call", "watched", "--via", "watched", input="x\n" * 50)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: ("w1", 50) in requests()[-1], 30, "the calls counted")
    got = snapshots(watch)
    i = next(i for i, s in enumerate(got) if any(r["requests"] == 50 for r in s["rows"]))
    before = next(r for r in got[i - 1]["rows"] if r["instance"] == "w1")
    after = next(r for r in got[i]["rows"] if r["instance"] == "w1")
    rate = (after["requests"] - before["requests"]) / got[i]["interval"]
    assert after["requests_per_s"] > 0 and abs(after["requests_per_s"] - rate) <= 0.05 * rate
    broker.kill()  # the broker's instance is gone: its workers, asked directly, or exit 1
    worker.kill()  # and then none is left: exit 1 (none answered) or 3 (none found)
    assert watch.wait(60) in (1, 3), watch.stderr
    assert watch.stderr.strip().splitlines()[-1].startswith("eda-lb: error: "), watch.stderr
