"""One-shot commands as shell loops and scripts run them (issue 20), each against its anchor.

Rows (every process fresh, as installed, everything on 127.0.0.1):

* ``eda-lb call echo hello --connect tcp://...`` to a running ``eda-lb worker echo
  --persistent -- cat``: median wall time, target <= 60 ms.  Anchor: the same round
  trip as the shortest pyzmq program does it (``python -c`` importing zmq, a REQ
  socket, one request to a raw pyzmq REP echo server started alongside).
* ``eda-X --help`` of every program, and of one subcommand of each program with
  subcommands (the text is printed without importing click: cli/launch.py),
  target <= 40 ms; ``eda-X --version`` of every program, target <= 30 ms.
  Anchor, taken in turn with them: the interpreter doing nothing (``python -c
  pass``, eda's own python), the floor.

(one-shot ``eda-pub``, ``eda-pub --help`` against ``mosquitto_pub --help`` and the
shell loop of publishes are in bench_pubsub.py, one-shot ``eda-registry lookup``
in bench_registry.py, one-shot ``eda-pub --bus --confirm`` in bench_bus.py,
one-shot ``eda-txn commit`` in bench_txn.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_pubsub import attempt, fresh, interleave, join_notes, judge, timed_ok
from harness import Procs, Row, eda_cmd, eda_env, free_port, median, row, scratch, wait_for_text

RUNS = 20
QUICK_RUNS = 5
FLOOR = "python -c pass"
ANCHOR_CALL = "python -c pyzmq REQ round trip"

# a raw pyzmq echo server (REP), and the shortest client a user would write (REQ)
ECHO_SERVER = r"""
import sys, zmq
sock = zmq.Context().socket(zmq.REP)
sock.bind(sys.argv[1])
print("serving", flush=True)
while True:
    sock.send(sock.recv())
"""
ECHO_CLIENT = r"""
import sys, zmq
sock = zmq.Context().socket(zmq.REQ)
sock.connect(sys.argv[1])
sock.send(sys.argv[2].encode())
sys.stdout.write(sock.recv().decode() + "\n")
"""

PROGRAMS = ["eda-pub", "eda-sub", "eda-registry", "eda-bus", "eda-lb", "eda-txn", "eda-keys"]
# every program's --help, and one subcommand's of each program that has subcommands
HELPS = [[p] for p in PROGRAMS] + [
    ["eda-registry", "lookup"], ["eda-bus", "stats"], ["eda-lb", "call"], ["eda-txn", "commit"],
    ["eda-keys", "trust"],
]  # fmt: skip
VERSIONS = [[p, "--version"] for p in PROGRAMS]


def calls(work: Path, runs: int) -> list[tuple[list[float], str]]:
    """Wall times of one-shot `eda-lb call` to a running worker, and of the pyzmq anchor
    to a raw echo server, taken in turn."""
    fresh(work)
    env = eda_env(work)
    with Procs(work, env) as procs:
        port, raw = free_port(), free_port()
        err = work / "worker.err"
        worker = procs.start(
            [eda_cmd("eda-lb"), "worker", "echo", "--no-mdns", "--persistent",
             "--bind", f"tcp://127.0.0.1:{port}", "--", "cat"],
            stderr=err,
        )  # fmt: skip
        server = procs.start(
            [sys.executable, "-c", ECHO_SERVER, f"tcp://127.0.0.1:{raw}"],
            stdout=work / "server.out",
        )
        wait_for_text(err, "serving echo", 20, worker)
        wait_for_text(work / "server.out", "serving", 20, server)
        call = [eda_cmd("eda-lb"), "call", "echo", "hello", "--no-mdns",
                "--connect", f"tcp://127.0.0.1:{port}"]  # fmt: skip
        anchor = [sys.executable, "-c", ECHO_CLIENT, f"tcp://127.0.0.1:{raw}", "hello"]
        return interleave(
            runs, [lambda i: timed_ok(call, work, env), lambda i: timed_ok(anchor, work, env)]
        )


def startups(work: Path, runs: int, commands: list[list[str]]) -> list[tuple[list[float], str]]:
    """Wall times of each of *commands* (``eda-X ARGS``) and of `python -c pass` (eda's own
    interpreter: the floor), in turn."""
    fresh(work)
    env = eda_env(work)
    measures = [
        (lambda args: lambda i: timed_ok([eda_cmd(args[0]), *args[1:]], work, env))(a)
        for a in commands
    ]
    floor = [str(Path(eda_cmd("eda-pub")).with_name("python")), "-c", "pass"]
    return interleave(runs, [*measures, lambda i: timed_ok(floor, work, env)])


def run(quick: bool) -> list[Row]:
    runs = QUICK_RUNS if quick else RUNS
    rows: list[Row] = []
    with scratch("bench-oneshot") as tmp:
        series, failed = attempt(lambda: calls(tmp / "call", runs))
        (eda_times, eda_note), (anchor_times, anchor_note) = series or [([], failed)] * 2
        eda_med = median(eda_times) * 1000 if eda_times else None
        rows.append(row(
            f"one-shot eda-lb call to a running worker, median of {runs}", eda_med,
            ANCHOR_CALL, median(anchor_times) * 1000 if anchor_times else None, "ms",
            higher_is_better=False, target="<= 60 ms",
            ok=judge(eda_note, None if eda_med is None else eda_med <= 60),
            note=join_notes(eda_note, anchor_note),
        ))  # fmt: skip
        for name, commands, target in (
            ("help", [[*h, "--help"] for h in HELPS], 40),
            ("version", VERSIONS, 30),
        ):
            rows += startup_rows(tmp / name, runs, commands, target)
    return rows


def startup_rows(work: Path, runs: int, commands: list[list[str]], target: float) -> list[Row]:
    """One row per command of *commands*, median wall time against the floor's."""
    series, failed = attempt(lambda: startups(work, runs, commands))
    measured = series or [([], failed)] * (len(commands) + 1)
    floor_times, floor_note = measured[-1]
    floor = median(floor_times) * 1000 if floor_times else None
    rows = []
    for args, (times, note) in zip(commands, measured[:-1], strict=True):
        med = median(times) * 1000 if times else None
        rows.append(row(
            f"{' '.join(args)}, median of {runs}", med, FLOOR, floor, "ms",
            higher_is_better=False, target=f"<= {target:g} ms",
            ok=judge(note, None if med is None else med <= target),
            note=join_notes(note, floor_note),
        ))  # fmt: skip
    return rows
