"""The test harness itself (tests/conftest.py, tests/helpers.py): what makes the suite
fast enough to run whole, and the messages a failing wait gives."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.helpers import Proc, Procs, together


def test_every_module_of_eda_has_current_bytecode_before_the_tests_start() -> None:
    """Thousands of eda processes start in a run: none compiles eda from source (with
    PYTHONDONTWRITEBYTECODE set, none would write what it compiled for the next)."""
    sources = [p for folder in ("core", "cli") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50
    stale = []
    for source in sources:
        pyc = Path(importlib.util.cache_from_source(str(source)))
        if not pyc.exists():
            stale.append(str(source))
            continue
        # the header records the source's mtime and size, or its hash (PEP 552)
        header = pyc.read_bytes()[:16]
        if int.from_bytes(header[4:8], "little") & 1:  # hash-based (SOURCE_DATE_EPOCH set)
            current = header[8:16] == importlib.util.source_hash(source.read_bytes())
        else:
            stat = source.stat()
            recorded = (
                int.from_bytes(header[8:12], "little"),
                int.from_bytes(header[12:16], "little"),
            )
            current = recorded == (int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF)
        if not current:
            stale.append(str(source))
    assert not stale, f"{len(stale)} modules without current bytecode, e.g. {stale[:3]}"


def _late_writer(procs: Procs, stream: str) -> Proc:
    """A process that writes 'late' on *stream* after the test began waiting."""
    script = f"import sys, time; time.sleep(0.3); print('late', file=sys.{stream}, flush=True);"
    script += "time.sleep(30)"
    return procs.start([sys.executable, "-c", script])


def test_a_failed_wait_shows_what_the_process_wrote_by_the_deadline(procs: Procs) -> None:
    err, out = _late_writer(procs, "stderr"), _late_writer(procs, "stdout")

    def failed(wait: Any) -> str:
        with pytest.raises(AssertionError) as caught:
            wait()
        return str(caught.value)

    # both waits at once (each began before its writer wrote)
    said = together(
        lambda: failed(lambda: err.wait_stderr("never said", timeout=3)),
        lambda: failed(lambda: out.wait_lines(2, timeout=3)),
    )
    assert all("late" in message for message in said), said


def test_newlines_counts_what_lines_counts_as_it_grows(procs: Procs) -> None:
    script = (
        "import sys\nfor i in range(30000):\n    sys.stdout.write(f'{i} ' + 'x' * 100 + '\\n')\n"
    )
    proc = procs.start([sys.executable, "-c", script])
    assert len(proc.wait_lines(30000, 30)) == 30000
    assert proc.popen.wait(30) == 0
    assert proc.newlines() == 30000 == len(proc.lines())
    # a short output whose last line has no newline: counted as lines() counts it
    unended = procs.start([sys.executable, "-c", "print('one'); print('two', end='')"])
    assert unended.wait_lines(2, 10) == ["one", "two"]
    assert unended.newlines() == 1


def test_together_gives_results_in_order_and_raises_what_one_raised() -> None:
    assert together(lambda: 1, lambda: "two", lambda: None) == [1, "two", None]

    def fails() -> None:
        raise ValueError("this one")

    with pytest.raises(ValueError, match="this one"):
        together(lambda: 1, fails)


def test_programs_started_by_the_tests_take_sigint(procs: Procs) -> None:
    """Whether or not this run was started in the background (SIGINT ignored), the
    programs the tests start get SIGINT's default: tests stop them with it."""
    proc = procs.eda("eda-sub", "--no-mdns", "t")
    ignored = next(
        int(line.split()[1], 16)
        for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines()
        if line.startswith("SigIgn:")
    )
    assert not ignored & (1 << (2 - 1)), "SIGINT is ignored by the started program"
