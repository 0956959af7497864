"""eda-registry under load: 1,000 instances heartbeating once per second, against etcd.

Two phases, one after the other, each system alone with its own load (fresh
processes, everything on 127.0.0.1 in the benchmark's network namespace):

* eda: ``eda-registry serve`` and a load generator (one separate process, 10
  DEALER sockets) that registers 1,000 instances in 50 services and sends
  1,000 heartbeats per second (each instance once a second, TTL 3 s);
* etcd (the anchor, etcd_anchor.py): a private single-member etcd and a load
  generator (one separate process, 50 HTTP connections to etcd's JSON gateway)
  that grants 1,000 leases, stores one record per lease under ``SERVICE/ID``
  in 50 services, and keeps every lease alive once a second.

The load keeps running through every timed measurement of its phase (CPU,
lookups, one-shot commands), so no instance or lease expires while it is
being looked up; the phase fails if its load generator stopped early.

Measurements:

* CPU, as % of one core, from /proc/<pid>/stat over a window under that load:
  the registry (target < 25 %) against etcd.  Both loads print how many
  requests were answered; etcd's CPU is scaled to the rate the registry
  answered (on a loaded machine etcd sustains fewer than the 1,000
  keep-alives a second it is offered), i.e. the ratio is of CPU per answered
  heartbeat / keep-alive;
* lookup of one service (20 instances) under that load, p99 of the
  request/reply time (target < 5 ms), against a range read of the 20-key
  prefix ``svc7/`` from etcd, and against the same registry's DNS interface
  answering ``svc7.service.eda A`` over UDP;
* one-shot ``eda-registry lookup svc7 --registry tcp://...`` median wall time
  (a whole process: interpreter start, request, JSON Lines out; each run must
  print the 20 instances; target < 150 ms), against ``etcdctl get --prefix
  svc7/`` (20 keys) and against ``dig @127.0.0.1 -p PORT svc7.service.eda A``
  (runs alternating with eda's).

Ratios are anchor/eda: above 1 means eda is better.  A missing etcd leaves the
anchor columns empty with the reason in the note; it never fails eda's rows.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import zmq
from etcd_anchor import LOAD as ETCD_LOAD
from etcd_anchor import TTL as ETCD_TTL
from etcd_anchor import Etcd, range_latencies
from harness import (
    BenchError,
    Procs,
    Row,
    cpu_percent,
    eda_cmd,
    eda_env,
    free_port,
    median,
    row,
    scratch,
    tail,
    time_command,
    wait_for_text,
    wait_until,
)

INSTANCES = 1000
SERVICES = 50
PER_SERVICE = INSTANCES // SERVICES
LOAD_BOUND = 600.0  # seconds: the most any load generator runs, whatever happens
ANCHOR_ETCD = "etcd 3.4, same load"
ANCHOR_RANGE = "etcd range read (JSON gateway)"
ANCHOR_ETCDCTL = "etcdctl get --prefix"
ANCHOR_DNS = "registry DNS interface (UDP)"
ANCHOR_DIG = "dig (DNS interface)"

# The load generator: registers INSTANCES instances, then heartbeats each once a second
# (for at most argv[4] seconds in all), printing ``answered COUNT`` every 0.25 s.
LOAD = r"""
import json, sys, time, zmq
endpoint, n, services, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context()
socks = []
for _ in range(10):
    s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect(endpoint); socks.append(s)
def record(i):
    return {"service": f"svc{i % services}", "id": f"inst{i}", "host": "127.0.0.1",
            "port": 10000 + i, "ttl": 3.0, "interval": 1.0, "meta": {"version": "2"}}
msgs = [json.dumps({"op": "heartbeat", "instance": record(i)}).encode() for i in range(n)]
for i in range(n):
    socks[i % 10].send(json.dumps({"op": "register", "instance": record(i), "rid": i}).encode())
