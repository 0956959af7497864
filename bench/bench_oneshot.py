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

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness
from bench_pubsub import attempt, fresh, interleave, join_notes, judge, timed_ok
from harness import BenchError, Procs, Row, eda_cmd, eda_env, free_port, median, row, scratch

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
        harness.wait_for_text(err, "serving echo", 20, worker)
        harness.wait_for_text(work / "server.out", "serving", 20, server)
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
        profile_runs = QUICK_PROFILE_RUNS if quick else PROFILE_RUNS
        figures, failed = attempt(lambda: profile(tmp / "profile", profile_runs, not quick))
        if figures is not None:
            rows += profile_rows(figures, profile_runs)
        else:
            rows.append(row("profile of the one-shot commands", None, FLOOR, None, "ms",
                            higher_is_better=False, ok=False, note=failed))  # fmt: skip
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


# -- profile: where a one-shot command's wall time goes --------------------------------------

PROFILE_RUNS = 10
QUICK_PROFILE_RUNS = 3
AGENT = 'import sys\nfor line in sys.stdin:\n    print(\'{"vote": "yes"}\' if \'"prepare"\' in line else \'{"ok": true}\', flush=True)\n'  # noqa: E501
# the column order of the profile table (see oneshot_phases.py for the marks)
PHASE_NAMES = (
    "start", "imports", "parse", "to connect", "round trips", "exit", "wall", "cpu",
)  # fmt: skip
PACKAGES = ("zmq", "click", "zeroconf", "rich", "eda")  # import time owners, else stdlib


def profile_commands(work: Path, procs: Procs, env: dict[str, str]) -> dict[str, list[str]]:
    """Start what the five one-shot commands talk to; their argv (label -> argv)."""
    lb, reg, coord = free_port(), free_port(), free_port()
    parts = {"stock": free_port(), "pay": free_port()}
    log = str(work / "txn")
    (work / "agent.py").write_text(AGENT)
    starts = [
        ([eda_cmd("eda-lb"), "worker", "echo", "--no-mdns", "--persistent",
          "--bind", f"tcp://127.0.0.1:{lb}", "--", "cat"], "worker", "serving echo"),
        ([eda_cmd("eda-registry"), "serve", "--no-mdns", "--bind", f"tcp://127.0.0.1:{reg}"],
         "registry", "listening on"),
        *(([eda_cmd("eda-txn"), "participant", name, "--no-mdns", "--log", log, "--bind",
            f"tcp://127.0.0.1:{port}", "--persistent", "--", sys.executable,
            str(work / "agent.py")], name, "listening on") for name, port in parts.items()),
        ([eda_cmd("eda-sub"), "t", "-v", "-C", "1000000"], "sub", "announced as"),
        ([eda_cmd("eda-bus"), "serve", "--data", str(work / "bus"), "--fsync", "batch"],
         "bus", "serving"),
    ]  # fmt: skip
    for args, name, ready in starts:
        proc = procs.start(args, stderr=work / f"{name}.err", stdout=work / f"{name}.out")
        harness.wait_for_text(work / f"{name}.err", ready, 20, proc)
    coordinator = procs.start(
        [eda_cmd("eda-txn"), "coordinator", "--no-mdns", "--name", "c1", "--log", log,
         "--bind", f"tcp://127.0.0.1:{coord}",
         *(f"--peer={name}=tcp://127.0.0.1:{port}" for name, port in parts.items())],
        stderr=work / "coordinator.err",
    )  # fmt: skip
    harness.wait_for_text(work / "coordinator.err", "listening on", 20, coordinator)
    procs.start(
        [eda_cmd("eda-registry"), "register", "svc7", "--port", "9000", "--host", "127.0.0.1",
         "--registry", f"tcp://127.0.0.1:{reg}"],
        stderr=work / "register.err",
    )  # fmt: skip
    commands = {
        "eda-lb call": [eda_cmd("eda-lb"), "call", "echo", "hello", "--no-mdns",
                        "--connect", f"tcp://127.0.0.1:{lb}"],
        "eda-registry lookup": [eda_cmd("eda-registry"), "lookup", "svc7",
                                "--registry", f"tcp://127.0.0.1:{reg}"],
        "eda-txn commit": [eda_cmd("eda-txn"), "commit", "--json", "-p", "stock,pay",
                           "--coordinator", f"tcp://127.0.0.1:{coord}"],
        "eda-pub t msg": [eda_cmd("eda-pub"), "t", "msg"],
        "eda-pub --bus --confirm": [eda_cmd("eda-pub"), "--bus", "--confirm", "t", "msg"],
    }  # fmt: skip
    deadline = time.monotonic() + 20  # the instance registered (lookup exits 3 before)
    while run_measured(commands["eda-registry lookup"], work, env)[2] != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"svc7 not registered: {harness.tail(work / 'register.err')}")
        time.sleep(0.2)
    return commands


