"""eda-lb's TCP mode against HAProxy configured by hand, in the same run.

Two nginx backends (nginx-light, private configuration, one worker each, on
127.0.0.1, answering ``GET /`` with a 2-byte body that names them) are
registered as service ``web`` in a private ``eda-registry serve``.  The same
``wrk`` load (Debian's wrk 4.1: 2 threads, 64 connections, bounded duration)
goes through each proxy in turn, with keep-alive and with a new connection per
request (``-H 'Connection: close'``):

* the anchor: ``haproxy -db -f anchor.cfg``, a hand-written TCP frontend and
  roundrobin backend with the two servers (``check``), HAProxy's defaults;
* ``eda-lb tcp --listen 127.0.0.1:P web`` (the built-in proxy), following the
  registry; target >= 0.8x the anchor's requests/s with keep-alive, >= 0.5x
  with a connection per request;
* ``eda-lb tcp --engine haproxy`` (HAProxy as the data plane, configured and
  updated by eda-lb); target >= 0.95x in both;
* :class:`HaproxyEngine` started by this process with the two servers (the
  data plane without the CLI and the registry): no target, it tells a slow
  engine row apart from a slow configuration.

Runs alternate between the proxies, each round in a rotated order, so that
load from elsewhere hits them alike; full runs take 3 rounds of 5 s per proxy
and mode (``--quick``: 2 of 2 s).  The table shows the median figures; the
ratio is the median over rounds of each run's ratio to the anchor's run of
the same round (a machine shared with other work drifts between rounds).  p99 latency rows
(wrk ``--latency``) have no target.  A proxy is measured only after a request
through it returned each backend's body; a run whose socket errors or non-2xx
answers exceed 1 % of its requests fails its row.

Last, "within a second of a registry change": with ``eda-lb tcp --engine
haproxy`` running, a third backend is registered (and then deregistered) in
the registry by a request from this process; the time from the registry's
reply to the change in HAProxy's runtime state (``show servers state`` on the
admin socket of eda-lb's haproxy, found as its child process) is measured, 5
times each way (median, max); target: max < 1 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    free_port,
    row,
    scratch,
    tail,
    wait_exit,
    wait_for_text,
    wait_until,
)

ANCHOR = "haproxy (hand-configured)"
SERVICE = "web"
WRK_THREADS, WRK_CONNECTIONS = 2, 64
TARGETS = {  # (proxy, mode) -> minimum requests/s ratio to the anchor
    ("builtin", "keep-alive"): 0.8,
    ("builtin", "close"): 0.5,
    ("engine", "keep-alive"): 0.95,
    ("engine", "close"): 0.95,
}
LABELS = {
    "builtin": "eda-lb tcp (built-in)",
    "engine": "eda-lb tcp --engine haproxy",
    "inproc": "HaproxyEngine in-process",
}
MODES = {"keep-alive": [], "close": ["-H", "Connection: close"]}


# -- backends and proxies ----------------------------------------------------------------------


def start_nginx(procs: Procs, work: Path, name: str) -> int:
    """An nginx (one worker, no daemon) on 127.0.0.1 answering every request with *name*."""
    prefix = work / f"nginx-{name}"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process on;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n"
        + "".join(
            f"  {kind}_temp_path {prefix}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"  server {{\n    listen 127.0.0.1:{port};\n    default_type text/plain;\n"
        f'    location / {{ return 200 "{name}\\n"; }}\n  }}\n}}\n'
    )
    log = prefix / "stderr.log"
    proc = procs.start(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stderr=log,
    )
    wait_until(lambda: _alive(proc, log, "nginx") and bodies(port, 1) == {name}, 10, "nginx")
    return port


def _alive(proc: object, log: Path, what: str) -> bool:
    code = proc.poll()  # type: ignore[attr-defined]
    if code is not None:
        raise BenchError(f"{what} exited {code}: {tail(log)}")
    return True


def http_get(port: int) -> str | None:
    """The body of ``GET /`` through 127.0.0.1:*port*, or None if that failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    return body.decode(errors="replace").strip()


