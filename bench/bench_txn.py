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
* fsyncs per transaction, from the daemons' own counters (``stats``): the
  coordinator's alone (group commit: well under one) and all four journals'.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import zmq
from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    free_port,
    median,
    row,
    scratch,
    wait_for_text,
)

IN_FLIGHT = 16
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
    out = {}
    for name, endpoint in endpoints.items():
        value = load.stats(endpoint).get("fsyncs")
        if not isinstance(value, int):
            raise BenchError(f"{name} gave no fsync count")
        out[name] = value
    return out


def run(quick: bool) -> list[Row]:
    count = 3000 if quick else 20000
    single = 300 if quick else 2000
    with scratch("eda-bench-txn-") as work:
        env = eda_env(work)
        agent = work / "agent.py"
        agent.write_text(AGENT)
        log = str(work / "txn")
        endpoints = {
            name: f"tcp://127.0.0.1:{free_port()}" for name in ("coordinator", *PARTICIPANTS)
        }
        with Procs(work, env) as procs:
            for name in PARTICIPANTS:
                err = work / f"{name}.err"
                proc = procs.start(
                    [eda_cmd("eda-txn"), "participant", name, "--no-mdns", "--log", log,
                     "--bind", endpoints[name], "--persistent", "--", sys.executable, str(agent)],
                    stderr=err,
                )  # fmt: skip
                wait_for_text(err, "listening on", 20, proc)
            peers = [f"--peer={n}={endpoints[n]}" for n in PARTICIPANTS]
            err = work / "coordinator.err"
            coordinator = procs.start(
                [eda_cmd("eda-txn"), "coordinator", "--no-mdns", "--name", "c1", "--log", log,
                 "--bind", endpoints["coordinator"], *peers],
                stderr=err,
            )  # fmt: skip
            wait_for_text(err, "listening on", 20, coordinator)
            load = Load(endpoints["coordinator"])
            try:
                load.run(200, IN_FLIGHT)  # warm up: connections made, agents running
                lat = load.latencies(single)
                before = fsyncs(load, endpoints)
                seconds = load.run(count, IN_FLIGHT)
                after = fsyncs(load, endpoints)
                stats = load.stats(endpoints["coordinator"])
            finally:
                load.close()
            if coordinator.poll() is not None:
                raise BenchError("the coordinator exited")
        anchor_rate, anchor_pair = fsync_anchor(work, 2000 if quick else 5000)
    rate = count / seconds
    p50, p99 = median(lat) * 1000, percentile(lat, 0.99) * 1000
    coord_fsyncs = (after["coordinator"] - before["coordinator"]) / count
    all_fsyncs = sum(after[n] - before[n] for n in endpoints) / count
    setup = f"3 --persistent participants, fsync'd journals; {count} transactions"
    return [
        row(f"2PC committed/s, {IN_FLIGHT} in flight", rate, "write+fsync loop (1 per txn)",
            anchor_rate, "txn/s", higher_is_better=True, target=">= 1000", ok=rate >= 1000,
            note=f"{setup}; coordinator stats {stats}"),
        row("2PC latency p50, one at a time", p50, "2 sequential write+fsync", anchor_pair * 1000,
            "ms", higher_is_better=False, target="<= 5", ok=p50 <= 5,
            note=f"{single} transactions; p99 {p99:.2f} ms"),
        row("2PC latency p99, one at a time", p99, "2 sequential write+fsync", anchor_pair * 1000,
            "ms", higher_is_better=False),
        row("fsyncs per transaction, coordinator", coord_fsyncs, "-", None, "fsync/txn",
            higher_is_better=False, target="< 1", ok=coord_fsyncs < 1,
            note=f"all four journals: {all_fsyncs:.2f} fsync/txn (each participant syncs "
                 "its vote and its commit, grouped per batch)"),
    ]  # fmt: skip


if __name__ == "__main__":
    for item in run(quick="--quick" in sys.argv):
        print(json.dumps(item))
