"""Shared plumbing for the benchmarks: result rows, process handling, the mosquitto anchor.

Every process a benchmark starts goes through :class:`Procs`, which kills
whatever is still running when its ``with`` block ends, so an aborted or
failed measurement leaves nothing behind.  Readiness is always a condition
polled with a deadline (a line on stderr, a port accepting connections),
never a blind sleep.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypedDict

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MOSQUITTO = "/usr/sbin/mosquitto"


class Row(TypedDict):
    """One line of the result table.

    ``ratio`` is oriented so that a value above 1 means eda is better
    (eda/anchor for rates, anchor/eda for times).  ``ok`` is None when the
    row has no target, False when the target is missed or the run failed.
    """

    name: str
    eda: float | None
    anchor: str
    anchor_value: float | None
    unit: str
    ratio: float | None
    target: str
    ok: bool | None
    note: str


def row(
    name: str,
    eda: float | None,
    anchor: str,
    anchor_value: float | None,
    unit: str,
    *,
    higher_is_better: bool,
    target: str = "",
    ok: bool | None = None,
    note: str = "",
) -> Row:
    """Build a row, computing the ratio so that > 1 means eda is better."""
    ratio: float | None = None
    if eda and anchor_value:
        ratio = eda / anchor_value if higher_is_better else anchor_value / eda
    return Row(
        name=name, eda=eda, anchor=anchor, anchor_value=anchor_value, unit=unit,
        ratio=ratio, target=target, ok=ok, note=note,
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class BenchError(Exception):
    """A measurement could not be taken (process failed, timed out, lost data)."""


def eda_env(home: Path) -> dict[str, str]:
    """Environment for eda programs: private cache and config, no inherited EDA_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDA_")}
    env["EDA_NETNS"] = os.environ.get("EDA_NETNS", "")
    env["XDG_CACHE_HOME"] = str(home / "cache")
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def eda_cmd(program: str) -> str:
    """Path of an installed eda console script, e.g. ``eda-pub``."""
    return str(VENV_BIN / program)


class Procs:
    """Starts processes in their own process groups; kills the leftovers on exit."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env
        self._procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[Any]] = []

    def start(
        self,
        args: Sequence[str],
        *,
        stdin: Path | None = None,
        stdout: Path | None = None,
        stderr: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start *args* with stdio on files (or /dev/null), never on pipes that could fill."""
        fin = self._open(stdin, "rb")
        fout = self._open(stdout, "wb")
        ferr = self._open(stderr, "wb")
        proc = subprocess.Popen(
            list(args), stdin=fin, stdout=fout, stderr=ferr, cwd=self.workdir,
            env=env or self.env, start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def _open(self, path: Path | None, mode: str) -> IO[Any]:
        f = open(path if path is not None else os.devnull, mode)  # noqa: SIM115
        self._files.append(f)
        return f

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()

    def kill_all(self) -> None:
        """SIGTERM every running child's process group, then SIGKILL what is left after 2 s."""
        running = [p for p in self._procs if p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for f in self._files:
            f.close()
        self._files.clear()


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> None:
    """Poll *check* until it is true; raise BenchError naming *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def wait_for_text(
    path: Path, text: str, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until *text* appears in the file *path* (e.g. a process's stderr)."""
    needle = text.encode()

    def seen() -> bool:
        if proc is not None and proc.poll() is not None and needle not in path.read_bytes():
            raise BenchError(f"process exited {proc.returncode}: {tail(path)}")
        return path.exists() and needle in path.read_bytes()

    wait_until(seen, timeout, f"{text!r} in {path.name}")


def wait_exit(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """Wait for *proc* to exit and return its status, noticing the exit at once.

    Popen.wait(timeout) polls with sleeps of up to 50 ms, which would round
    every timed run up; a pidfd becomes readable the moment the child exits.
    """
    if proc.poll() is None:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: fall back to polling
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{what} did not finish within {timeout:g}s") from None
        try:
            exited = select.select([pidfd], [], [], timeout)[0]
        finally:
            os.close(pidfd)
        if not exited:
            raise BenchError(f"{what} did not finish within {timeout:g}s")
    return proc.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) process *pid* has used so far, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        raise BenchError(f"process {pid} is gone") from None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_percent(pid: int, seconds: float) -> float:
    """% of one core process *pid* uses over the next *seconds* (waited here)."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100


def tail(path: Path, size: int = 300) -> str:
    """The end of a log file, on one line, for error messages."""
    try:
        data = path.read_bytes()[-size:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip().replace("\n", " | ")


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_command(
    args: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    stdout: Path | None = None,
) -> tuple[float, int]:
    """Run *args* to completion; return (wall seconds, exit status).

    Its stdout goes to the file *stdout* when given (to check what it printed),
    else to /dev/null; its stderr to ``timed.err`` in *workdir*.
    """
    log = workdir / "timed.err"
    with Procs(workdir, env) as procs:
        start = time.perf_counter()
        proc = procs.start(args, stdout=stdout, stderr=log)
        code = wait_exit(proc, timeout, args[0])
        return time.perf_counter() - start, code


class Mosquitto:
    """A private mosquitto broker on 127.0.0.1 that logs subscriptions to a file."""

    def __init__(self, procs: Procs, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "mosquitto.log"
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 0\n"  # unlimited: the anchor must not drop messages
            "max_queued_bytes 0\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type subscribe\n"
            "log_timestamp false\n"
        )
        self.proc = procs.start([MOSQUITTO, "-c", str(conf)], stderr=self.log)
        wait_until(self._accepting, 10.0, "mosquitto to listen")

    def _accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(f"mosquitto exited {self.proc.returncode}: {tail(self.log)}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def args(self) -> list[str]:
        """Connection flags for mosquitto_pub/mosquitto_sub."""
        return ["-h", "127.0.0.1", "-p", str(self.port)]

    def wait_subscribed(self, client_id: str, topic: str, timeout: float = 10.0) -> None:
        """Wait until the broker has registered *client_id*'s subscription to *topic*."""
        wait_for_text(self.log, f"{client_id} 0 {topic}", timeout)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)
