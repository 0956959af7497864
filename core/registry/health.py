"""Health checks run by ``register`` itself, debounced with rise/fall counts
(the one rule of core/measure.py, which eda-lb tcp's checks follow too).

A check is a shell command (exit 0 passing, 1 warning, anything else or a
timeout critical) or ``tcp`` (a TCP connect to the instance's host and
port).  The reported status changes only after ``rise`` consecutive passing
results, or ``fall`` consecutive results of another status, so a flapping
check does not flap lookups.

Start-up: the first check runs at once and, as in Consul, the first passing
result makes the instance passing at once; rise and fall apply to every
later transition.  Until that first pass, checks repeat quickly (0.1 s,
doubling up to 2 s, or the check interval if shorter), so a service that
takes a second to listen is found a second later, not after ``rise`` check
intervals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable

from ..measure import Debounce as _Debounce
from .model import CRITICAL, PASSING, WARNING

STARTUP_MAX = 2.0  # seconds between checks at most, until the instance first passes


def run_command(cmd: str, timeout: float, env: dict[str, str]) -> str:
    proc = subprocess.Popen(
        cmd,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return CRITICAL
    return PASSING if code == 0 else WARNING if code == 1 else CRITICAL


def connect_tcp(host: str, port: int, timeout: float) -> str:
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError:
        return CRITICAL
    return PASSING


class Debounce(_Debounce[str]):
    """Rise/fall over check statuses (core/measure.py): ``passing`` is the good one."""

    def __init__(self, rise: int, fall: int) -> None:
        super().__init__(rise, fall, PASSING)


class Monitor:
    """Runs a check every *interval* seconds in a thread; calls *on_change* on a new status."""

    def __init__(
        self,
        check: str,
        host: str,
        port: int,
        *,
        interval: float,
        timeout: float,
        rise: int,
        fall: int,
        env: dict[str, str],
        on_change: Callable[[str], None],
    ) -> None:
        self.interval, self.timeout = interval, timeout
        if check == "tcp":
            self._run: Callable[[], str] = lambda: connect_tcp(host, port, timeout)
        else:
            self._run = lambda: run_command(check, timeout, env)
        self.debounce = Debounce(rise, fall)
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="eda-check", daemon=True)

    def first(self) -> str:
        """Run the check once now (before registering) and return its status."""
        self.debounce.feed(self._run())
        assert self.debounce.status is not None
        return self.debounce.status

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        startup = 0.1
        while True:
            if self.debounce.passed:
                wait = self.interval
            else:  # not passing yet: look again soon, backing off to the interval
                wait, startup = min(startup, self.interval, STARTUP_MAX), startup * 2
            if self._stop.wait(wait):
                return
            result = self._run()
            if self.debounce.feed(result) and not self._stop.is_set():
                assert self.debounce.status is not None
                self.on_change(self.debounce.status)

    def stop(self) -> None:
        self._stop.set()
