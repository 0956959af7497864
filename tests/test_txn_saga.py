"""Sagas: the TOML file, the executor (order, groups, retries, timeouts, pivot,
compensation, stuck, resume), crash recovery at every crash point, a bank
invariant under kills, and a hypothesis state machine of the executor."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from eda.core.errors import NotFoundError, UsageError
from eda.core.txn import journal, saga, sagafile
from eda.core.txn.saga import Crashed, Invocation, Result
from eda.core.txn.sagafile import SagaFileError
from eda.core.txn.sagaplan import Action, Plan, Retry, Step
from tests.helpers import wait_until

# -- helpers --------------------------------------------------------------------------------


def txn(
    *args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eda.cli.txn", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_text(
    tmp_path: Path, text: str, data: dict[str, Any] | None = None, **options: Any
) -> tuple[str, saga.SagaRun, list[dict[str, Any]]]:
    """Run the saga *text* in-process in *tmp_path*; its status, run and events."""
    seen: list[dict[str, Any]] = []
    plan = sagafile.parse(text, str(tmp_path / "saga.toml"))
    run = saga.start(
        plan, data or {}, tmp_path / "log", cwd=str(tmp_path), on_event=seen.append, **options
    )
    try:
        status = run.run()
    finally:
        run.close()
    return status, run, seen


def names(seen: list[dict[str, Any]], event: str) -> list[str]:
    return [e["step"] for e in seen if e["event"] == event]


class World:
    """A fake runner: actions succeed or fail as scripted; effects are a set.

    Like the actions the README asks for, it is idempotent: an action whose
    effect is there (a try whose success a crash kept from the log) succeeds
    again, and so does the compensation of what is not there."""

    def __init__(self, fail: dict[tuple[str, str], set[int]] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple[str, str, int]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.applied: set[str] = set()
        self.ever: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, action: Action, inv: Invocation) -> Result:
        key = (inv.step, inv.phase)
        with self.lock:
            n = self.counts[key] = self.counts.get(key, 0) + 1
            self.calls.append((inv.step, inv.phase, inv.attempt))
            # idempotent, as the README asks: a repeat of what took effect succeeds
            done = inv.step in self.applied
            if done == (inv.phase == "action"):
                return Result(True)
            if n in self.fail.get(key, set()):
                return Result(False, error=f"{inv.step} {inv.phase} failure {n}")
            if inv.phase == "action":
                self.applied.add(inv.step)
                self.ever.add(inv.step)
                return Result(True, {f"{inv.step}_done": n})
            self.applied.discard(inv.step)
            return Result(True)


def plan_of(*steps: Step) -> Plan:
    return Plan("t", tuple(steps), "test")


def step(
    name: str,
    comp: bool = True,
    attempts: int = 1,
    group: str | None = None,
    pivot: bool = False,
    retriable: bool = False,
    comp_attempts: int = 1,
) -> Step:
    retry = Retry(attempts, 0.0, 0.0)
    compensate = (
        Action("run", f"undo {name}", None, Retry(comp_attempts, 0.0, 0.0)) if comp else None
    )
    return Step(name, Action("run", name, None, retry), compensate, group, pivot, retriable)


def drive(
    plan: Plan,
    world: World,
    log: Path,
    saga_id: str = "s1",
    crash_at: int | None = None,
    crash_odds: tuple[random.Random, float] | None = None,
) -> str | None:
    """Start or resume *plan*; crash (None returned) at the *crash_at*-th crash point
    reached, or at each with the probability of *crash_odds* = (generator, p)."""
    points = [0]

    def hook(point: str) -> None:
        points[0] += 1
        if crash_at is not None and points[0] == crash_at:
            raise Crashed()
        if crash_odds is not None and crash_odds[0].random() < crash_odds[1]:
            raise Crashed()

    options: dict[str, Any] = {"runner": world, "crash_hook": hook, "sleep": lambda s: None}
    try:
        if saga.log_path(log, saga_id).exists():
            run = saga.resume(log, saga_id, **options)
        else:
            run = saga.start(plan, {"x": 1}, log, saga_id=saga_id, **options)
    except Crashed:
        return None
    try:
        return run.run()
    except Crashed:
        return None
    finally:
        run.close()


# -- the file ---------------------------------------------------------------------------------

GOOD = """\
name = "order"
timeout = 5
retry = { attempts = 2, backoff = 0.1 }

[[step]]
name = "reserve"
run = "./reserve.sh"
compensate = "./release.sh"

[[step]]
name = "charge"
publish = "orders.charge"
compensate = { publish = "orders.refund", retry = { attempts = 5 } }
timeout = 2

[[step]]
name = "confirm"
run = "true"
pivot = true

[[step]]
name = "ship"
group = "after"
run = "true"

