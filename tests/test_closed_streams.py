"""Every program run with a closed stdout (``cmd >&-``), or a closed stdin and stderr.

Nothing crashes: a program that has output to write says, in one line, that
stdout is closed (status 1); one with nothing to write works as usual; and a
daemon never lets a file or socket it opens take descriptor 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROGRAMS, Procs, command, run
from tests.test_bus import SERVING, replay

CLOSED = "stdout is closed"
EVERY_PROGRAM = {**PROGRAMS, "eda-lb": "eda.cli.lb", "eda-txn": "eda.cli.txn"}


def run_closed(program: str, *args: str, close: str = ">&-") -> subprocess.CompletedProcess[str]:
    """Run an eda program to completion with the descriptors *close* names closed."""
    argv = ["sh", "-c", f'exec "$@" {close}', "sh", sys.executable, "-m",
            EVERY_PROGRAM[program], *args]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    return subprocess.CompletedProcess(
        argv, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode()
    )


@pytest.mark.parametrize("program", sorted(EVERY_PROGRAM))
def test_output_to_a_closed_stdout_is_a_one_line_error(program: str) -> None:
    done = run_closed(program, "--version")
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"{program}: error: {CLOSED} (>&-): there is nowhere to write the output\n"


def test_eda_sub_with_nothing_to_write_times_out_as_usual() -> None:
    done = run_closed("eda-sub", "x", "-W", "1")
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr and "no event for 1 s" in done.stderr


def test_a_bus_with_closed_standard_streams_serves_and_a_subscriber_says_stdout_is_closed(
    procs: Procs, tmp_path: Path
) -> None:
    argv = command("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--bind",
                   "tcp://127.0.0.1:0", "--no-mdns")  # fmt: skip
    bus = procs.start(["sh", "-c", 'exec "$@" <&- >&-', "sh", *argv])
    ep = bus.wait_stderr(SERVING, 15)[1]
    done = run_closed("eda-pub", "--bus", ep, "--confirm", "t.closed", "a", "b", close="<&- >&-")
    assert (done.returncode, done.stderr) == (0, "")
    done = run_closed("eda-sub", "--bus", ep, "t.closed", "--from-start", "-C", "2", "-W", "10")
    assert done.returncode == 1
    assert done.stderr == f"eda-sub: error: {CLOSED} (>&-): there is nowhere to write the output\n"
    # and nothing was written anywhere else: the store holds the two events, intact
    assert [json.loads(line)["data"] for line in replay(ep, "t.closed", 2)] == ["a", "b"]
    # a closed stderr: the work is done, the diagnostics are discarded
    done = run_closed("eda-pub", "--bus", ep, "--confirm", "t.closed", "c", close="2>&-")
    assert (done.returncode, done.stdout) == (0, "")
    stats = run("eda-bus", "stats", "--bus", ep, "--json")
    assert any(json.loads(line).get("events") == 3 for line in stats.stdout.splitlines())
