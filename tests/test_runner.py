"""The one process runner (core/runner.py): process groups, timeouts, caps, stdin, and
the rule for a failure's reason.  No sockets: pipes and processes only."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from eda.core import runner
from eda.core.lineprocess import LineProcess
from eda.core.runner import Outcome, SelectLoop, run, shell
from tests.helpers import wait_until


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie not reaped yet by its parent counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_stdin_is_written_while_stdout_is_read() -> None:
    data = b"x" * (3 << 20) + b"\n"  # far over a pipe's buffer both ways
    outcome = run(["cat"], data, timeout=30, max_output=4 << 20)
    assert outcome.ok and outcome.stdout == data and not outcome.overflow


def test_no_data_is_an_empty_stdin_not_the_callers() -> None:
    outcome = run(shell("cat; echo done"), None, timeout=30)
    assert outcome.ok and outcome.stdout == b"done\n"


def test_a_timeout_stops_the_whole_group_children_too(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    cmd = f"sleep 60 & echo $! > {pids}; sleep 60"
    outcome = run(shell(cmd), timeout=0.3)
    assert outcome.timed_out == 0.3 and not outcome.ok
    assert outcome.reason() == "timed out after 0.3s"
    child = int(pids.read_text())
    wait_until(lambda: _gone(child), 10, "the background child killed with its shell")


def test_a_timeout_sends_sigterm_first_then_sigkill_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "GRACE", 0.3)
    flag = tmp_path / "cleaned"
    # it cleans up on SIGTERM: it had the chance to
    polite = run(shell(f"trap 'touch {flag}; exit 9' TERM; sleep 60 & wait"), timeout=0.2)
    assert polite.timed_out and flag.exists()
    # it ignores SIGTERM: SIGKILL follows after the grace, children too
    pids = tmp_path / "pids"
    stubborn = run(
        shell(f"trap '' TERM; sh -c 'trap \"\" TERM; sleep 60' & echo $! > {pids}; wait"),
        timeout=0.2,
    )
    assert stubborn.timed_out and stubborn.reason() == "timed out after 0.2s"
    child = int(pids.read_text())
    wait_until(lambda: _gone(child), 10, "the child that ignored SIGTERM killed")


def test_output_over_the_cap_is_cut_or_kills_as_asked() -> None:
    kept = run(shell("head -c 100000 /dev/zero; echo fine >&2"), timeout=30, max_output=1000)
    assert kept.ok and kept.overflow and kept.stdout == b"\0" * 1000
    killed = run(["yes"], timeout=30, max_output=1000, kill_on_overflow=True)
    assert killed.overflow and not killed.ok and killed.status == -signal.SIGKILL


def test_stderr_keeps_its_tail_and_is_passed_on_as_it_comes() -> None:
    seen: list[bytes] = []
    cmd = "i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; exit 4"
    outcome = run(shell(cmd), timeout=30, on_stderr=seen.append)
    assert len(outcome.stderr) <= runner.STDERR_TAIL
    assert outcome.stderr.endswith(b"line 1999\n")
    assert b"".join(seen).startswith(b"line 0\nline 1\n")
    assert outcome.reason() == "exit status 4: line 1999"


@pytest.mark.parametrize(
    ("cmd", "reason"),
    [
        ("echo out; echo 'last word' >&2; echo >&2; exit 3", "exit status 3: last word"),
        ("echo 'from stdout'; echo; exit 2", "exit status 2: from stdout"),
        ("exit 5", "exit status 5"),
        ("kill -9 $$", "killed by signal 9"),
        ("printf 'a\\033]0;x\\007b' >&2; exit 1", "exit status 1: a?]0;x?b"),
    ],
)
def test_the_reason_rule(cmd: str, reason: str) -> None:
    outcome = run(shell(cmd), timeout=30)
    assert not outcome.ok and outcome.reason() == reason


def test_a_reason_line_is_cut() -> None:
    outcome = run(shell(f"echo {'y' * 1000} >&2; exit 1"), timeout=30)
    assert outcome.reason() == "exit status 1: " + "y" * runner.REASON_CHARS


def test_a_command_that_cannot_start_is_one_error() -> None:
    with pytest.raises(runner.RunError, match="cannot run /nonexistent/x"):
        run(["/nonexistent/x"])


def test_an_exited_shell_does_not_wait_for_children_holding_its_pipes() -> None:
    outcome = run(shell("sleep 60 & echo $!"), timeout=120)
    child = int(outcome.stdout)
    try:
        assert outcome.ok and not _gone(child)  # the shell's end, not its child's
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_line_protocol_answers_in_order_and_reports_its_end() -> None:
    loop = SelectLoop()
    lines: list[bytes] = []
    ended: list[Outcome] = []
    script = (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    if line.strip() == 'die':\n"
        "        print('dying', file=sys.stderr, flush=True); sys.exit(7)\n"
        "    print(line.strip().upper(), flush=True)\n"
    )
    proc = LineProcess(
        [sys.executable, "-c", script], loop, on_lines=lines.extend, on_exit=ended.append,
        on_overflow=lambda: None,
    )  # fmt: skip
    try:
        proc.start()
        proc.send(b"a\nb\n")
        deadline = time.monotonic() + 20
        while len(lines) < 2 and time.monotonic() < deadline:
            loop.step(0.5)
        assert lines == [b"A", b"B"]
        proc.send(b"die\n")
        while not ended and time.monotonic() < deadline:
            loop.step(0.5)
        assert not proc.running and ended[0].reason() == "exit status 7: dying"
    finally:
        proc.stop()
        loop.close()


def test_a_line_over_the_limit_is_reported() -> None:
    loop = SelectLoop()
    over: list[bool] = []
    proc = LineProcess(
        ["sh", "-c", "head -c 100000 /dev/zero; sleep 30"], loop, on_lines=lambda _l: None,
        on_exit=lambda _o: None, on_overflow=lambda: over.append(True), max_line=1000,
    )  # fmt: skip
    try:
        proc.start()
        deadline = time.monotonic() + 20
        while not over and time.monotonic() < deadline:
            loop.step(0.5)
        assert over
    finally:
        proc.stop()
        loop.close()


# -- every program follows the rule ----------------------------------------------------------
def test_a_txn_participant_command_says_why_from_stderr_and_is_asked_to_stop(
    tmp_path: Path,
) -> None:
    """eda-txn's --prepare/--commit/--abort commands: the reason was stdout's last line
    only (``prepare exited 1``), and a timeout killed them outright."""
    from eda.core.txn.actions import Call, ShellActions

    flag = tmp_path / "cleaned"
    actions = ShellActions(
        "pay",
        {
            "prepare": "echo 'card declined' >&2; exit 1",
            "commit": f"trap 'touch {flag}; exit 1' TERM; sleep 30 & wait",
        },
        timeout=0.3,
    )
    voted = actions.run(Call("prepare", "c1.1", {}, 1))
    assert not voted.ok and voted.reason == "exit status 1: card declined"
    stuck = actions.run(Call("commit", "c1.1", {}, 1))
    assert stuck.reason == "timed out after 0.3s" and flag.exists()


def test_a_saga_step_says_why_from_stdout_when_stderr_is_silent(tmp_path: Path) -> None:
    """Saga run steps: the reason was stderr's tail only."""
    from eda.core.txn.sagaactions import Invocation, run_shell

    inv = Invocation("s1", "pay", 1, "action", b"{}\n", str(tmp_path))
    result = run_shell("echo 'insufficient funds'; exit 3", inv, 10.0)
    assert not result.ok and result.error == "exit status 3: insufficient funds"


def test_a_health_check_past_its_timeout_is_asked_to_stop_first(tmp_path: Path) -> None:
    """eda-registry register --check: a check past its timeout was killed outright."""
    from eda.core.registry.health import run_command
    from eda.core.registry.model import CRITICAL, WARNING

    flag = tmp_path / "cleaned"
    assert run_command(f"trap 'touch {flag}; exit 1' TERM; sleep 30 & wait", 0.3, {}) == CRITICAL
    assert flag.exists()
    assert run_command("exit 1", 10.0, {}) == WARNING