[[step]]
name = "mail"
group = "after"
run = "true"
"""


def test_a_good_file_loads_into_a_plan_with_stages_defaults_and_pivot() -> None:
    plan = sagafile.parse(GOOD, "order.toml")
    assert plan.name == "order"
    assert [[s.name for s in stage] for stage in plan.stages()] == [
        ["reserve"], ["charge"], ["confirm"], ["ship", "mail"]
    ]  # fmt: skip
    reserve, charge, confirm, ship, mail = plan.steps
    assert reserve.action == Action("run", "./reserve.sh", 5.0, Retry(2, 0.1))
    assert reserve.compensate == Action("run", "./release.sh", 5.0, Retry(2, 0.1))
    assert charge.compensate is not None and charge.compensate.kind == "publish"
    assert charge.compensate.retry.attempts == 5 and charge.compensate.timeout == 2.0
    assert confirm.pivot and not confirm.retriable
    assert ship.retriable and mail.retriable and not reserve.retriable
    assert reserve.line == 5 and mail.line == 26
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


BAD_FILES = [
    # (text, line, words the error must contain)
    ('[[step]]\nname = "a"\nrun = "x"\nbogus = 1\n', 4, ["step 'a'", "key 'bogus'", "unknown key"]),
    ('[[step]]\nname = "a"\n', 1, ["step 'a': needs an action"]),
    ('[[step]]\nrun = "x"\n[[step]]\nrun = "y"\n', 1, ["[[step]] number 1: a step needs a name"]),
    ('[[step]]\nname = "a"\nrun = "x"\ncall = "y"\n', 4, ["key 'call'", "one action"]),
    (
        '[[step]]\nname = "a"\nrun = "x"\n[[step]]\nname = "a"\nrun = "y"\n',
        5,
        ["key 'name'", "twice"],
    ),
    ('[[step]]\nname = "a b"\nrun = "x"\n', 2, ["key 'name'", "not a valid name"]),
    ('[[step]]\nname = "a"\nrun = "x"\ntimeout = -1\n', 4, ["key 'timeout'", "> 0"]),
    ('[[step]]\nname = "a"\nrun = "x"\ntimeout = "5s"\n', 4, ["key 'timeout'", "a number"]),
    (
        '[[step]]\nname = "a"\nrun = "x"\n\n[step.retry]\nattempts = 0\n',
        6,
        ["key 'retry.attempts'"],
    ),
    ('[[step]]\nname = "a"\nrun = "x"\nretry.jitter = 2\n', 4, ["key 'retry.jitter'", "at most 1"]),
    (
        '[[step]]\nname = "a"\nrun = "x"\nretry = { tries = 2 }\n',
        4,
        ["key 'retry.tries'", "unknown"],
    ),
    (
        '[[step]]\nname = "a"\nrun = "x"\n[[step]]\nname = "b"\nrun = "y"\ncompensate = 3\n',
        7,
        ["step 'b'", "key 'compensate'"],
    ),
    (
        '[[step]]\nname = "a"\nrun = "x"\ncompensate = { run = "u", publish = "t" }\n',
        4,
        ["key 'compensate.publish'"],
    ),
    ('[[step]]\nname = "a"\npublish = "bad topic"\n', 3, ["key 'publish'", "invalid topic"]),
    (
        '[[step]]\nname = "a"\nrun = "x"\nconnect = "tcp://h:1"\n',
        4,
        ["key 'connect'", "only publish and call"],
    ),
    (
        '[[step]]\nname = "a"\nrun = "x"\npivot = true\n[[step]]\nname = "b"\nrun = "y"\ncompensate = "z"\n',
        8,
        ["step 'b'", "key 'compensate'", "never run"],
    ),
    (
        '[[step]]\nname = "a"\nrun = "x"\npivot = true\ncompensate = "z"\n',
        5,
        ["key 'compensate'", "never run"],
    ),
    (
        '[[step]]\nname = "a"\nrun = "x"\npivot = true\n[[step]]\nname = "b"\nrun = "y"\npivot = true\n',
        8,
        ["key 'pivot'", "only one"],
    ),
    ('[[step]]\nname = "a"\nrun = "x"\ngroup = "g"\npivot = true\n', 5, ["key 'pivot'", "group"]),
    (
        '[[step]]\nname = "a"\nrun = "x"\ngroup = "g"\n[[step]]\nname = "b"\nrun = "x"\n[[step]]\nname = "c"\nrun = "x"\ngroup = "g"\n',
        11,
        ["step 'c'", "key 'group'", "consecutive"],
    ),
    ('nmae = "x"\n[[step]]\nname = "a"\nrun = "x"\n', 1, ["key 'nmae'", "unknown key"]),
    ('name = "x"\n', 1, ["key 'step'", "at least one"]),
    ('name = "x"\n\n[[step]\nname = "a"\n', 3, ["invalid TOML", "line 3"]),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_FILES)
def test_an_invalid_file_gets_an_error_naming_line_and_key(
    text: str, line: int, words: list[str]
) -> None:
    with pytest.raises(SagaFileError) as caught:
        sagafile.parse(text, "bad.toml")
    message = str(caught.value)
    assert message.startswith("bad.toml:"), message
    if "invalid TOML" not in message:
        assert message.startswith(f"bad.toml:{line}: "), message
    for word in words:
        assert word in message, message
    assert "\n" not in message


def test_the_line_of_a_key_is_found_in_every_way_toml_writes_it() -> None:
    text = (
        'name = "x"\n'  # 1
        "[retry]\n"  # 2
        "attempts = 3\n"  # 3
        "[[step]]\n"  # 4
        'name = "a"\n'  # 5
        "[step.compensate]\n"  # 6
        'run = "u"\n'  # 7
        "retry.attempts = 9\n"  # 8
        "[[step]]\n"  # 9
        '"name" = "b"\n'  # 10
        'compensate = { run = "v", retry = { attempts = 0 } }\n'  # 11
        'x = """\n[[step]]\nname = "fake"\n"""\n'  # 12-15
        'run = "w"\n'  # 16
    )
    locate = sagafile.locate
    assert locate(text, ["retry", "attempts"]) == 3
    assert locate(text, ["step", 0, "compensate", "run"]) == 7
    assert locate(text, ["step", 0, "compensate", "retry", "attempts"]) == 8
    assert locate(text, ["step", 1, "name"]) == 10
    assert locate(text, ["step", 1, "compensate", "retry", "attempts"]) == 11  # inline table
    assert locate(text, ["step", 1, "run"]) == 16  # the multi-line string is not a table
    assert locate(text, ["step", 1]) == 9
    assert locate(text, ["step", 5, "run"]) == 1


def test_init_writes_a_commented_template_the_loader_accepts(tmp_path: Path) -> None:
    done = txn("saga", "init", "order.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "order.toml").read_text()
    assert text.count("\n#") >= 10 and "[[step]]" in text
    plan = sagafile.load(tmp_path / "order.toml")
    assert [s.name for s in plan.steps] == ["reserve-stock", "charge", "confirm", "ship", "notify"]
    assert plan.steps[2].pivot and plan.steps[3].retriable and plan.steps[3].group == "after"
    again = txn("saga", "init", "order.toml", cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr
    assert txn("saga", "init", "-", cwd=tmp_path).stdout == text


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(GOOD.replace("./reserve.sh", "touch ran"))
    done = txn("saga", "--dry-run", "s.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = events(done.stdout)
    assert [(r["stage"], r["step"]) for r in rows] == [
        (1, "reserve"), (2, "charge"), (3, "confirm"), (4, "ship"), (4, "mail")
    ]  # fmt: skip
    assert rows[0]["action"] == "run touch ran" and rows[0]["compensate"] == "run ./release.sh"
    assert rows[2]["pivot"] and rows[3]["retriable"] and rows[3]["group"] == "after"
    assert not (tmp_path / "ran").exists() and not (tmp_path / "txn").exists()
    (tmp_path / "bad.toml").write_text('[[step]]\nname = "a"\nrun = 5\n')
    bad = txn("saga", "--dry-run", "bad.toml", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "eda-txn: error: bad.toml:3: step 'a': key 'run': must be a non-empty string"
    )


# -- the executor: shell steps ------------------------------------------------------------------


def test_steps_run_in_order_with_data_on_stdin_ids_in_env_and_json_output_merged(
    tmp_path: Path,
) -> None:
    text = """
[[step]]
name = "one"
run = 'cat > one.in; echo "$EDA_SAGA_ID $EDA_STEP $EDA_ATTEMPT $EDA_SAGA_PHASE" > one.env; echo "{\\"a\\": 1, \\"b\\": 1}"'
[[step]]
name = "two"
run = 'cat > two.in; echo "{\\"b\\": 2, \\"c\\": [1, 2]}"'
[[step]]
name = "three"
run = 'cat > three.in; echo not json; pwd > three.pwd'
[[step]]
name = "four"
run = 'cat > four.in; echo "{\\"bad\\": NaN}"'
[[step]]
name = "five"
run = 'echo working...; echo "{\\"e\\": 5}"'
[[step]]
name = "six"
run = 'cat > six.in'
"""
    status, run, seen = run_text(tmp_path, text, {"order": 7, "b": 0}, saga_id="order-7")
    assert status == saga.COMPLETED
    assert names(seen, "step-done") == ["one", "two", "three", "four", "five", "six"]
    read = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    assert read("one.in") == {"order": 7, "b": 0}
    assert read("two.in") == {"order": 7, "b": 1, "a": 1}
    assert read("three.in") == {"order": 7, "b": 2, "a": 1, "c": [1, 2]}
    assert read("four.in") == read("three.in")  # plain text output is not merged
    assert (tmp_path / "one.env").read_text() == "order-7 one 1 action\n"
    assert (tmp_path / "three.pwd").read_text().strip() == str(tmp_path)
    four = next(e for e in seen if e["event"] == "step-done" and e["step"] == "four")
    assert "not valid JSON" in four["note"] and "output" not in four
    assert seen[-1]["event"] == "saga-completed"
    logged = list(journal.read(saga.log_path(tmp_path / "log", "order-7")))
    assert logged == seen  # the log holds exactly what was printed
    # text, then a JSON object on the last line: the object is merged
    assert read("six.in") == {"order": 7, "b": 2, "a": 1, "c": [1, 2], "e": 5}
    assert run.state.data() == read("six.in")


def test_a_failed_step_has_the_completed_ones_compensated_in_reverse_not_itself(
    tmp_path: Path,
) -> None:
    text = """
