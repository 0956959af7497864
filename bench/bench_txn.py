"""eda-txn two-phase commit: throughput with 16 transactions in flight, latency one at a time.

Setup (fresh processes, everything on 127.0.0.1, journals fsynced on the
disk of the temporary directory): ``eda-txn coordinator`` and three
``eda-txn participant --persistent`` whose agents are ten-line Python loops
voting yes and acknowledging at once, so the figures are eda-txn's own cost:
the request/reply hops, the journals and their fsyncs.

* committed transactions/s with 16 in flight (a client keeping 16 ``commit``
  requests outstanding over one socket); target >= 1,000/s.  Anchor: the rate
  of a loop appending one 150-byte record and fsyncing it, in the same
  directory -- what one fsync per transaction would allow at best;
* latency of one transaction at a time, p50 and p99; target p50 <= 5 ms.
  Anchor: two sequential write+fsync, the durable floor of a 2PC commit's
  critical path (the participant's vote, then the coordinator's decision);
* one-shot ``eda-txn commit -p stock,pay --coordinator tcp://...`` (issue 20: a
  shell loop's cost per transaction), median wall time of :data:`ONE_SHOTS` runs
  against the same daemons; target <= 80 ms.  Anchor, taken in turn with it: the
  same interpreter started to do three sequential write+fsync of a record in the
  same directory and exit -- the floor of any one-shot command that starts Python
  and waits for a 2PC commit's durable critical path (a participant's "preparing"
  mark, then its vote, then the coordinator's decision);
* fsyncs per transaction over the throughput run: the fsync(2) and
  fdatasync(2) system calls the kernel saw each daemon make, counted by
  ``perf stat`` on the syscall tracepoints (no overhead to speak of); the
  daemons' own counters (``stats``) are shown next to them and must agree.
  Without perf, the counters alone (the note says which).  The
  coordinator's alone (group commit: well under one) and all four daemons'.

Machine load moves every figure (2 cores shared with other jobs): the
fsync anchor is measured right before and right after the eda runs and
averaged, the ratio is against that, and the notes give the load average.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq
from bench_pubsub import interleave, timed_ok
from harness import (
    BenchError,
    Procs,
    Row,
    cpu_seconds,
    eda_cmd,
    eda_env,
    free_port,
    median,
    row,
    scratch,
    wait_for_text,
)

IN_FLIGHT = 16
ONE_SHOTS = 30  # eda-txn commit runs (and as many anchor runs, in turn); 10 with --quick
ONE_SHOT_PARTICIPANTS = ("stock", "pay")
FSYNCS = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for _ in range(3):
    os.write(fd, b'{"txn":"c1.00000000000000000","state":"prepared","time":1764290000.123}\n')
    os.fsync(fd)
"""
PARTICIPANTS = ("stock", "pay", "ship")
AGENT = r"""
import sys
out = sys.stdout
for line in sys.stdin:
    out.write('{"vote": "yes"}\n' if '"op": "prepare"' in line else '{"ok": true}\n')
    out.flush()
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Load:
    """A client of the coordinator keeping up to *in_flight* commits outstanding."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.rid = 0

    def _send(self) -> int:
        self.rid += 1
        msg = {"op": "commit", "participants": list(PARTICIPANTS), "data": {"order": self.rid},
               "rid": self.rid}  # fmt: skip
        self.sock.send(json.dumps(msg).encode())
        return self.rid

    def _reply(self) -> dict[str, object]:
        if not self.sock.poll(10_000):
            raise BenchError("no reply from the coordinator within 10 s")
        reply: dict[str, object] = json.loads(self.sock.recv())
        if reply.get("outcome") != "committed":
            raise BenchError(f"a transaction did not commit: {reply}")
        return reply

    def run(self, count: int, in_flight: int) -> float:
        """Seconds to commit *count* transactions with *in_flight* outstanding."""
        start = time.perf_counter()
        sent = done = 0
        while sent < min(in_flight, count):
            self._send()
            sent += 1
        while done < count:
            self._reply()
            done += 1
            if sent < count:
                self._send()
                sent += 1
        return time.perf_counter() - start

    def latencies(self, count: int) -> list[float]:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            self._send()
            self._reply()
            out.append(time.perf_counter() - start)
        return out

    def stats(self, endpoint: str) -> dict[str, object]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            sock.send(b'{"op": "stats", "rid": 1}')
            if not sock.poll(5000):
                raise BenchError(f"no stats from {endpoint}")
            reply: dict[str, object] = json.loads(sock.recv())
            return reply
        finally:
            sock.close()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def fsync_anchor(work: Path, count: int) -> tuple[float, float]:
    """(rate of write+fsync of one record, p50 of two sequential write+fsync) in *work*."""
    path = work / "anchor.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    record = b'{"txn":"c1.00000000000000000","state":"committed","participants":{}}' + b" " * 80
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, record + b"\n")
            os.fsync(fd)
        rate = count / (time.perf_counter() - start)
        pairs = []
        for _ in range(min(count, 500)):
            t0 = time.perf_counter()
            for _ in range(2):
                os.write(fd, record + b"\n")
                os.fsync(fd)
            pairs.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return rate, median(pairs)


