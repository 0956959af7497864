"""HAProxy as the data plane of ``eda-lb tcp --engine haproxy``.

:class:`HaproxyEngine` writes a ``haproxy.cfg`` into a private working
directory (a frontend on the listen address, one backend with the strategy and
one ``server`` line per instance, each with ``check inter rise fall`` and its
weight, and a ``stats socket ... level admin`` for the Runtime API), starts
``haproxy`` as a child process it owns and waits until the Runtime API
answers.  Every later change goes through that API over the unix socket, in
the same call as :meth:`HaproxyEngine.update`, without a restart:

- a new instance: ``add server`` (in maintenance), ``enable health``,
  ``enable server``;
- a new weight: ``set server ... weight``;
- a gone instance: ``set server ... state maint`` (no new connection goes to
  it; the ones it has keep running), then ``del server`` as soon as its last
  connection has ended (HAProxy refuses to delete a server with connections),
  or after ``drain_timeout`` by ``shutdown sessions server`` first.

Server names, addresses and the configuration file are core/lb/haproxycfg.py's:
no registry id or address reaches HAProxy unchecked; a record that fails is
logged and left out.

Needs HAProxy >= 2.5 (``add server`` with ``check``, ``del server``); the
Debian 12 package is 2.6.

About 500 lines for a reason: one child process and the one API that drives
it (start, the Runtime API's commands in their order, the servers draining
until they can be deleted, stop); what can stand alone, the configuration
file and the names, is already core/lb/haproxycfg.py.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import ipaddress
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import EdaError, UsageError
from .haproxycfg import (
    BACKEND,
    MAX_WEIGHT,
    MIN_VERSION,
    STRATEGIES,
    Server,
    ServerState,
    Target,
    Timers,
    address,
    as_int,
    check_words,
    listen_address,
    parse_version,
    resolve,
    server_name,
    write_config,
)
from .selfloop import reaches

__all__ = ["STRATEGIES", "HaproxyEngine", "Server", "ServerState", "server_name"]

Log = Callable[[str], None]

_ALERT = re.compile(r"^\[(?:ALERT|ERROR|NOTICE|WARNING)\]\s*(?:\(\d+\)\s*)?:\s*")


def _quiet(_message: str) -> None:
    pass


def _command_line(binary: str, config: Path) -> list[str]:
    """haproxy's command line; behind ``setpriv --pdeathsig TERM`` (util-linux) when it is
    there, so that no haproxy outlives eda-lb.  The signal is set by setpriv, not by a
    ``preexec_fn``: eda-lb runs threads (the registry feed, zeroconf's) when it starts
    haproxy, and Python code in the child of a fork of a threaded process can deadlock
    on a lock another thread held."""
    found = shutil.which(binary)
    if found is None:
        raise OSError(errno.ENOENT, "not found")
    argv = [found, "-db", "-f", str(config)]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


class HaproxyEngine:
    """HAProxy configured from registry instances and updated through its Runtime API.

    The haproxy child gets SIGTERM if the thread that called :meth:`start`
    ends (Linux's parent-death signal), so call :meth:`start` from a
    long-lived thread (the main one).  :meth:`update` and :meth:`servers` may
    be called from any thread.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        strategy: str,
        *,
        check_interval: float = 1.0,
        rise: int = 2,
        fall: int = 3,
        workdir: str | None = None,
        log: Log = _quiet,
        binary: str = "haproxy",
        drain_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        idle_timeout: float = 3600.0,
        ready_timeout: float = 10.0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
        if not 1 <= listen_port <= 65535:
            raise UsageError(f"listen port out of range: {listen_port}")
        if not (0.01 <= check_interval <= 3600 and 1 <= rise <= 100 and 1 <= fall <= 100):
            raise UsageError("health check interval, rise or fall out of range")
        for what, value in (
            ("drain", drain_timeout), ("connect", connect_timeout), ("idle", idle_timeout),
        ):  # fmt: skip
            if not 0 <= value < math.inf:
                raise UsageError(f"{what} timeout must be a number of seconds >= 0: {value}")
        self.strategy = strategy
        self.check_interval = check_interval
        self.rise, self.fall = rise, fall
        self.drain_timeout = drain_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.ready_timeout = ready_timeout
        self.binary = binary
        self._log = log
        self._bind = listen_address(listen_host, listen_port)
        self._listen_port = listen_port
        self._listen_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        with contextlib.suppress(ValueError):
            self._listen_ip = resolve(listen_host or "0.0.0.0")
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._active: dict[str, Target] = {}  # by HAProxy name
        self._draining: dict[str, tuple[Target, float]] = {}  # name -> (target, deadline)
        self._names: dict[str, str] = {}  # HAProxy name -> registry id, for every server added
        self._reported: set[Server] = set()  # refused records already logged
        self._stop_reaper = threading.Event()
        self._reaper: threading.Thread | None = None
        self.version: tuple[int, int] | None = None

    # -- paths ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self._dir() / "haproxy.cfg"

    @property
    def socket_path(self) -> Path:
        return self._dir() / "admin.sock"

    @property
    def log_path(self) -> Path:
        return self._dir() / "haproxy.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _dir(self) -> Path:
        if self.workdir is None:
            raise EdaError("haproxy engine not started")
        return self.workdir

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, servers: list[Server]) -> None:
        """Write the configuration for *servers*, start haproxy and wait until it serves."""
        if self._proc is not None:
            raise EdaError("haproxy engine already started")
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="eda-haproxy-"))
        else:
            workdir = Path(self._workdir_arg or ".").absolute()
            if not re.fullmatch(r"[A-Za-z0-9_./+-]+", str(workdir)):
                raise UsageError(
                    f"haproxy work directory path must be plain (letters, digits, _ . / + -): "
                    f"{str(workdir)[:100]!r}"
                )
            workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = workdir
        if len(os.fsencode(self.socket_path)) > 100:
            raise UsageError(
                f"haproxy work directory path too long for a unix socket: {self.workdir}"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        targets = self._targets(servers)
        self._active = {t.name: t for t in targets}
        self._names = {t.name: t.server.id for t in targets}
        self._write_config()
        try:
            with open(self.log_path, "wb") as err:
                self._proc = subprocess.Popen(
                    _command_line(self.binary, self.config_path),
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self.workdir,
                    start_new_session=True,  # the terminal's ^C is eda-lb's to handle
                )
        except OSError as exc:
            self._cleanup()
            raise EdaError(
                f"cannot run {self.binary} ({exc.strerror or exc}): install HAProxy "
                "(Debian: apt-get install haproxy)"
            ) from None
        try:
            self._wait_ready()
            self.version = parse_version(self._command("show info"))
            if self.version < MIN_VERSION:
                raise EdaError(
                    f"haproxy {self.version[0]}.{self.version[1]} is too old: "
                    f"the Runtime API's add/del server need {MIN_VERSION[0]}.{MIN_VERSION[1]}+"
                )
        except BaseException:
            self.stop(drain=False)
            raise
        self._log(
            f"haproxy {self.version[0]}.{self.version[1]} started (pid {self.pid}, "
            f"balance {STRATEGIES[self.strategy]}, config {self.config_path})"
        )
        for t in targets:
            self._log(f"haproxy: serving {t.server.id!r} at {t.endpoint} weight {t.weight}")
        self._stop_reaper.clear()
        self._reaper = threading.Thread(
            target=self._reap_loop, name="eda-haproxy-drain", daemon=True
        )
        self._reaper.start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc is not None else None
                raise EdaError(f"haproxy exited with status {code}: {self._alert()}")
            if self.socket_path.exists():
                with contextlib.suppress(EdaError):
                    self._command("show info")
                    return
            if time.monotonic() > deadline:
                raise EdaError(
                    f"haproxy did not answer on its Runtime API within {self.ready_timeout:g}s: "
                    f"{self._alert()}"
                )
            time.sleep(0.01)

    def alive(self) -> bool:
        """Whether the haproxy process is running."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, drain: bool = True) -> None:
        """Stop haproxy: with *drain*, it closes its listener and lets open connections
        finish (``drain_timeout`` at most); without, it closes everything at once."""
        self._stop_reaper.set()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(5.0)
        self._reaper = None
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1 if drain else signal.SIGTERM)
            try:
                proc.wait(self.drain_timeout + 5.0 if drain else 5.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> HaproxyEngine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop(drain=False)

    # -- changes -------------------------------------------------------------------------------

    def update(self, servers: list[Server]) -> None:
        """Make HAProxy's backend match *servers* through the Runtime API (no restart).

        New instances are added and enabled, changed weights set, gone ones
        taken out of the balancing and deleted once their connections have
        ended.  An instance HAProxy refuses is logged and tried again at the
        next update; raises :class:`EdaError` only when haproxy is not running.
        """
        targets = {t.name: t for t in self._targets(servers)}
        with self._lock:
            self._check_running()
            before = {name: t.weight for name, t in self._active.items()}
            for name in [n for n in self._active if n not in targets]:
                self._retire(name)
            for name, target in targets.items():
                current = self._active.get(name)
                if current is not None:
                    if current.weight != target.weight and self._try(
                        f"set server {BACKEND}/{name} weight {target.weight}"
                    ):
                        self._active[name] = target
                        self._log(f"haproxy: {target.server.id!r} weight {target.weight}")
                elif name in self._draining:
                    self._revive(target)
                else:
                    self._add(target)
            if before != {name: t.weight for name, t in self._active.items()}:
                self._write_config()
            self._reap()

    def _add(self, target: Target) -> None:
        name = target.name
        check = check_words(self.check_interval, self.rise, self.fall)
        if not self._try(
            f"add server {BACKEND}/{name} {target.endpoint} weight {target.weight} {check}",
            ok=("New server registered.",),
        ):
            return
        self._names[name] = target.server.id
        if self._try(f"enable health {BACKEND}/{name}") and self._try(
            f"enable server {BACKEND}/{name}"
        ):
            self._active[name] = target
            self._log(
                f"haproxy: added {target.server.id!r} at {target.endpoint} weight {target.weight}"
            )
        else:  # half-added: take it out again so the next update starts clean
            self._try(f"set server {BACKEND}/{name} state maint")
            self._try(f"del server {BACKEND}/{name}", ok=("Server deleted.",))

    def _revive(self, target: Target) -> None:
        """An instance that comes back while its old server still drains: use it again."""
        name = target.name
        if self._try(f"set server {BACKEND}/{name} weight {target.weight}") and self._try(
            f"set server {BACKEND}/{name} state ready"
        ):
            del self._draining[name]
            self._active[name] = target
            self._log(f"haproxy: {target.server.id!r} back at {target.endpoint}")

    def _retire(self, name: str) -> None:
        target = self._active.pop(name)
        if self._try(f"set server {BACKEND}/{name} state maint"):
            self._draining[name] = (target, time.monotonic() + self.drain_timeout)
            self._log(f"haproxy: removing {target.server.id!r} (draining its connections)")

    def _reap(self) -> None:
        """Delete drained servers: HAProxy refuses while a server still has connections."""
        now = time.monotonic()
        for name, (target, deadline) in list(self._draining.items()):
            if now > deadline:
                self._try(f"shutdown sessions server {BACKEND}/{name}")
            reply = self._command(f"del server {BACKEND}/{name}").strip()
            if reply in ("Server deleted.", "No such server."):
                del self._draining[name]
                self._names.pop(name, None)
                self._log(f"haproxy: removed {target.server.id!r}")

    def _reap_loop(self) -> None:
        while not self._stop_reaper.wait(0.2):
            if not self._draining:
                continue
            with self._lock:
                if not self.alive():
                    return
                with contextlib.suppress(EdaError):
                    self._reap()

    # -- state ---------------------------------------------------------------------------------

    def servers(self) -> list[ServerState]:
        """The backend's servers as HAProxy sees them now (status, weight, connections,
        bytes, connect errors): its ``show stat``."""
        with self._lock:
            self._check_running()
            text = self._command(f"show stat {BACKEND} 4 -1")
            names = dict(self._names)
        lines = text.lstrip("# ").splitlines()
        found = []
        for rec in csv.DictReader(line for line in lines if line.strip()):
            if rec.get("pxname") != BACKEND or rec.get("svname") in (None, "BACKEND"):
                continue
            name = rec["svname"]
            found.append(
                ServerState(
                    id=names.get(name, ""),
                    name=name,
                    address=rec.get("addr") or "",
                    status=rec.get("status") or "",
                    weight=as_int(rec.get("weight")),
                    sessions=as_int(rec.get("scur")),
                    total=as_int(rec.get("stot")),
                    bytes_in=as_int(rec.get("bin")),
                    bytes_out=as_int(rec.get("bout")),
                    connect_errors=as_int(rec.get("econ")),
                )
            )
        return found

    # -- helpers -------------------------------------------------------------------------------

    def _targets(self, servers: list[Server]) -> list[Target]:
        """Validated, de-duplicated targets; a bad record is logged and left out."""
        out: dict[str, Target] = {}
        seen: set[str] = set()
        for s in servers:
            try:
                if not isinstance(s.port, int) or not 1 <= s.port <= 65535:
                    raise ValueError(f"port out of range: {s.port!r}")
                if not isinstance(s.weight, int):
                    raise ValueError(f"weight not an integer: {s.weight!r}")
                ip = resolve(str(s.host))
                endpoint = address(ip, s.port)
                if self._is_self(ip, s.port):
                    raise ValueError("it is this proxy's own listen address")
            except ValueError as exc:
                self._report(s, f"haproxy: instance {str(s.id)[:80]!r} left out: {exc}")
                continue
            if s.id in seen:
                self._report(s, f"haproxy: duplicate instance id {s.id[:80]!r} left out")
                continue
            seen.add(s.id)
            weight = min(max(s.weight, 0), MAX_WEIGHT) if self.strategy == "weighted" else 1
            name = server_name(s.id, str(ip), s.port)
            out[name] = Target(server=s, name=name, endpoint=endpoint, weight=weight)
        return list(out.values())

    def _is_self(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        """Whether *ip*:*port* is haproxy's own frontend (a connection loop if served)."""
        return reaches(self._listen_ip, self._listen_port, str(ip), port)

    def _report(self, server: Server, message: str) -> None:
        """Log a refused record once, not at every update that still carries it."""
        if server in self._reported:
            return
        if len(self._reported) >= 1024:
            self._reported.clear()
        self._reported.add(server)
        self._log(message)

    def _write_config(self) -> None:
        timers = Timers(
            self.check_interval,
            self.rise,
            self.fall,
            self.drain_timeout,
            self.connect_timeout,
            self.idle_timeout,
        )
        targets = list(self._active.values())
        write_config(self.config_path, self.socket_path, self._bind, self.strategy, timers, targets)

    def _check_running(self) -> None:
        if self._proc is None:
            raise EdaError("haproxy engine not started")
        if self._proc.poll() is not None:
            raise EdaError(f"haproxy exited with status {self._proc.returncode}: {self._alert()}")

    def _command(self, command: str) -> str:
        """One Runtime API command on its own connection; HAProxy's reply as text."""
        if "\n" in command or ";" in command:  # names and addresses are validated: never
            raise EdaError(f"refusing a Runtime API command with a separator: {command[:80]!r}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            try:
                sock.connect(str(self.socket_path))
                sock.sendall(command.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except OSError as exc:
                raise EdaError(f"haproxy Runtime API: {exc.strerror or exc}") from None
        return b"".join(chunks).decode(errors="replace")

    def _try(self, command: str, ok: tuple[str, ...] = ("",)) -> bool:
        """Run *command*; log HAProxy's answer on one line and return False if it refused."""
        try:
            reply = self._command(command).strip()
        except EdaError as exc:
            self._log(f"haproxy: {command.split(' ', 3)[:3]}: {exc}")
            return False
        if reply in ok:
            return True
        self._log(
            f"haproxy: {' '.join(command.split(' ', 3)[:3])}: {' '.join(reply.split())[:200]}"
        )
        return False

    def _alert(self) -> str:
        """The first alert haproxy printed (or its last line), on one line."""
        try:
            text = self.log_path.read_text(errors="replace") if self.workdir else ""
        except OSError:
            text = ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        alerts = [line for line in lines if line.startswith("[ALERT]")]
        line = (alerts or lines or ["no message"])[0]
        return _ALERT.sub("", line)[:300]