[[step]]
name = "a"
run = "echo do-a >> trace"
compensate = 'echo "undo-a $EDA_SAGA_PHASE $EDA_ATTEMPT" >> trace'
[[step]]
name = "nothing-to-undo"
run = "echo do-n >> trace"
[[step]]
name = "b"
run = "echo do-b >> trace"
compensate = "echo undo-b >> trace"
[[step]]
name = "c"
run = "echo do-c >> trace; echo no stock >&2; exit 3"
compensate = "echo undo-c >> trace"
[[step]]
name = "d"
run = "echo do-d >> trace"
compensate = "echo undo-d >> trace"
"""
    status, _, seen = run_text(tmp_path, text)
    assert status == saga.COMPENSATED
    assert (tmp_path / "trace").read_text().split("\n")[:-1] == [
        "do-a", "do-n", "do-b", "do-c", "undo-b", "undo-a compensate 1"
    ]  # fmt: skip
    failed = [e for e in seen if e["event"] == "step-failed"]
    assert failed == [failed[0]] and failed[0]["error"] == "exit status 3: no stock" and failed[0]["final"]
    assert [e["event"] for e in seen[-6:]] == [
        "saga-aborting", "compensation-started", "compensation-done",
        "compensation-started", "compensation-done", "saga-compensated",
    ]  # fmt: skip
    summary = saga.saga_status(tmp_path / "log")[0]
    assert summary["status"] == "compensated" and summary["step"] == "c"
    assert summary["steps"]["c"]["status"] == "failed"
    assert summary["steps"]["a"]["status"] == "compensated"
    assert summary["steps"]["nothing-to-undo"]["status"] == "done"
    assert summary["steps"]["d"]["status"] == "pending"


def test_retries_back_off_doubling_with_jitter_until_the_step_succeeds(tmp_path: Path) -> None:
    text = """
[[step]]
name = "flaky"
run = 'echo $EDA_ATTEMPT >> tries; [ $EDA_ATTEMPT -ge 4 ]'
retry = { attempts = 5, backoff = 1.0, jitter = 0.5, max_backoff = 3 }
"""
    slept: list[float] = []
    status, _, seen = run_text(tmp_path, text, sleep=slept.append, rand=lambda: 0.5)
    assert status == saga.COMPLETED
    assert (tmp_path / "tries").read_text().split() == ["1", "2", "3", "4"]
    assert slept == [0.75, 1.5, 2.25]  # 1, 2, 4 capped at 3; each cut by jitter*rand = 25 %
    assert [e["retry_in"] for e in seen if e["event"] == "step-failed"] == slept
    assert [e["final"] for e in seen if e["event"] == "step-failed"] == [False] * 3


@settings(deadline=None)  # (a loaded CI box must not fail it on time)
@given(
    backoff=st.floats(0, 10),
    jitter=st.floats(0, 1),
    most=st.floats(0.01, 100),
    failures=st.integers(1, 200),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_a_backoff_delay_stays_within_its_bounds(
    backoff: float, jitter: float, most: float, failures: int, rand: float
) -> None:
    base = min(most, backoff * 2.0 ** min(failures - 1, 60))
    delay = Retry(3, backoff, jitter, most).delay(failures, rand)
    assert base * (1 - jitter) - 1e-9 <= delay <= base + 1e-9
    assert delay <= most + 1e-9


def test_retries_use_real_time_between_tries(tmp_path: Path) -> None:
    text = """
[[step]]
name = "flaky"
run = 'date +%s.%N >> tries; [ $EDA_ATTEMPT -ge 3 ]'
retry = { attempts = 3, backoff = 0.1, jitter = 0 }
"""
    status, _, _ = run_text(tmp_path, text)
    times = [float(t) for t in (tmp_path / "tries").read_text().split()]
    assert status == saga.COMPLETED and len(times) == 3
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2


def test_a_step_over_its_timeout_is_killed_with_its_children_and_fails(tmp_path: Path) -> None:
    text = """
[[step]]
name = "slow"
run = "sleep 30 & echo $! > child; sleep 30"
timeout = 0.3
compensate = "touch undone"
"""
    status, _, seen = run_text(tmp_path, text)
    assert status == saga.COMPENSATED
    failed = [e for e in seen if e["event"] == "step-failed"]
    assert failed[0]["error"] == "timed out after 0.3s"
    child = int((tmp_path / "child").read_text())
    wait_until(lambda: not _alive(child), 5, "the step's background child to be killed")
    assert not (tmp_path / "undone").exists()  # the step that failed is not compensated


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def test_a_parallel_group_runs_its_steps_at_the_same_time(tmp_path: Path) -> None:
    # each member waits (up to 10 s) for the other to have started: only parallel runs pass
    wait = "i=0; while [ ! -e {other} ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; [ -e {other} ]"
    text = f"""
[[step]]
name = "first"
run = "echo '{{\\"first\\": 1}}'"
[[step]]
name = "left"
group = "g"
run = "cat > left.in; touch left.on; {wait.format(other="right.on")}; echo '{{\\"left\\": 1}}'"
[[step]]
name = "right"
group = "g"
run = "cat > right.in; touch right.on; {wait.format(other="left.on")}; echo '{{\\"right\\": 1}}'"
[[step]]
name = "last"
run = "cat > last.in"
"""
    status, _, seen = run_text(tmp_path, text)
    assert status == saga.COMPLETED
    started = [e["step"] for e in seen if e["event"] == "step-started"]
    assert started[0] == "first" and set(started[1:3]) == {"left", "right"} and started[3] == "last"
    # the members see the data as it was when the group started; later steps see all
    assert json.loads((tmp_path / "left.in").read_text()) == {"first": 1}
    assert json.loads((tmp_path / "right.in").read_text()) == {"first": 1}
    assert json.loads((tmp_path / "last.in").read_text()) == {"first": 1, "left": 1, "right": 1}


def test_a_group_member_failing_stops_the_others_retries_and_compensates_the_done_ones(
    tmp_path: Path,
) -> None:
    """Once a member ("bad") has failed for good, no other member starts a try: "slow"
    (failing every try, 50 allowed) finishes the try it is in and stops.  The order is
    made, not hoped for: bad fails once ok is done and slow is in its 3rd try, which ends only
    once bad's failure is durable; bad's thread then holds back (at the crash point after
    its record) until slow has started a 4th try or stopped."""
    world = World({("bad", "action"): {1}, ("slow", "action"): set(range(1, 51))})
    slow_third, bad_recorded = threading.Event(), threading.Event()

    def tries(name: str) -> int:
        with world.lock:
            return world.counts.get((name, "action"), 0)

    def scripted(action: Action, inv: Invocation) -> Result:
        if (inv.step, inv.phase) == ("bad", "action"):  # fails once ok is done, slow trying
            wait_until(lambda: slow_third.is_set() and "ok" in world.ever, 30, "ok and slow")
        if (inv.step, inv.phase, inv.attempt) == ("slow", "action", 3):
            slow_third.set()
            assert bad_recorded.wait(30), "bad's failure was never recorded"
        return world(action, inv)

    def hook(point: str) -> None:
        if point == "after-step-failed" and threading.current_thread().name == "saga-bad":
            bad_recorded.set()
            wait_until(
                lambda: (
                    tries("slow") >= 4
                    or not any(t.name == "saga-slow" for t in threading.enumerate())
                ),
                30,
                "slow to stop or try again",
            )

    plan = plan_of(
        step("a"),
        step("ok", group="g"),
        step("bad", group="g"),
        step("slow", group="g", attempts=50),
        step("z"),
    )
    run = saga.start(plan, {"x": 1}, tmp_path, saga_id="s1", runner=scripted,
                     crash_hook=hook, sleep=lambda s: None)  # fmt: skip
    try:
        assert run.run() == saga.COMPENSATED
    finally:
        run.close()
    assert world.counts[("slow", "action")] == 3  # no new try once the group was doomed
    assert world.applied == set() and world.ever == {"a", "ok"}
    assert [c[0] for c in world.calls if c[1] == "compensate"] == ["ok", "a"]


def test_steps_after_the_pivot_are_retried_until_they_succeed_never_compensated(
    tmp_path: Path,
) -> None:
    world = World({("after", "action"): {1, 2, 3, 4, 5}})
    plan = plan_of(
        step("before"), step("pivot", comp=False, pivot=True), step("after", False, retriable=True)
    )
    assert drive(plan, world, tmp_path) == saga.COMPLETED
    assert world.counts[("after", "action")] == 6  # attempts = 1, yet tried until it succeeded
    assert world.applied == {"before", "pivot", "after"}
    # the pivot failing for good is still compensated before it
    world = World({("pivot", "action"): {1}})
    assert drive(plan, world, tmp_path / "2") == saga.COMPENSATED
    assert world.applied == set() and ("before", "compensate", 1) in world.calls


def test_a_compensation_that_keeps_failing_leaves_the_saga_stuck_until_resumed(
    tmp_path: Path,
) -> None:
    text = """
