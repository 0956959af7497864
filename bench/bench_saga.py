"""eda-txn sagas: what the executor adds per step beyond the steps' own commands.

The saga has five shell-command steps, each ``sleep 0.01`` (a command with a
run time of its own, 10 ms).  The anchor is the same five commands run
directly by sh (``sh -c 'sleep 0.01; sleep 0.01; ...'``), timed the same way
in the same run; eda and anchor runs alternate, so load from elsewhere hits
both alike.  Every saga run writes and fsyncs its log (12 records: 2 per step
and 2 per saga) in a fresh directory.

* in-process executor: ``saga.start(...).run()`` in this process, wall time
  of the whole saga against the anchor's; overhead per step =
  (saga - anchor) / 5.  Target: < 5 ms per step.
* ``eda-txn saga five.toml``: a whole process, wall time; its overhead per
  step counts the interpreter's start-up, so the note also gives the
  overhead with the start-up of ``eda-txn saga --dry-run five.toml`` (start,
  imports, reading the file; no step) taken out.  No target (the start-up
  is one per saga, not one per step).

Each saga's log must end with ``saga-completed`` and hold five ``step-done``
records, or the row fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from harness import BenchError, Row, eda_cmd, eda_env, median, row, scratch

STEPS = 5
COMMAND = "sleep 0.01"
SAGA = "".join(f'[[step]]\nname = "s{i}"\nrun = "{COMMAND}"\n\n' for i in range(1, STEPS + 1))
ANCHOR = "sh: the 5 commands"


def _wall(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, check=False, timeout=60)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{args[0]} exited {done.returncode}: {done.stderr[-300:]!r}")
    return wall


def _check_log(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    done = sum(1 for r in records if r["event"] == "step-done")
    if records[-1]["event"] != "saga-completed" or done != STEPS:
        raise BenchError(f"{path.name}: {done} steps done, last event {records[-1]['event']}")


def run(quick: bool) -> list[Row]:
    from eda.core.txn import saga, sagafile

    rounds = 10 if quick else 30
    with scratch("eda-bench-saga-") as work:
        env = eda_env(work)
        (work / "five.toml").write_text(SAGA)
        plan = sagafile.parse(SAGA, "five.toml")
        anchor_args = ["sh", "-c", "; ".join([COMMAND] * STEPS)]
        inproc: list[float] = []
        cli: list[float] = []
        dry: list[float] = []
        sh: list[float] = []
        for i in range(rounds):
            sh.append(_wall(anchor_args, work))
            start = time.perf_counter()
            with saga.start(plan, {"round": i}, work / "inproc", cwd=str(work)) as one:
                status = one.run()
            inproc.append(time.perf_counter() - start)
            if status != saga.COMPLETED:
                raise BenchError(f"in-process saga ended {status}")
            _check_log(saga.log_path(work / "inproc", one.saga_id))
            sh.append(_wall(anchor_args, work))
            saga_id = f"cli-{i}"
            cli.append(
                _wall(
                    [eda_cmd("eda-txn"), "saga", "five.toml", "--id", saga_id, "--log", "cli"],
                    work,
                    env,
                )
            )
            _check_log(saga.log_path(work / "cli", saga_id))
            dry.append(_wall([eda_cmd("eda-txn"), "saga", "--dry-run", "five.toml"], work, env))
    anchor = median(sh)
    per_step_inproc = (median(inproc) - anchor) / STEPS * 1000
    per_step_cli = (median(cli) - anchor) / STEPS * 1000
    per_step_net = (median(cli) - median(dry) - anchor) / STEPS * 1000
    rows = [
        row(
            "saga of 5 shell steps, in-process executor",
            median(inproc) * 1000,
            ANCHOR,
            anchor * 1000,
            "ms",
            higher_is_better=False,
        ),
        row(
            "saga per-step overhead (in-process executor)",
            per_step_inproc,
            "",
            None,
            "ms/step",
            higher_is_better=False,
            target="< 5 ms/step",
            ok=per_step_inproc < 5.0,
            note=f"(saga - sh) / {STEPS}, medians of {rounds}; 12 fsynced log records per saga",
        ),
        row(
            "eda-txn saga (whole process), 5 shell steps",
            median(cli) * 1000,
            ANCHOR,
            anchor * 1000,
            "ms",
            higher_is_better=False,
            note=(
                f"per step {per_step_cli:.1f} ms with the interpreter's start-up; "
                f"{per_step_net:.1f} ms without it (eda-txn saga --dry-run takes "
                f"{median(dry) * 1000:.0f} ms)"
            ),
        ),
    ]
    return rows