def bodies(port: int, tries: int) -> set[str]:
    return {b for b in (http_get(port) for _ in range(tries)) if b}


def wait_serving(port: int, proc: object, log: Path, what: str, timeout: float = 30.0) -> None:
    """Wait until requests through *port* reach both backends."""
    wait_until(
        lambda: _alive(proc, log, what) and bodies(port, 4) == {"A", "B"},
        timeout,
        f"{what} to serve both backends",
        step=0.1,
    )


def anchor_config(work: Path, port: int, backends: list[int]) -> Path:
    conf = work / "anchor.cfg"
    conf.write_text(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
        "    timeout server 60s\n\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\n"
        "backend be\n    balance roundrobin\n"
        + "".join(f"    server s{i} 127.0.0.1:{p} check\n" for i, p in enumerate(backends))
    )
    return conf


# -- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk(procs: Procs, work: Path, port: int, mode: str, seconds: int) -> tuple[float, float, str]:
    """(requests/s, p99 ms, note) of one wrk run; BenchError if it failed or erred > 1 %."""
    out, err = work / "wrk.out", work / "wrk.err"
    proc = procs.start(
        ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency",
         "--timeout", "5s", *MODES[mode], f"http://127.0.0.1:{port}/"],
        stdout=out, stderr=err,
    )  # fmt: skip
    code = wait_exit(proc, seconds + 30, "wrk")
    text = out.read_text(errors="replace")
    if code != 0:
        raise BenchError(f"wrk exited {code}: {tail(err)}")
    rate = re.search(r"Requests/sec:\s*([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    total = re.search(r"(\d+) requests in", text)
    if not (rate and p99 and total):
        raise BenchError(f"cannot read wrk's output: {text[-200:]!r}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    bad = errors + (int(non2xx.group(1)) if non2xx else 0)
    requests = int(total.group(1))
    if requests == 0 or bad > requests * 0.01:
        raise BenchError(f"{bad} errors in {requests} requests")
    note = f"{bad} socket errors/non-2xx" if bad else ""
    return float(rate.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)], note


# -- eda-lb's haproxy, seen through its admin socket ----------------------------------------------


def haproxy_socket_of(parent: int) -> Path | None:
    """The Runtime API socket of the haproxy child of process *parent*, if it runs."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = re.search(r"^PPid:\s*(\d+)", status, re.M)
        if ppid and int(ppid.group(1)) == parent and b"-f" in argv:
            cfg = Path(os.fsdecode(argv[argv.index(b"-f") + 1]))
            if Path(os.fsdecode(argv[0])).name == "haproxy":
                return cfg.parent / "admin.sock"
    return None


def runtime_command(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def server_states(path: Path) -> dict[int, tuple[int, int]]:
    """port -> (operational state, admin state) of every server HAProxy has."""
    found = {}
    for line in runtime_command(path, "show servers state").splitlines():
        f = line.split()
        if len(f) > 18 and f[0].isdigit():
            found[int(f[18])] = (int(f[5]), int(f[6]))
    return found


def time_until(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    start = time.perf_counter()
    wait_until(cond, timeout, "haproxy's runtime state to change", step=0.002)
    return time.perf_counter() - start


def registry_change_latency(
    sock: Path, registry: str, port: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Seconds from the registry's reply to (register) a running server / (deregister) none."""
    from eda.core.registry.client import Client

    client = Client([registry], use_mdns=False, timeout=2.0)
    record = {"service": SERVICE, "id": "bench-c", "host": "127.0.0.1", "port": port,
              "ttl": 3600.0, "interval": 1200.0}  # fmt: skip
    added, removed = [], []
    try:
        for _ in range(rounds):
            client.request({"op": "register", "instance": record})
            added.append(time_until(lambda: server_states(sock).get(port) == (2, 0)))
            client.request({"op": "deregister", "id": "bench-c"})
            removed.append(time_until(lambda: server_states(sock).get(port, (0, 1))[1] & 1 == 1))
    finally:
        client.close()
    return added, removed


# -- the run -----------------------------------------------------------------------------------


def run(quick: bool) -> list[Row]:
    for tool, package in (("nginx", "nginx-light"), ("wrk", "wrk"), ("haproxy", "haproxy")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: run bench/setup.sh (Debian package {package})")
    seconds = 2 if quick else 5
    rounds = 2 if quick else 3
    from eda.core.lb.haproxy import HaproxyEngine, Server

    results: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    failed: dict[str, str] = {}
    notes: dict[tuple[str, str], list[str]] = {}
    change: tuple[list[float], list[float]] | None = None
    change_error = ""
    with scratch("eda-bench-lbtcp-") as work:
        env = eda_env(work)
        with Procs(work, env) as procs:
            nginx = {name: start_nginx(procs, work, name) for name in ("A", "B", "C")}
            backends = [nginx["A"], nginx["B"]]

            reg_port = free_port()
            registry = f"tcp://127.0.0.1:{reg_port}"
            reg = procs.start(
                [eda_cmd("eda-registry"), "serve", "--no-mdns", "--bind", registry],
                stderr=work / "registry.err",
            )
            wait_for_text(work / "registry.err", "listening on", 15, reg)
            for name in ("A", "B"):
                procs.start(
                    [eda_cmd("eda-registry"), "register", SERVICE, "--port", str(nginx[name]),
                     "--host", "127.0.0.1", "--id", f"bench-{name.lower()}",
                     "--registry", registry, "--no-mdns"],
                    stderr=work / f"register-{name}.err",
                )  # fmt: skip

            ports: dict[str, int] = {}
            ports["anchor"] = free_port()
            anchor = procs.start(
                ["haproxy", "-db", "-f", str(anchor_config(work, ports["anchor"], backends))],
                stderr=work / "anchor.err",
            )
            wait_serving(ports["anchor"], anchor, work / "anchor.err", "anchor haproxy")

            lb_procs = {}
            for proxy, extra in (("builtin", []), ("engine", ["--engine", "haproxy"])):
                ports[proxy] = free_port()
                log = work / f"{proxy}.err"
                proc = procs.start(
                    [eda_cmd("eda-lb"), "tcp", "--listen", f"127.0.0.1:{ports[proxy]}", SERVICE,
                     *extra, "--registry", registry, "--no-mdns"],
                    stderr=log,
                )  # fmt: skip
                try:
                    wait_serving(ports[proxy], proc, log, LABELS[proxy])
                    lb_procs[proxy] = proc
                except BenchError as exc:
                    failed[proxy] = str(exc)

            inproc = HaproxyEngine("127.0.0.1", free_port(), "round-robin")
            try:
                inproc.start([Server(f"s{i}", "127.0.0.1", p) for i, p in enumerate(backends)])
                ports["inproc"] = int(inproc._bind.rsplit(":", 1)[1])
                wait_serving(ports["inproc"], inproc._proc, inproc.log_path, LABELS["inproc"])
            except Exception as exc:
                failed["inproc"] = str(exc)

            proxies = ["anchor", "builtin", "engine", "inproc"]
            for n in range(rounds):
                order = proxies[n % 4 :] + proxies[: n % 4]  # nobody always runs first
                for mode in MODES:
                    for proxy in order:
                        if proxy in failed:
                            continue
                        try:
                            rate, p99, note = wrk(procs, work, ports[proxy], mode, seconds)
                        except BenchError as exc:
                            failed[f"{proxy} {mode}"] = str(exc)
                            continue
                        results.setdefault((proxy, mode), {})[n] = (rate, p99)
                        if note:
                            notes.setdefault((proxy, mode), []).append(note)

            if "engine" in lb_procs:
                try:
                    sock = haproxy_socket_of(lb_procs["engine"].pid)
                    if sock is None:
                        raise BenchError("no haproxy child of eda-lb tcp --engine haproxy found")
                    change = registry_change_latency(sock, registry, nginx["C"], 5)
                except (BenchError, OSError) as exc:
                    change_error = str(exc)
            else:
                change_error = failed.get("engine", "eda-lb tcp --engine haproxy did not run")
            inproc.stop(drain=False)

    def figure(proxy: str, mode: str) -> tuple[float | None, float | None, str]:
        why = failed.get(proxy) or failed.get(f"{proxy} {mode}")
        runs = results.get((proxy, mode))
        if why or not runs:
            return None, None, why or "no run"
        rate = statistics.median(r for r, _ in runs.values())
        p99 = statistics.median(p for _, p in runs.values())
        return rate, p99, "; ".join(notes.get((proxy, mode), []))

    def paired(proxy: str, mode: str, index: int, higher_is_better: bool) -> float | None:
        """Median over rounds of the ratio to the anchor's run of the same round."""
        mine, anchors = results.get((proxy, mode), {}), results.get(("anchor", mode), {})
        ratios = [
            mine[n][index] / anchors[n][index]
            if higher_is_better
            else anchors[n][index] / mine[n][index]
            for n in mine
            if n in anchors and mine[n][index] and anchors[n][index]
        ]
        return statistics.median(ratios) if ratios else None

    rows: list[Row] = []
    detail = (
        f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{seconds}s, {rounds} round(s): "
        "values are medians, the ratio is the median of each round's ratio to the anchor's run"
    )
    for mode in MODES:
        a_rate, a_p99, a_note = figure("anchor", mode)
        for proxy in ("builtin", "engine", "inproc"):
            rate, p99, note = figure(proxy, mode)
            if a_rate is None:
                note = f"anchor failed: {a_note}" + (f"; {note}" if note else "")
            target = TARGETS.get((proxy, mode))
            ratio = paired(proxy, mode, 0, True)
            mine, anchors = results.get((proxy, mode), {}), results.get(("anchor", mode), {})
            per_round = "rounds (eda/anchor req/s): " + ", ".join(
                f"{mine[n][0]:.0f}/{anchors[n][0]:.0f}" for n in sorted(mine) if n in anchors
            )
            rate_row = row(
                f"TCP {mode}: {LABELS[proxy]}", rate, ANCHOR, a_rate, "req/s",
                higher_is_better=True, target=f">= {target}x" if target else "",
                ok=None if target is None else bool(ratio and ratio >= target),
                note="; ".join(x for x in (note, per_round if mine else "", detail) if x),
            )  # fmt: skip
            rate_row["ratio"] = ratio
            p99_row = row(
                f"TCP {mode}: {LABELS[proxy]} p99", p99, ANCHOR, a_p99, "ms",
                higher_is_better=False, note=note,
            )  # fmt: skip
            p99_row["ratio"] = paired(proxy, mode, 1, False)
            rows += [rate_row, p99_row]
    if change is not None:
        added, removed = change
        for what, values in (("register", added), ("deregister", removed)):
            worst = max(values) * 1000
            rows.append(row(
                f"registry {what} -> haproxy runtime state (max of {len(values)})", worst, "-",
                None, "ms", higher_is_better=False, target="< 1000", ok=worst < 1000,
                note=f"median {statistics.median(values) * 1000:.0f} ms; "
                "eda-lb tcp --engine haproxy; show servers state polled every 2 ms",
            ))  # fmt: skip
    else:
        rows.append(row(
            "registry change -> haproxy runtime state", None, "-", None, "ms",
            higher_is_better=False, target="< 1000", ok=False, note=change_error,
        ))  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for item in run(quick="--quick" in sys.argv):
        print(json.dumps(item))