[[step]]
name = "a"
run = "touch a"
compensate = 'echo "$EDA_ATTEMPT" >> undo-tries; [ -e fixed ] && rm a'
retry = { attempts = 2, backoff = 0 }
[[step]]
name = "b"
run = "exit 1"
"""
    (tmp_path / "s.toml").write_text(text)
    done = txn("saga", "s.toml", "--id", "stuck-1", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "saga stuck-1 is stuck: compensation of a failed" in done.stderr
    assert "--resume stuck-1" in done.stderr
    assert events(done.stdout)[-1]["event"] == "saga-stuck"
    assert (tmp_path / "undo-tries").read_text().split() == ["1", "2"]
    [summary] = saga.saga_status(tmp_path / "txn")
    assert summary["status"] == "stuck" and summary["step"] == "a" and not summary["active"]
    # still broken: stuck again, with a fresh budget of tries
    again = txn("saga", "--resume", "stuck-1", cwd=tmp_path)
    assert again.returncode == 1 and (tmp_path / "undo-tries").read_text().split() == [
        "1", "2", "3", "4"
    ]  # fmt: skip
    (tmp_path / "fixed").touch()
    last = txn("saga", "--resume", "stuck-1", cwd=tmp_path)
    assert last.returncode == 5, last.stderr
    assert [e["event"] for e in events(last.stdout)] == [
        "saga-resumed", "compensation-started", "compensation-done", "saga-compensated"
    ]  # fmt: skip
    assert not (tmp_path / "a").exists()
    # finished: resuming again changes nothing and says how it ended
    assert txn("saga", "--resume", "stuck-1", cwd=tmp_path).returncode == 5
    assert saga.saga_status(tmp_path / "txn")[0]["status"] == "compensated"


def test_exit_statuses_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "ok.toml").write_text('[[step]]\nname = "a"\nrun = "cat > got"\n')
    done = txn("saga", "ok.toml", "--data", "@data.json", cwd=tmp_path)
    assert done.returncode == 2 and "--data @data.json" in done.stderr
    (tmp_path / "data.json").write_text('{"order": 7}')
    done = txn("saga", "ok.toml", "--data", "@data.json", "--log", "logs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "got").read_text()) == {"order": 7}
    assert len(list((tmp_path / "logs" / "sagas").glob("*.jsonl"))) == 1
    done = txn("saga", "ok.toml", "--data", "-", "--id", "x", cwd=tmp_path, input='{"y": 1}')
    assert done.returncode == 0 and json.loads((tmp_path / "got").read_text()) == {"y": 1}
    dup = txn("saga", "ok.toml", "--id", "x", cwd=tmp_path)
    assert dup.returncode == 2 and "exists already" in dup.stderr
    for args, words in [
        (["ok.toml", "--data", "[1]"], "must be a JSON object"),
        (["ok.toml", "--data", "{nope"], "not valid JSON"),
        (["ok.toml", "--id", "../etc"], "invalid saga id"),
        (["--resume", "x", "ok.toml"], "no FILE"),
        ([], "missing FILE"),
        (["missing.toml"], "missing.toml"),
    ]:
        bad = txn("saga", *args, cwd=tmp_path)
        assert bad.returncode == 2, (args, bad.stderr)
        assert words in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    gone = txn("saga", "--resume", "nosuch", cwd=tmp_path)
    assert gone.returncode == 3 and "no saga 'nosuch'" in gone.stderr


def test_a_saga_run_by_one_process_cannot_be_resumed_by_another(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    text = f'[[step]]\nname = "wait"\nrun = "while [ ! -e {gate} ]; do sleep 0.01; done"\n'
    plan = sagafile.parse(text)
    run = saga.start(plan, {}, tmp_path / "log", saga_id="busy", cwd=str(tmp_path))
    thread = threading.Thread(target=run.run)
    thread.start()
    try:
        assert saga.saga_status(tmp_path / "log")[0]["active"] is True
        with pytest.raises(saga.SagaBusy):
            saga.resume(tmp_path / "log", "busy")
    finally:
        gate.touch()
        thread.join(10)
        run.close()
    assert saga.saga_status(tmp_path / "log")[0]["active"] is False
    assert saga.read_saga(tmp_path / "log", "busy").status == saga.COMPLETED
    with pytest.raises(NotFoundError):
        saga.read_saga(tmp_path / "log", "other")


def test_a_publish_step_sends_the_data_as_an_event(tmp_path: Path) -> None:
    from eda.core.pubsub import Subscriber

    sub = Subscriber(["orders.>"])
    endpoint = sub.bind("tcp://127.0.0.1:*")
    got: list[Any] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            if sub.poll(0.05):
                got.extend(sub.receive())

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        text = f"""
[[step]]
name = "note"
publish = "orders.confirmed"
connect = "{endpoint}"
timeout = 10
"""
        status, _, seen = run_text(
            tmp_path, text, {"order": 7}, saga_id="pub-1", reach=saga.Reach(mdns=False)
        )
    finally:
        stop.set()
        thread.join(10)
        sub.close(0)
    assert status == saga.COMPLETED, seen
    [batch] = got
    assert batch.topic == "orders.confirmed" and json.loads(batch.body) == {"order": 7}
    assert batch.extensions.values["sagaid"] == "pub-1"
    assert batch.extensions.values["sagastep"] == "note"
    # nobody to confirm it: a publish to a dead endpoint fails and is retried, then compensates
    dead = plan_of(
        Step("a", Action("run", "true"), Action("run", "touch undone")),
        Step("p", Action("publish", "x.y", 0.5, Retry(2, 0.0), ("tcp://127.0.0.1:9",))),
    )
    run = saga.start(dead, {}, tmp_path / "log2", cwd=str(tmp_path), reach=saga.Reach(mdns=False))
    with run:
        assert run.run() == saga.COMPENSATED
    assert "did not answer" in run.state.steps["p"].error
    assert (tmp_path / "undone").exists()


# -- crash recovery -------------------------------------------------------------------------------

ABORTING = """
[[step]]
name = "a"
run = "touch a.done"
compensate = "rm -f a.done"
[[step]]
name = "b"
run = "touch b.done"
compensate = 'if [ ! -e b.flaky ]; then touch b.flaky; exit 1; fi; rm -f b.done'
retry = { attempts = 3, backoff = 0 }
[[step]]
name = "c"
run = "touch c.tried; exit 1"
retry = { attempts = 2, backoff = 0 }
"""

COMPLETING = """
[[step]]
name = "a"
run = "touch a.done"
compensate = "rm -f a.done"
[[step]]
name = "p"
run = 'if [ ! -e p.flaky ]; then touch p.flaky; exit 1; fi; touch p.done'
retry = { attempts = 2, backoff = 0 }
pivot = true
[[step]]
name = "after"
run = 'if [ ! -e after.flaky ]; then touch after.flaky; exit 1; fi; touch after.done'
"""

ABORT_POINTS = [
    "after-saga-started", "after-step-started", "after-step-done", "after-step-failed",
    "after-saga-aborting", "after-compensation-started", "after-compensation",
    "after-compensation-failed", "after-saga-compensated",
]  # fmt: skip
COMPLETE_POINTS = [
    "after-saga-started", "after-step-started", "after-step-done", "after-step-failed",
    "after-saga-completed",
]  # fmt: skip


def test_killed_at_every_crash_point_resume_gives_the_same_outcome(tmp_path: Path) -> None:
    cases = [("abort", p, ABORTING) for p in ABORT_POINTS]
    cases += [("complete", p, COMPLETING) for p in COMPLETE_POINTS]
    cases += [("abort", "after-step-started@3", ABORTING)]
    assert {p for _, p, _ in cases} | {"after-saga-stuck", "after-saga-resumed"} >= {
        p.split("@")[0] for p in saga.CRASH_POINTS
    }
    dirs = []
    started = []
    for kind, point, text in cases:
        d = tmp_path / f"{kind}-{point.replace('@', '-')}"
        d.mkdir()
        (d / "s.toml").write_text(text)
        dirs.append(d)
        argv = [sys.executable, "-m", "eda.cli.txn", "saga", "s.toml", "--id", "s"]
        env = {**os.environ, "EDA_CRASH_AT": f"saga:{point}"}
        started.append(
            subprocess.Popen(
                argv, cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        )
    for proc, (kind, point, _) in zip(started, cases, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (kind, point, proc.returncode, err)
    # resume: the first resume of one case crashes again right after logging its resumption
    resuming = []
    for i, d in enumerate(dirs):
        env = {**os.environ}
        if i == 1:
            env["EDA_CRASH_AT"] = "saga:after-saga-resumed"
        argv = [sys.executable, "-m", "eda.cli.txn", "saga", "--resume", "s"]
        resuming.append(
            subprocess.Popen(
                argv, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    resumed = []
    for proc in resuming:
        out, err = proc.communicate(timeout=60)
        resumed.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert resumed[1].returncode == -signal.SIGKILL
    resumed[1] = txn("saga", "--resume", "s", cwd=dirs[1])
    for done, d, (kind, point, _) in zip(resumed, dirs, cases, strict=True):
        left = sorted(p.name for p in d.glob("*.done"))
        state = saga.read_saga(d / "txn", "s")
        if kind == "abort":
            assert done.returncode == 5, (point, done.stderr)
            assert left == [] and state.status == saga.COMPENSATED, (point, left)
            assert (d / "c.tried").exists()
        else:
            assert done.returncode == 0, (point, done.stderr)
            assert left == ["a.done", "after.done", "p.done"], (point, left)
        # each attempt number is used once: an idempotency key stays unique
        records = list(journal.read(d / "txn" / "sagas" / "s.jsonl"))
        tries = [(r["step"], r["attempt"]) for r in records if r["event"] == "step-started"]
        assert len(tries) == len(set(tries)), (point, tries)


@pytest.mark.parametrize("scenario", ["complete", "abort", "stuck", "group"])
def test_in_process_crash_at_each_point_and_occurrence_then_resume(
    tmp_path: Path, scenario: str
) -> None:
    plans = {
        "complete": (
            plan_of(
                step("a"),
                step("p", False, attempts=2, pivot=True),
                step("z", False, retriable=True),
            ),
            {("p", "action"): {1}, ("z", "action"): {1}},
        ),
        "abort": (
            plan_of(step("a"), step("b", comp_attempts=3), step("c", attempts=2)),
            {("c", "action"): {1, 2}, ("b", "compensate"): {1}},
        ),
        "stuck": (
            plan_of(step("a", comp_attempts=2), step("b")),
            {("b", "action"): {1}, ("a", "compensate"): set(range(1, 100))},
        ),
        "group": (
            plan_of(step("a"), step("g1", group="g"), step("g2", group="g"), step("g3", group="g")),
            # (always: a failed try that a crash cut off before its record is tried again)
            {("g2", "action"): set(range(1, 100))},
        ),
    }
    plan, fail = plans[scenario]
    # the points reached in a run without crash
    reference = World(fail)
    expected = drive(plan, reference, tmp_path / "ref")
    n_points = len(list(journal.read(saga.log_path(tmp_path / "ref", "s1"))))
    for crash_at in range(1, n_points + 1):
        world = World(fail)
        log = tmp_path / f"crash{crash_at}"
        crashed = drive(plan, world, log, crash_at=crash_at)
        # (a group's members race: a run may reach fewer points than the reference run)
        assert crashed is None or scenario == "group", crash_at
        outcome = drive(plan, world, log) if crashed is None else crashed
        if scenario == "stuck":
            assert outcome == saga.STUCK
            world.fail = {}
            outcome = drive(plan, world, log)
            assert outcome == saga.COMPENSATED
            assert world.applied == set()
            continue
        assert outcome == expected, crash_at
        assert world.applied == reference.applied, crash_at
        # the step that failed for good is never compensated
        assert not any(c[0] == "c" and c[1] == "compensate" for c in world.calls)


def test_a_torn_log_tail_is_cut_on_resume_and_damage_is_refused(tmp_path: Path) -> None:
    plan = plan_of(step("a"), step("b"))
    world = World()
    assert drive(plan, world, tmp_path, crash_at=3) is None  # after a's step-started
    path = saga.log_path(tmp_path, "s1")
    good = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"saga":"s1","event":"step-do')  # a record cut short by the crash
    run = saga.resume(tmp_path, "s1", runner=world)
    with run:
        assert run.repaired == len(b'{"saga":"s1","event":"step-do')
        assert run.run() == saga.COMPLETED
    assert path.read_bytes().startswith(good)
    assert all(json.loads(line) for line in path.read_text().splitlines())
    # damage before good records is not a torn tail: refused, nothing cut
    damaged = good.replace(b'"event":"step-started"', b'"event":"step-started"\x00garbage\n', 1)
    bad = saga.log_path(tmp_path, "s2")
    bad.write_bytes(damaged)
    with pytest.raises(journal.CorruptJournal, match="line"):
        saga.resume(tmp_path, "s2")
    assert bad.read_bytes() == damaged
    statuses = {s["id"]: s["status"] for s in saga.saga_status(tmp_path)}
    assert statuses == {"s1": "completed", "s2": "damaged"}
    # the CLI says so on one line
    d = tmp_path / "cli"
    (d / "txn" / "sagas").mkdir(parents=True)
    (d / "txn" / "sagas" / "s2.jsonl").write_bytes(damaged)
    done = txn("saga", "--resume", "s2", cwd=d)
    assert done.returncode == 1 and "bad record at line" in done.stderr


def test_a_resume_continues_retries_with_the_budget_left(tmp_path: Path) -> None:
    plan = plan_of(step("a", attempts=3), step("b"))
    world = World({("a", "action"): {1, 2, 3, 4}})
    # crash at the second step-failed record (points: started, a started, a failed, a started, a failed)
    assert drive(plan, world, tmp_path, crash_at=5) is None
    assert drive(plan, world, tmp_path) == saga.COMPENSATED
    assert world.counts[("a", "action")] == 3  # two before the crash, one after: 3 in all
    state = saga.read_saga(tmp_path, "s1")
    assert state.steps["a"].attempts == 3 and state.steps["a"].failures == 3


# -- hypothesis: a state machine of the executor ---------------------------------------------------


@st.composite
def saga_specs(draw: st.DrawFn) -> tuple[Plan, dict[tuple[str, str], set[int]]]:
    n = draw(st.integers(1, 5))
    pivot = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    steps: list[Step] = []
    fail: dict[tuple[str, str], set[int]] = {}
    for i in range(n):
        name = f"s{i}"
        is_pivot = pivot == i
        retriable = pivot is not None and i > pivot
        joins = (
            i > 0
            and not is_pivot
            and not steps[-1].pivot
            and steps[-1].retriable == retriable
            and draw(st.booleans())
        )
        group = None
        if joins:
            group = steps[-1].group or f"g{i}"
            steps[-1] = dataclasses.replace(steps[-1], group=group)
        attempts = draw(st.integers(1, 2))
        comp_attempts = draw(st.integers(1, 2))
        has_comp = not (is_pivot or retriable) and draw(st.integers(0, 3)) > 0
        steps.append(step(name, has_comp, attempts, group, is_pivot, retriable, comp_attempts))
        # failures of the first tries (counted over the saga's life, resumes included)
        fail[(name, "action")] = set(range(1, 1 + draw(st.integers(0, 3))))
        fail[(name, "compensate")] = set(range(1, 1 + draw(st.integers(0, 3))))
    return plan_of(*steps), fail


class SagaMachine(RuleBasedStateMachine):
    """Crash the executor anywhere, any number of times, resume; the outcome stays right."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.log = Path(self.tmp.name)
        self.outcome: str | None = None

    @initialize(
        spec=saga_specs(),
        seed=st.integers(0, 2**32 - 1),
        odds=st.sampled_from([0.1, 0.25, 0.5]),
    )
    def setup(
        self, spec: tuple[Plan, dict[tuple[str, str], set[int]]], seed: int, odds: float
    ) -> None:
        self.plan, fail = spec
        self.world = World(fail)
        self.crash_somewhere(seed, odds)

    @rule(seed=st.integers(0, 2**32 - 1), odds=st.sampled_from([0.1, 0.25, 0.5]))
    def crash_somewhere(self, seed: int, odds: float) -> None:
        """Run on, crashing at each crash point with these odds."""
        if self.outcome in saga.FINISHED:
            return
        crash_odds = (random.Random(seed), odds)
        self.outcome = drive(self.plan, self.world, self.log, crash_odds=crash_odds)
        event("crashed" if self.outcome is None else f"ran to {self.outcome}")

    @rule()
    def resume_stuck(self) -> None:
        """An operator resumes a stuck saga (the end is checked in teardown)."""
        if self.outcome == saga.STUCK:
            self.check_end()
            self.outcome = drive(self.plan, self.world, self.log)

    def check_end(self) -> None:
        world, plan = self.world, self.plan
        event(f"ended {self.outcome}")
        state = saga.read_saga(self.log, "s1")
        assert state.status == self.outcome
        comps = [c[0] for c in world.calls if c[1] == "compensate"]
        # only steps whose action succeeded are ever compensated, and never a retriable one
        assert set(comps) <= world.ever
        assert not any(plan.step(c).retriable or plan.step(c).pivot for c in comps)
        order = [s.name for s in plan.steps]
        distinct = list(dict.fromkeys(comps))
        assert distinct == sorted(distinct, key=order.index, reverse=True)
        if self.outcome == saga.COMPLETED:
            assert world.applied == set(order) and not comps
        elif self.outcome == saga.COMPENSATED:
            undone = {s.name for s in plan.steps if s.compensate is not None}
            assert not (world.applied & undone)
            assert not any(s.pivot and s.name in world.ever for s in plan.steps)
            failed = state.failed_step
            assert failed is not None and failed not in world.ever
        else:
            assert state.stuck_step in world.applied

    @invariant()
    def log_agrees_with_the_world(self) -> None:
        path = saga.log_path(self.log, "s1")
        if not hasattr(self, "world") or not path.exists():
            return
        state = saga.SagaState.from_records(journal.read(path))
        for name, st_ in state.steps.items():
            if st_.status == saga.DONE:
                assert name in self.world.applied
            if st_.status == saga.STEP_COMPENSATED:
                assert name not in self.world.applied

    def teardown(self) -> None:
        if hasattr(self, "world") and self.outcome not in saga.FINISHED:
            for _ in range(3):  # stuck sagas get fresh budgets; failures are finite
                self.outcome = drive(self.plan, self.world, self.log)
                self.check_end()
                if self.outcome in saga.FINISHED:
                    break
            self.world.fail = {}
            self.outcome = drive(self.plan, self.world, self.log)
            assert self.outcome in saga.FINISHED
            self.check_end()
        self.tmp.cleanup()


SagaMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_saga_state_machine = SagaMachine.TestCase


# -- the bank ------------------------------------------------------------------------------------

ACCOUNT_OP = r"""#!/bin/sh
# op.sh ACCOUNT DELTA: apply DELTA once per idempotency key, never below zero
account="accounts/$1"
key="$EDA_SAGA_ID.$EDA_STEP.$EDA_SAGA_PHASE"
exec 9>"$account.lock"
flock 9
if grep -q "^$key " "$account"; then exit 0; fi
[ -e "accounts/$1.closed" ] && [ "$2" -gt 0 ] && [ "$EDA_SAGA_PHASE" = action ] && { echo "account $1 closed" >&2; exit 1; }
balance=$(awk '{s += $2} END {print s + 0}' "$account")
if [ $((balance + $2)) -lt 0 ]; then echo "insufficient funds in $1" >&2; exit 1; fi
echo "$key $2" >> "$account"
"""

TRANSFER = """
[[step]]
name = "debit"
run = "./op.sh {src} -{amount}"
compensate = "./op.sh {src} {amount}"
retry = {{ attempts = 2, backoff = 0.01 }}
[[step]]
name = "credit"
run = "./op.sh {dst} {amount}"
pivot = true
[[step]]
name = "receipt"
run = 'echo "$EDA_SAGA_ID" >> receipts'
"""


