"""eda-registry under load: 1,000 instances heartbeating once per second.

Measurements (one registry, fresh processes, everything on 127.0.0.1):

* registry CPU, as % of one core, from /proc/<pid>/stat over a window in
  which a load generator (one separate process, 10 DEALER sockets) sends
  1,000 heartbeats per second for 1,000 registered instances in 50
  services; target < 25 %;
* ``lookup`` of one service (20 instances) under that load, p99 of the
  request/reply time seen by a client socket; target < 5 ms.  Anchor: the
  same registry's DNS interface answering ``SERVICE.service.eda A`` over UDP,
  measured the same way in the same run (no Consul or avahi in Debian's
  default install to compare with, so the anchor is the cheapest protocol
  the registry itself speaks);
* one-shot ``eda-registry lookup SERVICE --registry tcp://...`` median wall
  time (a whole process: interpreter start, request, JSON Lines out) against
  the registry still holding the 1,000 instances, the heartbeat load stopped
  (on 2 cores it would otherwise compete for the CPU); target < 150 ms.
  Anchor: ``dig @127.0.0.1 -p PORT SERVICE.service.eda A``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
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
    time_command,
    wait_for_text,
    wait_until,
)

INSTANCES = 1000
SERVICES = 50
ANCHOR_DNS = "registry DNS interface (UDP)"
ANCHOR_DIG = "dig (DNS interface)"

# The load generator: registers INSTANCES instances, then heartbeats each once a second.
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
while got < n:
    drain(1000)
print("ready", flush=True)
start = time.monotonic()
sent = 0
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * n)  # n heartbeats per second, spread evenly
    while sent < due:
        socks[sent % 10].send(msgs[sent % n]); sent += 1
    drain(2)
print(f"sent {sent} heartbeats in {seconds:g}s", flush=True)
"""


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
            if len(reply["instances"]) != INSTANCES // SERVICES:
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


def run(quick: bool) -> list[Row]:
    window = 5.0 if quick else 15.0
    lookups = 500 if quick else 2000
    one_shots = 5 if quick else 15
    with scratch("eda-bench-registry-") as work:
        env = eda_env(work)
        port, dns_port = free_port(), free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        with Procs(work, env) as procs:
            server = procs.start(
                [eda_cmd("eda-registry"), "serve", "--no-mdns", "--bind", endpoint,
                 "--dns", f"127.0.0.1:{dns_port}"],
                stderr=work / "serve.err",
            )
            wait_for_text(work / "serve.err", "listening on", 15, server)
            load = procs.start(
                [sys.executable, "-c", LOAD, endpoint, str(INSTANCES), str(SERVICES),
                 str(window * 2 + 10)],
                stdout=work / "load.out", stderr=work / "load.err",
            )
            wait_for_text(work / "load.out", "ready", 60, load)
            time.sleep(1.0)  # let the steady heartbeat rate settle before the CPU window opens
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            time.sleep(window)
            cpu = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0) * 100
            eda_lat = lookup_latencies(endpoint, lookups)
            dns_lat = dns_latencies(dns_port, lookups)
            if load.poll() is not None:
                raise BenchError("the load generator stopped early")
            load.kill()  # one-shot timings: 1,000 instances registered, no heartbeat storm
            load.wait()
            walls = []
            for _ in range(one_shots):
                wall, code = time_command(
                    [eda_cmd("eda-registry"), "lookup", "svc7", "--registry", endpoint], work, env
                )
                if code != 0:
                    raise BenchError(f"eda-registry lookup exited {code}")
                walls.append(wall)
            dig_walls: list[float] = []
            dig = shutil.which("dig")
            if dig:
                for _ in range(one_shots):
                    wall, code = time_command(
                        [dig, "@127.0.0.1", "-p", str(dns_port), "+short", "svc7.service.eda", "A"],
                        work, env,
                    )
                    if code != 0:
                        raise BenchError(f"dig exited {code}")
                    dig_walls.append(wall)
            wait_until(lambda: server.poll() is None, 1, "registry still running")
    eda_p99, dns_p99 = p99(eda_lat) * 1000, p99(dns_lat) * 1000
    one_shot = median(walls) * 1000
    dig_median = median(dig_walls) * 1000 if dig_walls else None
    return [
        row(f"registry CPU, {INSTANCES} instances x 1 heartbeat/s", cpu, "-", None, "% of a core",
            higher_is_better=False, target="< 25", ok=cpu < 25,
            note=f"/proc/<pid>/stat over {window:g}s"),
        row("lookup p99 under that load", eda_p99, ANCHOR_DNS, dns_p99, "ms",
            higher_is_better=False, target="< 5", ok=eda_p99 < 5,
            note=f"{lookups} lookups of a 20-instance service"),
        row("one-shot `eda-registry lookup` median wall", one_shot, ANCHOR_DIG, dig_median, "ms",
            higher_is_better=False, target="< 150", ok=one_shot < 150,
            note="registry given with --registry" + ("" if dig else "; dig not installed")),
    ]


if __name__ == "__main__":
    for item in run(quick="--quick" in sys.argv):
        print(json.dumps(item))