got = 0
poller = zmq.Poller()
for s in socks: poller.register(s, zmq.POLLIN)
def drain(timeout_ms):
    global got
    for s, _ in poller.poll(timeout_ms):
        while True:
            try: s.recv(zmq.NOBLOCK); got += 1
            except zmq.Again: break
deadline = time.monotonic() + seconds  # bounded, whatever happens
while got < n:
    if time.monotonic() > deadline:
        sys.exit(f"only {got} of {n} registrations answered")
    drain(1000)
print("ready", flush=True)
start = last_report = time.monotonic()
sent = 0
while time.monotonic() < deadline:
    due = int((time.monotonic() - start) * n)  # n heartbeats per second, spread evenly
    while sent < due:
        socks[sent % 10].send(msgs[sent % n]); sent += 1
    drain(2)
    if time.monotonic() - last_report >= 0.25:
        last_report = time.monotonic()
        print(f"answered {got - n}", flush=True)  # heartbeats answered so far
print(f"sent {sent} heartbeats in {seconds:g}s", flush=True)
"""


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def lookup_latencies(endpoint: str, count: int) -> list[float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out = []
    try:
        for i in range(count):
            msg = json.dumps({"op": "lookup", "service": "svc7", "rid": i}).encode()
            start = time.perf_counter()
            sock.send(msg)
            if not sock.poll(2000):
                raise BenchError("lookup got no answer within 2 s")
            reply = json.loads(sock.recv())
            out.append(time.perf_counter() - start)
            if len(reply["instances"]) != PER_SERVICE:
                raise BenchError(f"lookup returned {len(reply['instances'])} instances")
            time.sleep(0.002)  # a client asking ~300 times a second, not a flood
    finally:
        sock.close()
        ctx.term()
    return out


def dns_latencies(port: int, count: int) -> list[float]:
    question = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    for label in ("svc7", "service", "eda"):
        question += bytes([len(label)]) + label.encode()
    question += b"\x00" + struct.pack("!HH", 1, 1)
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        for _ in range(count):
            start = time.perf_counter()
            udp.sendto(question, ("127.0.0.1", port))
            answer = udp.recv(4096)
            out.append(time.perf_counter() - start)
            if struct.unpack_from("!H", answer, 6)[0] != 1:  # 20 instances, one address
                raise BenchError("DNS answer without the expected A record")
            time.sleep(0.002)
    return out


def one_shot_walls(
    args: list[str], count: int, work: Path, env: dict[str, str], expect: tuple[str, int]
) -> list[float]:
    """Wall times of *count* runs of *args*; each must exit 0 and print *expect*[1]
    lines starting with *expect*[0] (the instances found), or BenchError."""
    out = work / "one-shot.out"
    prefix, lines = expect
    walls = []
    for _ in range(count):
        wall, code = time_command(args, work, env, stdout=out)
        name = Path(args[0]).name
        if code != 0:
            raise BenchError(f"{name} exited {code}: {tail(work / 'timed.err')}")
        got = sum(1 for line in out.read_text().splitlines() if line.startswith(prefix))
        if got != lines:
            raise BenchError(f"{name} printed {got} instances, not {lines}")
        walls.append(wall)
    return walls


def still_running(proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """BenchError unless the load generator *proc* is still keeping its instances alive."""
    if proc.poll() is not None:
        raise BenchError(f"{what} stopped during the timed phases: exit {proc.returncode}, "
                         f"{tail(log)}")


def answered(load_out: Path) -> int:
    """The last ``answered COUNT`` a load generator printed (0 before the first)."""
    for line in reversed(load_out.read_text().splitlines()):
        if line.startswith("answered "):
            return int(line.split()[1])
    return 0


def cpu_under_load(pid: int, load_out: Path, window: float) -> tuple[float, float]:
    """% of a core *pid* uses over *window* s, and the requests/s its load got answered."""
    before = answered(load_out)
    started = time.monotonic()
    cpu = cpu_percent(pid, window)
    return cpu, (answered(load_out) - before) / (time.monotonic() - started)


class Figures:
    """One system's measurements: CPU %, lookup latencies (s), one-shot walls (s).

    (A plain class: run.py loads the module without registering it, which
    dataclasses need.)
    """

    def __init__(self) -> None:
        self.cpu: float | None = None
        self.rate = 0.0  # heartbeats / keep-alives answered per second in the CPU window
        self.lookups: list[float] = []
        self.one_shots: list[float] = []
        self.failed = ""  # why the one-shot figure (or the whole anchor) is missing


class EdaFigures(Figures):
    """The registry's, plus its DNS interface's and dig's."""

    def __init__(self) -> None:
        super().__init__()
        self.dns: list[float] = []
        self.digs: list[float] = []
        self.dig_failed = ""


