"""eda-pub | eda-sub against mosquitto (broker and clients) and raw pyzmq, side by side.

Measurements (each with fresh processes):

* pipe throughput: a file of 100-byte lines through ``eda-pub`` into
  ``eda-sub --raw``, checked byte for byte, against ``mosquitto_pub -l`` into
  ``mosquitto_sub`` through a local broker, and against a minimal pyzmq
  PUB/SUB pair;
* the same with eda-sub printing CloudEvents JSON Lines;
* one-shot latency: ``eda-pub t msg`` with a subscriber running, against
  ``mosquitto_pub -m``;
* ``eda-pub --help`` start-up time against ``mosquitto_pub --help``;
* secure mode: the ``--raw`` pipe with ``--secure`` on both sides (CurveZMQ)
  against the same pipe without it (issue 17: ratio >= 0.6).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from harness import (
    BenchError,
    Mosquitto,
    Procs,
    Row,
    count_lines,
    eda_cmd,
    eda_env,
    median,
    row,
    scratch,
    tail,
    time_command,
    wait_exit,
    wait_for_text,
    wait_until,
)

FULL_LINES = 1_000_000
QUICK_LINES = 100_000
PIPE_ROUNDS = 3  # full runs: each pipe measurement is taken this many times, in turn
ONE_SHOTS = 10
HELP_RUNS = 10
LOOP_PUBLISHES = 1_000  # issue 20: a shell loop of one-shot publishes (QUICK_LOOP with --quick)
QUICK_LOOP = 50
SUB_HEAD_START = 3.0  # the issue: "a matching subscriber started 3 s earlier is running"
STALL = 5.0  # publisher done and no output for this long: the rest was lost
ANCHOR_PYZMQ = Path(__file__).with_name("pyzmq_anchor.py")
T = TypeVar("T")

MOSQ = "mosquitto"
PYZMQ = "raw pyzmq"


def run(quick: bool) -> list[Row]:
    lines = QUICK_LINES if quick else FULL_LINES
    rows: list[Row] = []
    with scratch("eda-bench-pubsub-") as tmp, Procs(tmp) as procs:
        data = make_input(tmp / "input.txt", lines)
        broker = Mosquitto(procs, tmp)

        def in_dir(name: str, measure: Callable[[Path], float]) -> Callable[[int], float]:
            def once(i: int) -> float:
                work = tmp / f"{name}-{i}"
                try:
                    return measure(work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)  # JSON output is ~250 MB
            return once

        pipes = interleave(1 if quick else PIPE_ROUNDS, [
            in_dir("mosq", lambda w: mosquitto_pipe(w, broker, data, lines)),
            in_dir("eda-raw", lambda w: eda_pipe(w, data, lines, raw=True)),
            in_dir("pyzmq", lambda w: pyzmq_pipe(w, data, lines)),
            in_dir("eda-json", lambda w: eda_pipe(w, data, lines, raw=False)),
            in_dir("eda-secure", lambda w: eda_pipe(w, data, lines, raw=True, secure=True)),
        ])
        (mosq, mosq_note), (raw, raw_note), (zmq_rate, zmq_note), (js, js_note), (sec, sec_note) = [
            (median(values) if values and not note else None, note) for values, note in pipes
        ]
        rate_unit = "lines/s"
        size = f"{lines // 1000}k lines"
        if not quick:
            size += f", median of {PIPE_ROUNDS}"
        rows.append(row(
            f"pipe throughput --raw ({size})", raw, MOSQ, mosq, rate_unit,
            higher_is_better=True, target="eda >= 2.0x mosquitto",
            ok=judge(raw_note, None if raw is None or mosq is None else raw >= 2.0 * mosq),
            note=join_notes(raw_note, mosq_note),
        ))
        rows.append(row(
            f"pipe throughput JSON Lines ({size})", js, MOSQ, mosq, rate_unit,
            higher_is_better=True, ok=judge(js_note), note=join_notes(js_note, mosq_note),
        ))
        rows.append(row(
            f"pipe throughput --raw ({size})", raw, PYZMQ, zmq_rate, rate_unit,
            higher_is_better=True, ok=judge(raw_note), note=join_notes(raw_note, zmq_note),
        ))

        rows.append(row(
            f"pipe throughput --raw --secure ({size})", sec, "eda insecure", raw, rate_unit,
            higher_is_better=True, target="secure >= 0.6x insecure",
            ok=judge(sec_note, None if sec is None or raw is None else sec >= 0.6 * raw),
            note=join_notes(sec_note, raw_note),
        ))

        (eda_lat, eda_note), (mosq_lat, mosq_lat_note) = one_shots(tmp / "oneshot", broker)
        note = join_notes(eda_note, mosq_lat_note)
        eda_med = median(eda_lat) * 1000 if eda_lat else None
        rows.append(row(
            f"one-shot eda-pub latency, median of {ONE_SHOTS}", eda_med,
            MOSQ, median(mosq_lat) * 1000 if mosq_lat else None, "ms",
            higher_is_better=False, target="<= 60 ms",
            ok=judge(eda_note, None if eda_med is None else eda_med <= 60), note=note,
        ))
        rows.append(row(
            f"one-shot eda-pub latency, max of {ONE_SHOTS}",
            max(eda_lat) * 1000 if eda_lat else None,
            MOSQ, max(mosq_lat) * 1000 if mosq_lat else None, "ms",
            higher_is_better=False, ok=judge(eda_note), note=note,
        ))

        (eda_help, help_note), (mosq_help, mosq_help_note) = help_times(tmp / "help")
        help_med = median(eda_help) * 1000 if eda_help else None
        rows.append(row(
            f"eda-pub --help, median of {HELP_RUNS}", help_med,
            MOSQ, median(mosq_help) * 1000 if mosq_help else None, "ms",
            higher_is_better=False, target="<= 40 ms",
            ok=judge(help_note, None if help_med is None else help_med <= 40),
            note=join_notes(help_note, mosq_help_note),
        ))

        (eda_version, version_note), (floor, floor_note) = version_times(tmp / "version")
        version_med = median(eda_version) * 1000 if eda_version else None
        rows.append(row(
            f"eda-pub --version, median of {HELP_RUNS}", version_med,
            "python -c pass", median(floor) * 1000 if floor else None, "ms",
            higher_is_better=False, target="<= 30 ms",
            ok=judge(version_note, None if version_med is None else version_med <= 30),
            note=join_notes(version_note, floor_note),
        ))

        loops = QUICK_LOOP if quick else LOOP_PUBLISHES
        (eda_loop, loop_note), (mosq_loop, mosq_loop_note) = publish_loops(
            tmp / "loop", broker, loops
        )
        rows.append(row(
            f"shell loop of {loops:,} one-shot publishes, total", eda_loop, MOSQ, mosq_loop, "s",
            higher_is_better=False, ok=judge(loop_note),
            note=join_notes(loop_note, mosq_loop_note),
        ))
    return rows


# -- helpers ------------------------------------------------------------------

def attempt(measure: Callable[[], T]) -> tuple[T | None, str]:
    """Run one measurement; a failure becomes (None, reason) instead of a value."""
    try:
        return measure(), ""
    except BenchError as exc:
        return None, str(exc)


Series = tuple[list[float], str]  # one value per run, and why the series stopped early


def interleave(runs: int, measures: list[Callable[[int], float]]) -> list[Series]:
    """Run the measures turn by turn, *runs* times, so that load from elsewhere on
    the machine hits every side alike; a side that fails stops, the others go on."""
    times: list[list[float]] = [[] for _ in measures]
    notes = ["" for _ in measures]
    for i in range(runs):
        for k, measure in enumerate(measures):
            if notes[k]:
                continue
            try:
                times[k].append(measure(i))
            except BenchError as exc:
                notes[k] = str(exc)
    return list(zip(times, notes, strict=True))


def judge(eda_failure: str, meets_target: bool | None = None) -> bool | None:
    """A row's ok: False when eda's run failed, else whether the target is met
    (None: no target, or it could not be measured)."""
    return False if eda_failure else meets_target


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def make_input(path: Path, lines: int) -> Path:
    """Deterministic lines of exactly 100 bytes (99 characters and a newline)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    pool = alphabet * 3
    with open(path, "w") as f:
        for i in range(lines):
            k = (i * 7919) % len(alphabet)
            f.write(f"{i:08d} {pool[k : k + 90]}\n")
    return path


def fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def wait_receiver(
    receiver: subprocess.Popen[bytes],
    sender: subprocess.Popen[bytes],
    out: Path,
    expected: int,
    timeout: float,
) -> None:
    """Wait for *receiver* to exit; fail early when the sender is done and output stalls."""
    deadline = time.monotonic() + timeout
    last_size, last_change = -1, time.monotonic()
    while receiver.poll() is None:
        now = time.monotonic()
        size = out.stat().st_size
        if size != last_size:
            last_size, last_change = size, now
        elif sender.poll() is not None and now - last_change > STALL:
            raise BenchError(
                f"lost lines: output has {count_lines(out)} of {expected} lines, "
                f"no more for {STALL:g}s after the sender exited {sender.returncode}"
            )
        if now > deadline:
            got = count_lines(out)
            raise BenchError(f"output has {got} of {expected} lines after {timeout:g}s")
        time.sleep(0.002)


def pipe_timeout(lines: int) -> float:
    return 30.0 + lines / 10_000


def check_identical(data: Path, out: Path, lines: int) -> None:
    if not filecmp.cmp(data, out, shallow=False):
        got = count_lines(out)
        what = "content differs" if got == lines else f"received {got} of {lines} lines"
        raise BenchError(f"output is not the input: {what}")


def check_json_lines(data: Path, out: Path, lines: int, topic: str) -> None:
    """Every line is there; a sample of them parse as events carrying the input line."""
    got = count_lines(out)
    if got != lines:
        raise BenchError(f"received {got} of {lines} events")
    step = max(1, lines // 1000)
    with open(data, "rb") as fin, open(out, "rb") as fout:
        for i, (line, event_line) in enumerate(zip(fin, fout, strict=True)):
            if i % step and i != lines - 1:
                continue
            try:
                event = json.loads(event_line)
            except ValueError as exc:
                raise BenchError(f"output line {i + 1} is not JSON: {exc}") from None
            if event.get("type") != topic or event.get("data") != line.decode().rstrip("\n"):
                raise BenchError(f"output line {i + 1} does not carry input line {i + 1}")


# -- pipe throughput ------------------------------------------------------------

def eda_pipe(work: Path, data: Path, lines: int, *, raw: bool, secure: bool = False) -> float:
    """eda-pub bench.x < file  ->  eda-sub 'bench.>' [--raw] -C N > out; lines/s.

    With *secure*, both run --secure as one identity that trusts itself."""
    fresh(work)
    out, sub_err, pub_err = work / "out", work / "sub.err", work / "pub.err"
    sub_args = [eda_cmd("eda-sub"), "bench.>", "-C", str(lines), "-v"]
    pub_args = [eda_cmd("eda-pub"), "bench.x"]
    if raw:
        sub_args.append("--raw")
    env = eda_env(work)
    if secure:
        keys_cmd = eda_cmd("eda-keys")
        key = subprocess.run([keys_cmd, "init"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        subprocess.run([keys_cmd, "trust", "self", key], env=env, check=True)
        sub_args.append("--secure")
        pub_args.append("--secure")
    with Procs(work, env) as procs:
        sub = procs.start(sub_args, stdout=out, stderr=sub_err)
        wait_for_text(sub_err, "announced as", 15.0, sub)
        start = time.perf_counter()
        pub = procs.start(pub_args, stdin=data, stderr=pub_err)
        wait_receiver(sub, pub, out, lines, pipe_timeout(lines))
        elapsed = time.perf_counter() - start
        wait_exit(pub, 30.0, "eda-pub")
    if sub.returncode != 0:
        raise BenchError(f"eda-sub exited {sub.returncode}: {tail(sub_err)}")
    if raw:
        check_identical(data, out, lines)
    else:
        check_json_lines(data, out, lines, "bench.x")
    return lines / elapsed


def mosquitto_pipe(work: Path, broker: Mosquitto, data: Path, lines: int) -> float:
    """mosquitto_pub -l < file  ->  broker  ->  mosquitto_sub -C N > out; lines/s."""
    fresh(work)
    out, err = work / "out", work / "err"
    client = f"benchsub{time.monotonic_ns()}"
    with Procs(work) as procs:
        sub = procs.start(
            ["mosquitto_sub", *broker.args(), "-i", client, "-q", "0", "-t", "bench/x",
             "-C", str(lines)],
            stdout=out, stderr=err,
        )
        broker.wait_subscribed(client, "bench/x")
        start = time.perf_counter()
        pub = procs.start(
            ["mosquitto_pub", *broker.args(), "-q", "0", "-t", "bench/x", "-l"],
            stdin=data, stderr=work / "pub.err",
        )
        wait_receiver(sub, pub, out, lines, pipe_timeout(lines))
        elapsed = time.perf_counter() - start
        wait_exit(pub, 30.0, "mosquitto_pub")
    if sub.returncode != 0:
        raise BenchError(f"mosquitto_sub exited {sub.returncode}: {tail(err)}")
    check_identical(data, out, lines)
    return lines / elapsed


def pyzmq_pipe(work: Path, data: Path, lines: int) -> float:
    """A minimal pyzmq XPUB -> SUB pair over tcp loopback, one message per line; lines/s."""
    fresh(work)
    out, err = work / "out", work / "sub.err"
    with Procs(work) as procs:
        sub = procs.start(
            [sys.executable, str(ANCHOR_PYZMQ), "sub", str(lines), str(out)], stderr=err
        )
        wait_for_text(err, "bound tcp://", 15.0, sub)
        endpoint = err.read_text().split()[1]
        start = time.perf_counter()
        pub = procs.start(
            [sys.executable, str(ANCHOR_PYZMQ), "pub", endpoint],
            stdin=data, stderr=work / "pub.err",
        )
        wait_until(out.exists, 15.0, "the pyzmq subscriber's output file")
        wait_receiver(sub, pub, out, lines, pipe_timeout(lines))
        elapsed = time.perf_counter() - start
        wait_exit(pub, 30.0, "pyzmq publisher")
    if sub.returncode != 0:
        raise BenchError(f"pyzmq subscriber exited {sub.returncode}: {tail(err)}")
    check_identical(data, out, lines)
    return lines / elapsed


# -- one-shot latency -------------------------------------------------------------

def one_shots(work: Path, broker: Mosquitto) -> list[Series]:
    """Wall time of each `eda-pub t msgN` (with an eda-sub that has been announced for
    3 s) and of each `mosquitto_pub -t t -m msgN` (with a mosquitto_sub), taken in turn.

    Both subscribers must print every message, in order; the eda discovery cache
    (a private XDG_CACHE_HOME) is shared by the runs, as it is for a user.
    """
    fresh(work)
    env = eda_env(work)
    eda_out, mosq_out = work / "eda-sub.out", work / "mosq-sub.out"
    messages = [f"msg{i}" for i in range(ONE_SHOTS)]
    with Procs(work, env) as procs:
        eda_sub, mosq_sub, eda_ready, mosq_ready = start_subscribers(
            procs, work, broker, ONE_SHOTS
        )

        def eda_pub(i: int) -> float:
            if eda_ready:
                raise BenchError(f"eda-sub not ready: {eda_ready}")
            return timed_ok([eda_cmd("eda-pub"), "t", messages[i]], work, env)

        def mosq_pub(i: int) -> float:
            if mosq_ready:
                raise BenchError(f"mosquitto_sub not subscribed: {mosq_ready}")
            return timed_ok(["mosquitto_pub", *broker.args(), "-t", "t", "-m", messages[i]], work)

        (eda_times, eda_note), (mosq_times, mosq_note) = interleave(ONE_SHOTS, [eda_pub, mosq_pub])
        if not eda_note:
            eda_note = check_printed(eda_sub, eda_out, messages, json_lines=True)
        if not mosq_note:
            mosq_note = check_printed(mosq_sub, mosq_out, messages, json_lines=False)
    return [(eda_times, eda_note), (mosq_times, mosq_note)]


def start_subscribers(
    procs: Procs, work: Path, broker: Mosquitto, count: int
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str, str]:
    """`eda-sub t -C count` (announced for SUB_HEAD_START s) and `mosquitto_sub -t t -C count`
    (subscribed), printing to eda-sub.out and mosq-sub.out in *work*; each with why it is
    not ready ('' when it is)."""
    eda_err = work / "eda-sub.err"
    client = f"bench{time.monotonic_ns()}"
    eda_sub = procs.start(
        [eda_cmd("eda-sub"), "t", "-v", "-C", str(count)],
        stdout=work / "eda-sub.out", stderr=eda_err,
    )  # fmt: skip
    mosq_sub = procs.start(
        ["mosquitto_sub", *broker.args(), "-i", client, "-t", "t", "-C", str(count)],
        stdout=work / "mosq-sub.out", stderr=work / "mosq-sub.err",
    )  # fmt: skip
    eda_ready = attempt(lambda: wait_for_text(eda_err, "announced as", 15.0, eda_sub))[1]
    mosq_ready = attempt(lambda: broker.wait_subscribed(client, "t"))[1]
    time.sleep(SUB_HEAD_START)
    return eda_sub, mosq_sub, eda_ready, mosq_ready


def timed_ok(
    args: list[str], work: Path, env: dict[str, str] | None = None, timeout: float = 30.0
) -> float:
    elapsed, code = time_command(args, work, env, timeout)
    if code != 0:
        raise BenchError(f"{Path(args[0]).name} exited {code}: {tail(work / 'timed.err')}")
    return elapsed


def check_printed(
    sub: subprocess.Popen[bytes], out: Path, messages: list[str], *, json_lines: bool
) -> str:
    """Why the subscriber did not print *messages* in order and exit, or ''."""
    try:
        wait_exit(sub, 5.0, "subscriber")
    except BenchError:
        return f"subscriber printed {count_lines(out)} of {len(messages)} events"
    lines = out.read_text().splitlines()
    try:
        printed = [json.loads(line)["data"] for line in lines] if json_lines else lines
    except (ValueError, KeyError, TypeError):
        return f"subscriber printed unexpected lines: {lines[:3]}"
    return "" if printed == messages else f"subscriber printed {printed}"


def publish_loops(work: Path, broker: Mosquitto, count: int) -> list[tuple[float | None, str]]:
    """Total wall time of a shell loop running `eda-pub t msgN` *count* times (an eda-sub
    announced 3 s earlier), then of the same loop with `mosquitto_pub` (a mosquitto_sub
    running); each subscriber must print all *count* events, in order."""
    fresh(work)
    env = eda_env(work)
    messages = [f"msg{i}" for i in range(count)]
    loop = 'for i in $(seq 0 $(($N - 1))); do "$@" "msg$i" || exit 1; done'
    eda_out, mosq_out = work / "eda-sub.out", work / "mosq-sub.out"
    results: list[tuple[float | None, str]] = []
    with Procs(work, env) as procs:
        eda_sub, mosq_sub, eda_ready, mosq_ready = start_subscribers(procs, work, broker, count)
        sides = [
            (eda_ready, [eda_cmd("eda-pub"), "t"], eda_sub, eda_out, True),
            (mosq_ready, ["mosquitto_pub", *broker.args(), "-t", "t", "-m"], mosq_sub,
             mosq_out, False),
        ]  # fmt: skip
        for not_ready, publish, sub, out, json_lines in sides:
            if not_ready:
                results.append((None, f"subscriber not ready: {not_ready}"))
                continue
            shell = ["sh", "-c", loop, "loop", *publish]
            elapsed, note = attempt(
                lambda shell=shell: timed_ok(  # type: ignore[misc]
                    shell, work, {**env, "N": str(count)}, timeout=count * 2.0 + 30
                )
            )
            if not note:
                note = check_printed(sub, out, messages, json_lines=json_lines)
            results.append((elapsed, note))
    return results


# -- start-up ---------------------------------------------------------------------

def version_times(work: Path) -> list[Series]:
    """Wall time of `eda-pub --version` and of the interpreter doing nothing (the floor:
    eda's own python), HELP_RUNS each, in turn."""
    fresh(work)
    env = eda_env(work)
    python = str(Path(eda_cmd("eda-pub")).with_name("python"))

    def eda_version(i: int) -> float:
        return timed_ok([eda_cmd("eda-pub"), "--version"], work, env)

    def floor(i: int) -> float:
        return timed_ok([python, "-c", "pass"], work, env)

    return interleave(HELP_RUNS, [eda_version, floor])


def help_times(work: Path) -> list[Series]:
    """Wall time of `eda-pub --help` and `mosquitto_pub --help`, HELP_RUNS each, in turn.

    mosquitto_pub --help exits 1, so only eda's exit status is checked.
    """
    fresh(work)
    env = eda_env(work)

    def eda_help(i: int) -> float:
        return timed_ok([eda_cmd("eda-pub"), "--help"], work, env)

    def mosq_help(i: int) -> float:
        return time_command(["mosquitto_pub", "--help"], work, env)[0]

    return interleave(HELP_RUNS, [eda_help, mosq_help])