def test_bank_transfers_keep_the_total_under_kills_and_resumes(tmp_path: Path) -> None:
    rng = random.Random(9)
    accounts = ["A", "B", "C", "D"]
    (tmp_path / "accounts").mkdir()
    for name in accounts:
        (tmp_path / "accounts" / name).write_text("initial 100\n")
    (tmp_path / "accounts" / "D.closed").touch()  # transfers to D fail and are compensated
    (tmp_path / "op.sh").write_text(ACCOUNT_OP)
    (tmp_path / "op.sh").chmod(0o755)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for i in range(16):
        src, dst = rng.sample(accounts[:3], 1)[0], rng.choice(accounts)
        if src == dst:
            dst = "D"
        amount = rng.choice([10, 40, 70, 120])
        (tmp_path / f"t{i}.toml").write_text(TRANSFER.format(src=src, dst=dst, amount=amount))
        env = dict(os.environ)
        if rng.random() < 0.4:  # some die at a crash point, others are killed at random below
            env["EDA_CRASH_AT"] = f"saga:{rng.choice(saga.CRASH_POINTS)}"
        argv = [sys.executable, "-m", "eda.cli.txn", "saga", f"t{i}.toml", "--id", f"t{i}"]
        procs.append((f"t{i}", subprocess.Popen(argv, cwd=tmp_path, env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))  # fmt: skip
    for _, proc in rng.sample(procs, 5):
        time.sleep(rng.random() * 0.15)
        proc.kill()
    for _, proc in procs:
        proc.wait(60)
    outcomes: dict[str, str] = {}
    for _ in range(5):  # resume whatever did not finish (a killed resume is resumed again)
        pending = [
            s["id"] for s in saga.saga_status(tmp_path / "txn") if s["status"] not in saga.FINISHED
        ]
        never = [sid for sid, _ in procs if not saga.log_path(tmp_path / "txn", sid).exists()
                 or not list(journal.read(saga.log_path(tmp_path / "txn", sid)))]  # fmt: skip
        for sid in never:  # killed before its first record: start it again
            saga.log_path(tmp_path / "txn", sid).unlink(missing_ok=True)
            txn("saga", f"{sid}.toml", "--id", sid, cwd=tmp_path)
        for sid in pending:
            txn("saga", "--resume", sid, cwd=tmp_path)
        if not pending and not never:
            break
    outcomes = {s["id"]: s["status"] for s in saga.saga_status(tmp_path / "txn")}
    assert len(outcomes) == 16 and set(outcomes.values()) <= set(saga.FINISHED), outcomes
    balances = {}
    for name in accounts:
        lines = (tmp_path / "accounts" / name).read_text().split("\n")[:-1]
        balances[name] = sum(int(line.split()[1]) for line in lines)
        keys = [line.split()[0] for line in lines]
        assert len(keys) == len(set(keys)), f"{name}: an operation applied twice"
    assert sum(balances.values()) == 400, balances
    assert min(balances.values()) >= 0, balances
    assert balances["D"] == 100  # closed: every transfer to it was compensated
    completed = [sid for sid, status in outcomes.items() if status == saga.COMPLETED]
    receipts = (tmp_path / "receipts").read_text().split() if completed else []
    assert sorted(set(receipts)) == sorted(completed)  # the retriable step ran for each
    assert {"completed", "compensated"} == set(outcomes.values())


def test_core_refuses_bad_data_and_ids(tmp_path: Path) -> None:
    plan = plan_of(step("a"))
    with pytest.raises(UsageError, match="JSON object"):
        saga.start(plan, [1], tmp_path)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="over"):
        saga.start(plan, {"x": "y" * (saga.MAX_DATA + 1)}, tmp_path)
    with pytest.raises(UsageError, match="invalid saga id"):
        saga.start(plan, {}, tmp_path, saga_id="a/b")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_the_saga_without_counting_a_failed_try_and_resume_finishes(
    procs: Any, tmp_path: Path
) -> None:
    wait = "[ -e go ] || { echo $$ > {name}.pid; exec sleep 30; }"
    (tmp_path / "s.toml").write_text(
        f"""
[[step]]
name = "left"
group = "g"
run = '{wait.replace("{name}", "left")}'
[[step]]
name = "right"
group = "g"
run = '{wait.replace("{name}", "right")}'
"""
    )
    in_tmp = ["sh", "-c", f'cd "{tmp_path}" && exec "$0" "$@"']  # (the saga's directory)
    proc = procs.start(
        [*in_tmp, sys.executable, "-m", "eda.cli.txn", "saga", "s.toml", "--id", "t"]
    )
    wait_until(lambda: (tmp_path / "left.pid").exists() and (tmp_path / "right.pid").exists())
    # a step's command starts while its start record is fsynced: wait for both records too
    wait_until(lambda: proc.stdout.count('"step-started"') == 2, 30, "both starts logged")
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 130
    assert "continue with eda-txn saga --resume t" in proc.stderr
    for name in ("left", "right"):  # the steps' processes are killed, not left running
        pid = int((tmp_path / f"{name}.pid").read_text())
        wait_until(lambda pid=pid: not _alive(pid), 5, f"{name} to be killed")
    logged = [e["event"] for e in events(proc.stdout)]
    assert "step-failed" not in logged and logged.count("step-started") == 2
    (tmp_path / "go").touch()
    done = txn("saga", "--resume", "t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tries = [(e["step"], e["attempt"]) for e in events(done.stdout) if e["event"] == "step-done"]
    assert sorted(tries) == [("left", 2), ("right", 2)]


def test_hostile_step_output_and_files(tmp_path: Path) -> None:
    text = """
[[step]]
name = "big"
run = 'head -c 400000 /dev/zero | tr "\\\\0" x | sed "s/^/{/"; head -c 300000 /dev/zero >&2'
[[step]]
name = "deep"
run = 'python3 -c "print(\\"{\\\\\\"a\\\\\\":\\" + \\"[\\" * 100000 + \\"]\\" * 100000 + \\"}\\")"'
[[step]]
name = "after"
run = "cat > after.in"
"""
    err: list[bytes] = []
    status, _, seen = run_text(tmp_path, text, {"k": 1}, on_stderr=lambda s, b: err.append(b))
    assert status == saga.COMPLETED, seen
    done = {e["step"]: e for e in seen if e["event"] == "step-done"}
    assert "not merged" in done["big"]["note"] and "output" not in done["big"]
    assert "not merged" in done["deep"]["note"]
    assert json.loads((tmp_path / "after.in").read_text()) == {"k": 1}
    assert sum(len(b) for b in err) == 300000  # stderr streamed through, none kept in memory
    # files: not UTF-8, too big, not TOML at all
    (tmp_path / "latin1.toml").write_bytes(b'[[step]]\nname = "caf\xe9"\n')
    with pytest.raises(SagaFileError, match=r"latin1.toml:2: not valid UTF-8"):
        sagafile.load(tmp_path / "latin1.toml")
    (tmp_path / "big.toml").write_bytes(b"#" * (sagafile.MAX_FILE + 1))
    with pytest.raises(SagaFileError, match="larger than"):
        sagafile.load(tmp_path / "big.toml")
    with pytest.raises(SagaFileError, match="No such file"):
        sagafile.load(tmp_path / "none.toml")
    # a key holding an escape sequence is shown escaped, never sent to the terminal as is
    with pytest.raises(SagaFileError) as caught:
        sagafile.parse('[[step]]\nname = "a"\nrun = "x"\n"\\u001b[2J" = 1\n', "e.toml")
    assert str(caught.value).startswith("e.toml:1: step 'a': key '\\x1b[2J': unknown key")


def test_a_closed_stdout_does_not_stop_the_saga(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[[step]]\nname = "a"\nrun = "true"\n[[step]]\nname = "b"\nrun = "touch b.done"\n'
    )
    cmd = f"{sys.executable} -m eda.cli.txn saga s.toml --id h | head -n 1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout)["event"] == "saga-started"
    assert (tmp_path / "b.done").exists()
    assert saga.read_saga(tmp_path / "txn", "h").status == saga.COMPLETED


def test_resume_needs_the_directory_the_saga_ran_in(tmp_path: Path) -> None:
    where = tmp_path / "shop"
    where.mkdir()
    plan = plan_of(step("a"), step("b"))
    run = saga.start(
        plan,
        {},
        tmp_path / "log",
        saga_id="s",
        cwd=str(where),
        crash_hook=_crash_at("after-step-started"),
    )
    with run, pytest.raises(Crashed):
        run.run()
    where.rmdir()
    with pytest.raises(saga.EdaError, match="which is gone"):
        saga.resume(tmp_path / "log", "s")
    where.mkdir()
    with saga.resume(tmp_path / "log", "s", runner=World()) as again:
        assert again.run() == saga.COMPLETED


def _crash_at(name: str) -> Any:
    def hook(point: str) -> None:
        if point == name:
            raise Crashed()

    return hook


TOML_VALUES = st.recursive(
    st.none().map(lambda _: "x")
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
STEP_TABLES = st.dictionaries(
    st.sampled_from([*sagafile.STEP_KEYS, "bogus", "retry.attempts"]),
    TOML_VALUES,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(
    top=st.dictionaries(
        st.sampled_from(["name", "timeout", "retry", "x"]), TOML_VALUES, max_size=3
    ),
    steps=st.lists(STEP_TABLES, max_size=4),
)
def test_any_toml_document_loads_or_gets_one_error_with_a_line(
    top: dict[str, Any], steps: list[dict[str, Any]]
) -> None:
    import tomli_w

    doc = dict(top)
    if steps:
        doc["step"] = steps
    text = tomli_w.dumps(doc)
    try:
        plan = sagafile.parse(text, "h.toml")
    except SagaFileError as exc:
        message = str(exc)
        assert message.startswith("h.toml:") and "\n" not in message
        line = message.split(":")[1]
        assert line.isdigit() and 1 <= int(line) <= max(1, text.count("\n")), message
    else:
        assert plan.steps and Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_loads_or_gets_a_saga_file_error(text: str) -> None:
    try:
        plan = sagafile.parse(text, "t.toml")
    except SagaFileError as exc:
        assert str(exc).startswith("t.toml:") and "\n" not in str(exc)
    else:
        assert plan.steps


def test_a_log_with_records_of_the_wrong_shape_is_refused_not_trusted(tmp_path: Path) -> None:
    plan = plan_of(step("a"))
    world = World()
    assert drive(plan, world, tmp_path, crash_at=2) is None
    path = saga.log_path(tmp_path, "s1")
    with path.open("a") as fh:
        fh.write('{"saga":"s1","event":"step-started","step":"a","attempt":"two"}\n')
    with pytest.raises(journal.CorruptJournal, match="not a saga log"):
        saga.resume(tmp_path, "s1")
    [summary] = saga.saga_status(tmp_path)
    assert summary["status"] == "damaged" and "two" in summary["error"]


def test_the_terminal_view_escapes_what_steps_print() -> None:
    from eda.cli.txnsaga import _saga_line

    line = _saga_line(
        {"time": "2026-11-28T01:02:03.456Z", "event": "step-failed", "step": "a\x1b[2J",
         "attempt": 2, "error": "exit 1: \x1b]0;owned\x07", "retry_in": 0.5}
    )  # fmt: skip
    assert "\x1b" not in line.plain and "\x07" not in line.plain
    assert line.plain.startswith("01:02:03.456 step-failed")
    assert "a\\x1b[2J try 2 exit 1: \\x1b]0;owned\\x07 (again in 0.5s)" in line.plain


# -- call steps through eda-lb -------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_call_step_goes_to_an_eda_lb_service_with_one_request_id_per_step(
    procs: Any, tmp_path: Path
) -> None:
    port = _free_port()
    # the service keeps each request under its id: a retry of the same step would overwrite
    service = f'cat > {tmp_path}/req.$EDA_REQUEST_ID; echo "{{\\"paid\\": \\"$EDA_REQUEST_ID\\"}}"'
    worker = procs.start(
        [sys.executable, "-m", "eda.cli.lb", "worker", "pay", "--no-mdns",
         "--bind", f"tcp://127.0.0.1:{port}", "--", "sh", "-c", service]
    )  # fmt: skip
    worker.wait_stderr("serving pay", 20)
    endpoint = f"tcp://127.0.0.1:{port}"
    text = f"""
[[step]]
name = "charge"
call = "pay"
connect = "{endpoint}"
compensate = {{ call = "pay", connect = "{endpoint}" }}
timeout = 10
[[step]]
name = "ship"
run = "cat > ship.in; exit 1"
"""
    status, _, seen = run_text(
        tmp_path, text, {"order": 7}, saga_id="c1", reach=saga.Reach(mdns=False)
    )
    assert status == saga.COMPENSATED, seen
    done = next(e for e in seen if e["event"] == "step-done")
    assert done["output"] == {"paid": "c1.charge.action.0"}
    assert json.loads((tmp_path / "req.c1.charge.action.0").read_text()) == {"order": 7}
    assert json.loads((tmp_path / "ship.in").read_text()) == {
        "order": 7,
        "paid": "c1.charge.action.0",
    }
    refund = json.loads((tmp_path / "req.c1.charge.compensate.0").read_text())
    assert refund == {"order": 7, "paid": "c1.charge.action.0"}
    # no live instance of the service: the try fails once the call times out
    dead = plan_of(
        Step("a", Action("call", "pay", 1.0, Retry(1, 0.0), (endpoint,))),
    )
    worker.kill()
    run = saga.start(dead, {}, tmp_path / "log2", cwd=str(tmp_path), reach=saga.Reach(mdns=False))
    with run:
        assert run.run() == saga.COMPENSATED
    assert "no live instance" in run.state.steps["a"].error


def test_without_eda_lb_call_steps_are_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eda.core.txn import sagaactions

    plan = sagafile.parse(
        '[[step]]\nname = "a"\nrun = "true"\n[[step]]\nname = "b"\ncall = "pay"\n'
    )
    saga.check_runnable(plan)  # eda-lb is here: fine
    monkeypatch.setattr(sagaactions, "_caller", lambda: None)
    with pytest.raises(UsageError, match="step 'b': call steps need eda-lb"):
        saga.check_runnable(plan)


def test_a_call_step_finds_the_service_by_mdns_from_the_cli(procs: Any, tmp_path: Path) -> None:
    worker = procs.start(
        [sys.executable, "-m", "eda.cli.lb", "worker", "stock", "--serverless", "--",
         "sh", "-c", 'jq -c "{reserved: .qty}"']
    )  # fmt: skip
    worker.wait_stderr("serving stock", 20)
    (tmp_path / "s.toml").write_text(  # (retries: an mDNS answer may be slow on a loaded box)
        '[[step]]\nname = "reserve"\ncall = "stock"\ntimeout = 10\n'
        "retry = { attempts = 3, backoff = 0.5 }\n"
    )
    done = txn("saga", "s.toml", "--serverless", "--data", '{"qty": 3}', "--id", "m1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    finished = [e for e in events(done.stdout) if e["event"] == "step-done"]
    assert [(e["step"], e["output"]) for e in finished] == [("reserve", {"reserved": 3})]