def measure_eda(work: Path, window: float, lookups: int, one_shots: int) -> EdaFigures:
    """The registry under its heartbeat load; the load keeps running through every timing."""
    env = eda_env(work)
    port, dns_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    eda = EdaFigures()
    with Procs(work, env) as procs:
        server = procs.start(
            [eda_cmd("eda-registry"), "serve", "--no-mdns", "--bind", endpoint,
             "--dns", f"127.0.0.1:{dns_port}"],
            stderr=work / "serve.err",
        )
        wait_for_text(work / "serve.err", "listening on", 15, server)
        load = procs.start(
            [sys.executable, "-c", LOAD, endpoint, str(INSTANCES), str(SERVICES),
             str(LOAD_BOUND)],
            stdout=work / "load.out", stderr=work / "load.err",
        )
        wait_for_text(work / "load.out", "ready", 60, load)
        time.sleep(1.0)  # let the steady heartbeat rate settle before the CPU window opens
        eda.cpu, eda.rate = cpu_under_load(server.pid, work / "load.out", window)
        eda.lookups = lookup_latencies(endpoint, lookups)
        eda.dns = dns_latencies(dns_port, lookups)
        still_running(load, work / "load.err", "the heartbeat load")
        lookup = [eda_cmd("eda-registry"), "lookup", "svc7", "--registry", endpoint]
        dig = shutil.which("dig")
        dig_args = [dig or "dig", "@127.0.0.1", "-p", str(dns_port), "+short",
                    "svc7.service.eda", "A"]
        eda.dig_failed = "" if dig else "dig not installed"
        # one-shots against the registry still under load, eda and dig in turn
        for _ in range(one_shots):
            try:
                if not eda.failed:
                    eda.one_shots += one_shot_walls(lookup, 1, work, env, ("{", PER_SERVICE))
            except BenchError as exc:
                still_running(load, work / "load.err", "the heartbeat load")
                eda.failed = str(exc)
            try:
                if not eda.dig_failed:
                    eda.digs += one_shot_walls(dig_args, 1, work, env, ("127.0.0.1", 1))
            except BenchError as exc:
                eda.dig_failed = str(exc)
        still_running(load, work / "load.err", "the heartbeat load")
        wait_until(lambda: server.poll() is None, 1, "registry still running")
    return eda


def measure_etcd(work: Path, window: float, lookups: int, one_shots: int) -> Figures:
    """The anchor: a private etcd with the same load shape, kept alive through every timing."""
    etcd = Figures()
    try:
        etcdctl = shutil.which("etcdctl")
        with Procs(work) as procs:
            server = Etcd(procs, work)
            load = procs.start(
                [sys.executable, "-c", ETCD_LOAD, str(server.port), str(INSTANCES),
                 str(SERVICES), str(LOAD_BOUND), str(ETCD_TTL)],
                stdout=work / "etcd-load.out", stderr=work / "etcd-load.err",
            )
            wait_for_text(work / "etcd-load.out", "ready", 120, load)
            time.sleep(1.0)  # the same settling as the registry's
            etcd.cpu, etcd.rate = cpu_under_load(server.proc.pid, work / "etcd-load.out", window)
            etcd.lookups = range_latencies(server.port, "svc7/", PER_SERVICE, lookups)
            still_running(load, work / "etcd-load.err", "the etcd keep-alive load")
            if etcdctl is None:
                etcd.failed = "etcdctl not installed (etcd-client)"
            else:
                env = {**os.environ, "ETCDCTL_API": "3"}
                args = [etcdctl, "--endpoints", server.endpoint, "get", "--prefix", "svc7/"]
                etcd.one_shots = one_shot_walls(args, one_shots, work, env, ("svc7/", PER_SERVICE))
            still_running(load, work / "etcd-load.err", "the etcd keep-alive load")
    except BenchError as exc:
        etcd.failed = f"etcd anchor: {exc}"
    return etcd