def run_measured(args: list[str], work: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Run *args* (stdout to /dev/null, stderr to timed.err): wall s, CPU s (user +
    system), exit status."""
    with open(work / "timed.err", "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def import_split(report: str) -> tuple[list[str], dict[str, float]]:
    """From ``-X importtime`` output: the modules imported at top level (in order), and
    seconds of import per owner (a module's time goes to the nearest of PACKAGES that
    imported it, directly or not: what importing that package costs; else stdlib)."""
    rows = []
    for line in report.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if found:
            rows.append((int(found[1]), (len(found[3]) - 1) // 2, found[4]))
    owners: dict[str, float] = {}
    stack: list[tuple[int, str]] = []
    for self_us, depth, name in reversed(rows):  # parents come after their children
        while stack and stack[-1][0] >= depth:
            stack.pop()
        top = name.split(".")[0]
        above = stack[-1][1] if stack else "stdlib"
        owner = above if above not in ("stdlib", "eda") else top if top in PACKAGES else above
        stack.append((depth, owner))
        owners[owner] = owners.get(owner, 0.0) + self_us / 1e6
    top_level = [name for _, depth, name in rows if depth == 0]
    return top_level, owners


def profile(work: Path, runs: int, count: bool = True) -> dict[str, dict[str, float]]:
    """Median milliseconds of each phase of each one-shot command (PHASE_NAMES, then
    ``import NAME`` per owner), interleaved with the interpreter alone; with *count*
    and valgrind installed, the instructions of each part too (``Mi PART``: minutes
    on a loaded machine, so not in --quick runs)."""
    fresh(work)
    env = eda_env(work)
    python = str(Path(eda_cmd("eda-pub")).with_name("python"))
    driver = str(Path(__file__).resolve().with_name("oneshot_phases.py"))
    result: dict[str, dict[str, float]] = {}
    with Procs(work, env) as procs:
        commands = profile_commands(work, procs, env)
        samples: dict[str, dict[str, list[float]]] = {label: {} for label in commands}
        modules: dict[str, Path] = {}
        for label, args in commands.items():  # warm: caches filled, module lists known
            if run_measured(args, work, env)[2] != 0:
                raise BenchError(f"{label} failed: {harness.tail(work / 'timed.err')}")
            proc = subprocess.run(
                [python, "-X", "importtime", *args], env=env, cwd=work,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
            )  # fmt: skip
            top, _ = import_split(proc.stderr)
            modules[label] = work / f"modules-{len(modules)}.txt"
            modules[label].write_text("\n".join(m for m in top if m != "eda.cli.launch"))
        floor_wall: list[float] = []
        floor_cpu: list[float] = []
        for _ in range(runs):
            wall, cpu, _code = run_measured([python, "-c", "pass"], work, env)
            floor_wall.append(wall)
            floor_cpu.append(cpu)
            for label, args in commands.items():
                got = samples[label]
                wall, cpu, code = run_measured(args, work, env)
                if code != 0:
                    raise BenchError(f"{label} exited {code}: {harness.tail(work / 'timed.err')}")
                got.setdefault("wall", []).append(wall)
                got.setdefault("cpu", []).append(cpu)
                marks_file = work / "marks.json"
                marks_file.unlink(missing_ok=True)
                program = Path(args[0]).name
                wall, _cpu, code = run_measured(
                    [python, driver, str(marks_file), str(modules[label]), program, *args[1:]],
                    work, env,
                )  # fmt: skip
                if code != 0:
                    raise BenchError(f"{label} (observed) exited {code}")
                for phase, value in phases(json.loads(marks_file.read_text()), wall).items():
                    got.setdefault(phase, []).append(value)
                proc = subprocess.run(
                    [python, "-X", "importtime", *args], env=env, cwd=work,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
                )  # fmt: skip
                for owner, seconds in import_split(proc.stderr)[1].items():
                    got.setdefault(f"import {owner}", []).append(seconds)
        for label, got in samples.items():
            result[label] = {k: median(v) * 1000 for k, v in got.items()}
            result[label]["python -c pass"] = median(floor_wall) * 1000
            result[label]["python -c pass cpu"] = median(floor_cpu) * 1000
        if count and shutil.which("valgrind"):
            for label, split in instruction_split(work, commands, env, modules).items():
                result[label].update({f"Mi {part}": value for part, value in split.items()})
    return result


def instructions(args: list[str], work: Path, env: dict[str, str]) -> float:
    """Millions of instructions *args* executes (valgrind's callgrind): unlike times, the
    same on a loaded machine."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *args],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        check=False, timeout=600,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise BenchError(f"valgrind: {proc.stderr[-300:]}")
    return int(found[1]) / 1e6


def instruction_split(work: Path, commands: dict[str, list[str]], env: dict[str, str],
                      modules: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Millions of instructions per part of each command: the interpreter's start, import
    zmq, import click (after zmq), the other imports (eda and the standard library),
    and the rest (parsing, the command's work, its exit), every part ending in os._exit
    as the one-shot commands do (no teardown)."""
    python = str(Path(eda_cmd("eda-pub")).with_name("python"))

    def importing(names: str) -> float:
        return instructions([python, "-c", f"import os{names}; os._exit(0)"], work, env)

    start = importing("")
    with_zmq = importing(", zmq")
    with_click = importing(", zmq, click")
    split = {}
    for label, args in commands.items():
        everything = importing(", zmq, click, " + ", ".join(modules[label].read_text().split()))
        whole = instructions(args, work, env)
        split[label] = {
            "start": start, "zmq": with_zmq - start, "click": with_click - with_zmq,
            "other imports": everything - with_click, "rest": whole - everything, "total": whole,
        }  # fmt: skip
    return split


def phases(marks: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per phase from oneshot_phases.py's *marks* and the process's *wall* time."""
    end = marks["exit"]
    connect = marks.get("connect", end)
    last = marks.get("recv", marks.get("send", connect))
    return {
        "start": wall - end,  # the interpreter's start (and the exit after os._exit)
        "imports": marks["imported"],
        "parse": marks.get("parsed", marks["imported"]) - marks["imported"],
        "to connect": connect - marks.get("parsed", marks["imported"]),
        "round trips": last - connect,
        "exit": end - last,
    }


def profile_rows(result: dict[str, dict[str, float]], runs: int) -> list[Row]:
    """One row per command: its plain wall median, the phases in the note."""
    rows = []
    for label, got in result.items():
        owners = sorted((k for k in got if k.startswith("import ")), key=lambda k: -got[k])
        note = ", ".join(
            [f"{name} {got[name]:.1f}" for name in PHASE_NAMES[:6]]
            + [f"{k} {got[k]:.1f}" for k in owners]
            + [f"CPU {got['cpu']:.1f} (python -c pass {got['python -c pass cpu']:.1f})"]
            + [f"{k[3:]} {got[k]:.0f} M instructions" for k in got if k.startswith("Mi ")]
        )
        rows.append(row(
            f"profile of one-shot {label}, medians of {runs} (ms)", got["wall"],
            FLOOR, got["python -c pass"], "ms", higher_is_better=False, note=note,
        ))  # fmt: skip
    return rows


def profile_table(result: dict[str, dict[str, float]]) -> str:
    """The profile as the README's markdown table."""
    owners = [f"import {p}" for p in (*PACKAGES, "stdlib")]
    head = ["command", *PHASE_NAMES, "python -c pass",
            *(o.replace("import ", "imp. ") for o in owners)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, got in result.items():
        cells = [f"{got.get(k, 0.0):.1f}" for k in (*PHASE_NAMES, "python -c pass", *owners)]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    parts = ("start", "zmq", "click", "other imports", "rest", "total")
    if all(f"Mi {p}" in got for got in result.values() for p in parts):
        lines += ["", "| command (millions of instructions) | " + " | ".join(parts) + " |",
                  "|" + "---|" * (len(parts) + 1)]  # fmt: skip
        for label, got in result.items():
            total = got["Mi total"]
            cells = [f"{got[f'Mi {p}']:.0f} ({got[f'Mi {p}'] / total:.0%})" for p in parts[:-1]]
            lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {total:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/bench_oneshot.py [RUNS]: the profile table alone
    with scratch("bench-oneshot-profile") as tmp:
        figures = profile(tmp / "profile", int(sys.argv[1]) if sys.argv[1:] else PROFILE_RUNS)
    print(f"load {os.getloadavg()[0]:.1f}")
    print(profile_table(figures))
