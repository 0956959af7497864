"""bench/harness.py's helpers that benchmarks share (the benchmarks themselves run in `make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import harness


def test_time_command_keeps_what_the_command_printed_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    wall, code = harness.time_command(
        [sys.executable, "-c", "print('svc7/a'); print('svc7/b')"], tmp_path, stdout=out
    )
    assert code == 0
    assert wall > 0
    assert out.read_text() == "svc7/a\nsvc7/b\n"


def test_time_command_still_reports_the_exit_status_and_drops_stdout(tmp_path: Path) -> None:
    _wall, code = harness.time_command(
        [sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], tmp_path
    )
    assert code == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timed.err"]


def test_cpu_seconds_counts_what_a_process_used_and_refuses_a_gone_one() -> None:
    busy = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", busy])
    try:
        start = harness.cpu_seconds(proc.pid)
        wait_until(lambda: harness.cpu_seconds(proc.pid) >= start + 0.1, 30, "CPU time to grow")
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(harness.BenchError, match="gone"):
        harness.cpu_seconds(proc.pid)