def run(quick: bool) -> list[Row]:
    window = 5.0 if quick else 15.0
    lookups = 500 if quick else 2000
    one_shots = 5 if quick else 15
    with scratch("eda-bench-registry-") as work:
        (work / "eda").mkdir()
        (work / "etcd-anchor").mkdir()
        eda = measure_eda(work / "eda", window, lookups, one_shots)
        etcd = measure_etcd(work / "etcd-anchor", window, lookups, one_shots)
    assert eda.cpu is not None
    eda_p99, dns_p99 = p99(eda.lookups) * 1000, p99(eda.dns) * 1000
    etcd_p99 = p99(etcd.lookups) * 1000 if etcd.lookups else None
    one_shot = median(eda.one_shots) * 1000 if not eda.failed else None
    etcdctl = median(etcd.one_shots) * 1000 if etcd.one_shots else None
    dig = median(eda.digs) * 1000 if not eda.dig_failed else None
    why = f"; {etcd.failed}" if etcd.failed else ""
    # etcd's CPU for as many answered requests a second as the registry answered: on a
    # loaded machine etcd may sustain fewer keep-alives than the 1,000/s it is offered
    etcd_cpu = etcd.cpu * eda.rate / etcd.rate if etcd.cpu is not None and etcd.rate else None
    return [
        row(f"registry CPU, {INSTANCES} instances x 1 heartbeat/s", eda.cpu, ANCHOR_ETCD,
            etcd_cpu, "% of a core", higher_is_better=False, target="< 25", ok=eda.cpu < 25,
            note=f"/proc/<pid>/stat over {window:g}s; answered per second: heartbeats "
            f"{eda.rate:.0f}, etcd keep-alives {etcd.rate:.0f} ({INSTANCES} leases); etcd "
            f"used {etcd.cpu or 0:.1f} %, scaled to the heartbeats' rate{why}"),
        row("lookup p99 under that load", eda_p99, ANCHOR_RANGE, etcd_p99, "ms",
            higher_is_better=False, target="< 5", ok=eda_p99 < 5,
            note=f"{lookups} lookups of a 20-instance service; etcd: range reads of "
            f"a 20-key prefix{why}"),
        row("lookup p99 under that load, vs DNS", eda_p99, ANCHOR_DNS, dns_p99, "ms",
            higher_is_better=False, note="the same lookups; the registry's own cheapest protocol"),
        row("one-shot `eda-registry lookup` median wall", one_shot, ANCHOR_ETCDCTL, etcdctl, "ms",
            higher_is_better=False, target="< 150", ok=one_shot is not None and one_shot < 150,
            note="registry given with --registry, heartbeat load running"
            + (f"; {eda.failed}" if eda.failed else "") + why),
        row("one-shot `eda-registry lookup`, vs dig", one_shot, ANCHOR_DIG, dig, "ms",
            higher_is_better=False, target="<= 40", ok=one_shot is not None and one_shot <= 40,
            note="runs alternate with eda's" + (f"; {eda.dig_failed}" if eda.dig_failed else "")),
    ]


if __name__ == "__main__":
    for item in run(quick="--quick" in sys.argv):
        print(json.dumps(item))
