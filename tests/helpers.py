"""Helpers for tests: processes with captured output, conditions with deadlines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROGRAMS = {"eda-pub": "eda.cli.pub", "eda-sub": "eda.cli.sub", "eda-registry": "eda.cli.registry"}


def command(program: str, *args: str) -> list[str]:
    """argv to run an eda program with this interpreter."""
    return [sys.executable, "-m", PROGRAMS[program], *args]


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll *cond* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def children_of(pid: int) -> list[str]:
    """Live (non-zombie) child processes of *pid*, as 'pid:name'."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(f"{entry}:{name}")
    return found


class Proc:
    """A started process whose stdout and stderr go to files the test can read."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        n: int,
        stdin: Any,
        env: dict[str, str] | None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.out_path = workdir / f"proc{n}.out"
        self.err_path = workdir / f"proc{n}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.popen = subprocess.Popen(
            [*prefix, *argv],
            stdin=stdin,
            stdout=self._out,
            stderr=self._err,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def wait_stderr(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        return wait_until(
            lambda: re.search(pattern, self.stderr),
            timeout,
            f"stderr ~ {pattern!r}; got {self.stderr!r}",
        )

    def wait_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        wait_until(
            lambda: len(self.lines()) >= n, timeout, f"{n} lines of output; got {self.stdout!r}"
        )
        return self.lines()

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)

    def close(self) -> None:
        self._out.close()
        self._err.close()


class Procs:
    """Every process one test started; :meth:`kill_all` ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: Any = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Proc:
        proc = Proc(argv, self.workdir, len(self.started), stdin, env, prefix)
        self.started.append(proc)
        return proc

    def eda(self, program: str, *args: str, **kw: Any) -> Proc:
        return self.start(command(program, *args), **kw)

    def sub_ready(self, *args: str, **kw: Any) -> Proc:
        """Start eda-sub -v and wait until mDNS announced it (publishers can find it)."""
        proc = self.eda("eda-sub", "-v", *args, **kw)
        proc.wait_stderr("announced as", 15)
        return proc

    def kill_all(self) -> None:
        for proc in self.started:
            try:
                proc.signal(signal.SIGKILL)
                proc.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            proc.close()


def run(
    program: str,
    *args: str,
    input: bytes | str | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run an eda program to completion; stdout and stderr as text."""
    data = input.encode() if isinstance(input, str) else input
    result = subprocess.run(
        [*prefix, *command(program, *args)],
        input=data,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=None if data is not None else subprocess.DEVNULL,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )
