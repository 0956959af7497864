"""eda-txn status: following one saga or transaction as it runs (--follow, issue 16),
and the status table's environment variable (EDA_TXN_STATUS_FORMAT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import wait_until

WAITING = """
[[step]]
name = "reserve"
run = "while [ ! -f go ]; do sleep 0.02; done"
compensate = "true"
[[step]]
name = "charge"
run = "EXIT"
"""


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "eda.cli.txn", *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def txn(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = start(*args, cwd=cwd, env=env)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def running_saga(tmp_path: Path, charge: str) -> subprocess.Popen[str]:
    """A saga whose first step waits for the file ``go``; its log exists when this returns."""
    (tmp_path / "s.toml").write_text(WAITING.replace("EXIT", charge))
    saga = start("saga", "s.toml", "--id", "order-7", cwd=tmp_path)
    log = tmp_path / "txn" / "sagas" / "order-7.jsonl"
    wait_until(lambda: log.exists() and "step-started" in log.read_text(), 15, "the saga running")
    return saga


def changes(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_follow_prints_each_step_change_and_exits_0_when_the_saga_completes(
    tmp_path: Path,
) -> None:
    saga = running_saga(tmp_path, "true")
    follow = start("status", "order-7", "--follow", cwd=tmp_path)
    assert follow.stdout is not None
    first = json.loads(follow.stdout.readline())  # where it stands, before it goes on
    assert (first["txn"], first["step"], first["status"]) == ("order-7", "reserve", "running")
    (tmp_path / "go").touch()
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    seen = changes(out)
    steps = [(c["step"], c["status"]) for c in seen if "step" in c]
    assert ("reserve", "done") in steps and steps[-1] == ("charge", "done")
    assert seen[-1] == {"txn": "order-7", "kind": "saga", "state": "completed",
                        "time": seen[-1]["time"]}  # fmt: skip
    assert saga.wait(30) == 0


def test_follow_exits_5_for_a_compensated_saga_and_130_on_sigint(tmp_path: Path) -> None:
    saga = running_saga(tmp_path, "exit 3")
    follow = start("status", "order-7", "-f", cwd=tmp_path)
    assert follow.stdout is not None
    follow.stdout.readline()
    (tmp_path / "go").touch()
    out, _ = follow.communicate(timeout=60)
    assert follow.returncode == 5
    assert changes(out)[-1]["state"] == "compensated"
    assert ("reserve", "compensated") in [(c.get("step"), c.get("status")) for c in changes(out)]
    saga.wait(30)

    (tmp_path / "go").unlink()
    (tmp_path / "s.toml").write_text(WAITING.replace("EXIT", "true"))
    waiting = start("saga", "s.toml", "--id", "order-8", cwd=tmp_path)
    log = tmp_path / "txn" / "sagas" / "order-8.jsonl"
    wait_until(lambda: log.exists() and "step-started" in log.read_text(), 15, "the saga running")
    follow = start("status", "order-8", "--follow", cwd=tmp_path)
    assert follow.stdout is not None
    follow.stdout.readline()
    follow.send_signal(signal.SIGINT)
    assert follow.wait(30) == 130
    waiting.send_signal(signal.SIGINT)
    waiting.wait(30)


def test_follow_needs_an_id_that_exists(tmp_path: Path) -> None:
    bad = txn("status", "--follow", cwd=tmp_path)
    assert bad.returncode == 2 and "give its ID" in bad.stderr
    gone = txn("status", "nosuch", "--follow", cwd=tmp_path)
    assert gone.returncode == 3 and gone.stderr.count("\n") == 1, gone.stderr


def test_each_subcommand_has_its_own_format_variable(tmp_path: Path) -> None:
    """EDA_TXN_FORMAT fed commit's fields to status (exit 2); now EDA_TXN_<SUB>_FORMAT."""
    (tmp_path / "s.toml").write_text('[[step]]\nname = "a"\nrun = "true"\n')
    assert txn("saga", "s.toml", "--id", "s-1", cwd=tmp_path).returncode == 0
    commits = {"EDA_TXN_COMMIT_FORMAT": "{outcome} {txn}", "EDA_TXN_FORMAT": "{outcome}"}
    plain = txn("status", cwd=tmp_path, env=commits)  # commit's template is not status's
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["txn"] == "s-1"
    own = txn("status", cwd=tmp_path, env={"EDA_TXN_STATUS_FORMAT": "{txn} {state}"})
    assert (own.returncode, own.stdout) == (0, "s-1 completed\n"), own.stderr
    man = txn("status", "--help", cwd=tmp_path)
    assert "--follow" in man.stdout


def test_a_not_found_is_one_line_even_with_verbose(tmp_path: Path) -> None:
    gone = txn("status", "nosuch", "-v", cwd=tmp_path)
    assert gone.returncode == 3
    assert gone.stderr == "eda-txn: error: no transaction or saga nosuch in txn\n", gone.stderr


def test_a_dry_run_prints_the_plan_with_the_format_given(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[[step]]\nname = "a"\nrun = "true"\ncompensate = "false"\n[[step]]\nname = "b"\nrun = "true"\n'
    )
    done = txn("saga", "--dry-run", "s.toml", "--format", "{stage} {step} {compensate}",
               cwd=tmp_path)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "1 a run false\n2 b \n"), done.stderr
    bad = txn("saga", "--dry-run", "s.toml", "--format", "{event}", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown field {event}" in bad.stderr