def fsyncs(load: Load, endpoints: dict[str, str]) -> dict[str, int]:
    """The daemons' own fsync counters (``stats``)."""
    out = {}
    for name, endpoint in endpoints.items():
        value = load.stats(endpoint).get("fsyncs")
        if not isinstance(value, int):
            raise BenchError(f"{name} gave no fsync count")
        out[name] = value
    return out


EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"


class SyscallCount:
    """fsync(2)+fdatasync(2) calls of processes, counted by the kernel (``perf stat -p``)
    from :meth:`start` to :meth:`stop`; None where perf is missing or not allowed."""

    def __init__(self, pids: dict[str, int], work: Path) -> None:
        self.pids, self.work = pids, work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.why = ""

    def start(self) -> None:
        perf = shutil.which("perf")
        if perf is None:
            self.why = "perf not installed"
            return
        for name, pid in self.pids.items():
            out = self.work / f"perf-{name}.csv"
            self.procs[name] = subprocess.Popen(
                [perf, "stat", "-x,", "-e", EVENTS, "-p", str(pid), "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        time.sleep(0.5)  # perf attaches (its counters start then: before the measured run)

    def stop(self) -> dict[str, int] | None:
        counts: dict[str, int] = {}
        for name, proc in self.procs.items():
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            total = 0
            lines = (self.work / f"perf-{name}.csv").read_text().splitlines()
            for line in lines:
                fields = line.split(",")
                if len(fields) > 2 and fields[2].startswith("syscalls:"):
                    if not fields[0].isdigit():  # "<not supported>", "<not counted>"
                        self.why = f"perf cannot count {fields[2]}: {fields[0]}"
                        return None
                    total += int(fields[0])
            counts[name] = total
        return counts if self.procs else None


def one_shots(work: Path, env: dict[str, str], coordinator: str, runs: int) -> tuple[
    list[float], list[float]
]:
    """Wall times of *runs* one-shot ``eda-txn commit`` (each must commit) and of as many
    anchor runs (see the module's docstring), taken in turn."""
    python = str(Path(eda_cmd("eda-txn")).with_name("python"))
    script = work / "fsyncs.py"
    script.write_text(FSYNCS)
    anchor_file = str(work / "anchor-oneshot.jsonl")

    def commit(i: int) -> float:  # exit 0: committed
        return timed_ok(
            [eda_cmd("eda-txn"), "commit", "--json", "-p", ",".join(ONE_SHOT_PARTICIPANTS),
             "--coordinator", coordinator, "--data", json.dumps({"one_shot": i})],
            work, env,
        )  # fmt: skip

    def anchor(i: int) -> float:
        return timed_ok([python, str(script), anchor_file], work, env)

    (eda, eda_note), (floor, floor_note) = interleave(runs, [commit, anchor])
    if eda_note or floor_note:
        raise BenchError(eda_note or floor_note)
    return eda, floor


def run(quick: bool) -> list[Row]:
    count = 3000 if quick else 20000
    single = 300 if quick else 2000
    anchor_count = 2000 if quick else 5000
    with scratch("eda-bench-txn-") as work:
        env = eda_env(work)
        agent = work / "agent.py"
        agent.write_text(AGENT)
        log = str(work / "txn")
        endpoints = {
            name: f"tcp://127.0.0.1:{free_port()}" for name in ("coordinator", *PARTICIPANTS)
        }
        pids: dict[str, int] = {}
        with Procs(work, env) as procs:
            for name in PARTICIPANTS:
                err = work / f"{name}.err"
                proc = procs.start(
                    [eda_cmd("eda-txn"), "participant", name, "--no-mdns", "--log", log,
                     "--bind", endpoints[name], "--persistent", "--", sys.executable, str(agent)],
                    stderr=err,
                )  # fmt: skip
                wait_for_text(err, "listening on", 20, proc)
                pids[name] = proc.pid
            peers = [f"--peer={n}={endpoints[n]}" for n in PARTICIPANTS]
            err = work / "coordinator.err"
            coordinator = procs.start(
                [eda_cmd("eda-txn"), "coordinator", "--no-mdns", "--name", "c1", "--log", log,
                 "--bind", endpoints["coordinator"], *peers],
                stderr=err,
            )  # fmt: skip
            wait_for_text(err, "listening on", 20, coordinator)
            pids["coordinator"] = coordinator.pid
            load = Load(endpoints["coordinator"])
            load_before = os.getloadavg()[0]
            anchor_before = fsync_anchor(work, anchor_count)
            try:
                load.run(200, IN_FLIGHT)  # warm up: connections made, agents running
                lat = load.latencies(single)
                kernel = SyscallCount(pids, work)
                kernel.start()
                before = fsyncs(load, endpoints)
                cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}
                seconds = load.run(count, IN_FLIGHT)
                cpu = {n: cpu_seconds(p) - cpu_before[n] for n, p in pids.items()}
                after = fsyncs(load, endpoints)
                counted = kernel.stop()
                stats = load.stats(endpoints["coordinator"])
                shots, floor = one_shots(
                    work, env, endpoints["coordinator"], 10 if quick else ONE_SHOTS
                )
            finally:
                load.close()
            if coordinator.poll() is not None:
                raise BenchError("the coordinator exited")
            anchor_after = fsync_anchor(work, anchor_count)
            load_after = os.getloadavg()[0]
    anchor_rate = (anchor_before[0] + anchor_after[0]) / 2
    anchor_pair = (anchor_before[1] + anchor_after[1]) / 2
    rate = count / seconds
    p50, p99 = median(lat) * 1000, percentile(lat, 0.99) * 1000
    own = {n: after[n] - before[n] for n in endpoints}
    if counted is not None:
        measured, source = counted, "kernel (perf stat on fsync/fdatasync syscalls)"
        agree = ", ".join(f"{n} {counted[n]}/{own[n]}" for n in endpoints)
        source += f"; kernel/daemon counts: {agree}"
    else:
        measured, source = own, f"daemons' counters ({kernel.why})"
    coord_fsyncs = measured["coordinator"] / count
    all_fsyncs = sum(measured.values()) / count
    per = ", ".join(f"{n} {measured[n] / count:.2f}" for n in endpoints)
    where = (
        f"load avg {load_before:.1f} -> {load_after:.1f}; anchor {anchor_before[0]:.0f} and "
        f"{anchor_after[0]:.0f}/s before and after"
    )
    setup = f"3 --persistent participants, fsync'd journals; {count} transactions"
    cpu_note = ", ".join(f"{n} {cpu[n] * 1000 / count:.2f}" for n in endpoints)
    cpu_all = sum(cpu.values()) * 1000 / count
    shot, shot_floor = median(shots) * 1000, median(floor) * 1000
    return [
        row(f"2PC committed/s, {IN_FLIGHT} in flight", rate, "write+fsync loop (1 per txn)",
            anchor_rate, "txn/s", higher_is_better=True, target=">= 1000", ok=rate >= 1000,
            note=f"{setup}; {where}; CPU ms per transaction {cpu_all:.2f} (daemons: {cpu_note}, "
                 f"agents apart); coordinator stats {stats}"),
        row("2PC latency p50, one at a time", p50, "2 sequential write+fsync", anchor_pair * 1000,
            "ms", higher_is_better=False, target="<= 5", ok=p50 <= 5,
            note=f"{single} transactions; p99 {p99:.2f} ms; {where}"),
        row("2PC latency p99, one at a time", p99, "2 sequential write+fsync", anchor_pair * 1000,
            "ms", higher_is_better=False),
        row(f"eda-txn commit one-shot, 2 participants, median of {len(shots)}", shot,
            "python start + 3 sequential write+fsync", shot_floor, "ms", higher_is_better=False,
            target="<= 80", ok=shot <= 80,
            note=f"max {max(shots) * 1000:.0f} ms (anchor max {max(floor) * 1000:.0f} ms); "
                 f"--coordinator given, the daemons of the throughput run; {where}"),
        row("fsyncs per transaction, coordinator", coord_fsyncs, "-", None, "fsync/txn",
            higher_is_better=False, target="< 1", ok=coord_fsyncs < 1,
            note=f"all four daemons: {all_fsyncs:.2f} fsync/txn ({per}); counted by {source}"),
    ]  # fmt: skip


if __name__ == "__main__":
    for item in run(quick="--quick" in sys.argv):
        print(json.dumps(item))
