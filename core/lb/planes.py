"""Starting, feeding, restarting and stopping the data planes of ``eda-lb tcp``.

With ``workers=0`` there is one data plane, in a thread of the proxy.
Otherwise each data plane is a process of its own, and a **fresh
interpreter** (``python -m eda.core.lb.dataplane``, core/lb/dataplane.py),
never a fork of the proxy: the proxy runs threads (the registry feed,
zeroconf's), and a forked child inherits every lock one of them held at the
moment of the fork, with no thread left to release it (a data plane once hung
forever on its first warning, on the stderr lock).  ``subprocess`` starts the
interpreter with fork+exec done in C, where no Python lock is taken.

A data plane gets its own listening socket and the read end of its control
pipe by file descriptor (nothing else is inherited: every other descriptor
of the proxy is close-on-exec), and writes its warnings as lines on its
stdout, read here and said through *warn*.  One that dies is started again
with the latest instructions.

Figures (``eda-lb stats``): :meth:`Planes.collect`, called from another
thread, asks for a new round; the proxy's loop sends ``{"stats": N}`` to
every data plane (:meth:`Planes.send_asks`), each answers with its
per-instance counters (a line marked ``STATS_LINE`` on its stdout, or a call
from the thread), and :meth:`~Planes.collect` sums the answers of round N.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from .dataplane import STATS_LINE, DataPlane, Log, Settings

Figures = dict[str, dict[str, int]]  # per instance id: counter -> value
COUNTERS = ("sessions", "sessions_total", "bytes_in", "bytes_out", "connect_errors")


class _Process:
    """A data-plane process: its Popen, listener slot, control pipe and unread report."""

    def __init__(self, proc: subprocess.Popen[bytes], slot: int, feed: int) -> None:
        self.proc, self.slot, self.feed = proc, slot, feed
        assert proc.stdout is not None
        self.report = proc.stdout.fileno()
        os.set_blocking(self.report, False)
        self.partial = b""
        self.reading = True

    @property
    def pid(self) -> int:
        return self.proc.pid


class Planes:
    """The data planes: one per listener (processes), or one thread (``workers=0``).

    *watch* is an epoll the proxy waits on: the data planes' reports are
    registered there, so a warning is said as soon as the proxy wakes up.
    """

    MAX_REPORT = 4096  # bytes of one report line kept (a longer one is cut)
    MAX_FIGURES = 8 << 20  # bytes of one figures line (a longer one is dropped)

    def __init__(
        self,
        listeners: list[socket.socket],
        settings: Settings,
        warn: Log,
        watch: select.epoll,
    ) -> None:
        self.listeners = listeners
        self.settings = settings
        self.warn = warn
        self.watch = watch
        self.processes: dict[int, _Process] = {}  # by the report's fd
        self.threads: list[tuple[threading.Thread, int]] = []  # (thread, control feed)
        self.in_threads: list[DataPlane] = []
        self.last_sent = b""
        # figures: rounds asked for (by collect) and sent (by the proxy's loop), and the
        # latest answer of each data plane (by report fd, or -1 - index of a thread)
        self.answered = threading.Condition()
        self.wanted = self.asked = 0
        self.answers: dict[int, tuple[int, Figures]] = {}

    def start(self) -> None:
        if self.settings.workers == 0:
            self._start_thread()
        else:
            for slot in range(len(self.listeners)):
                self._start_process(slot)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def _start_thread(self) -> None:
        control, feed = os.pipe()
        key = -1 - len(self.threads)

        def answer(asked: int, figures: Figures) -> None:
            self._store(key, asked, figures)

        plane = DataPlane(self.listeners[0].dup(), control, self.settings, self.warn, answer)
        thread = threading.Thread(target=plane.run, name="eda-lb-tcp", daemon=True)
        thread.start()
        self.in_threads.append(plane)
        self.threads.append((thread, feed))

    def _start_process(self, slot: int) -> None:
        control, feed = os.pipe()
        listen_fd = self.listeners[slot].fileno()
        argv = [sys.executable, "-m", "eda.core.lb.dataplane", str(listen_fd), str(control)]
        try:
            proc = subprocess.Popen(
                [*argv, self.settings.to_json()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                pass_fds=(listen_fd, control),
            )
        except OSError as exc:
            os.close(feed)
            self.warn(f"cannot start a data plane: {exc.strerror or exc}")
            return
        finally:
            os.close(control)
        process = _Process(proc, slot, feed)
        self.processes[process.report] = process
        self.watch.register(process.report, select.EPOLLIN)
        if self.last_sent:
            self._send(feed, self.last_sent)

    # -- instructions ----------------------------------------------------------------------
    def send(self, message: bytes) -> None:
        """Send one instruction line to every data plane (kept for those started later)."""
        self.last_sent = message
        for feed in self._feeds():
            self._send(feed, message)

    def _feeds(self) -> list[int]:
        return [*(p.feed for p in self.processes.values()), *(feed for _t, feed in self.threads)]

    @staticmethod
    def _send(feed: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(feed, data)  # a small message to a pipe the data plane reads at once

    # -- reports and restarts ----------------------------------------------------------------
    def read_reports(self) -> None:
        """Say what the data planes reported (their warnings), without waiting."""
        for process in list(self.processes.values()):
            if process.reading:
                self._read(process)

    def _read(self, process: _Process) -> None:
        while True:
            try:
                data = os.read(process.report, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # it ended (reaped by restart_dead)
                process.reading = False
                with contextlib.suppress(OSError, ValueError):
                    self.watch.unregister(process.report)
                if process.partial:
                    self._say(process.partial, process.report)
                return
            lines = (process.partial + data).split(b"\n")
            process.partial = lines.pop()
            if len(process.partial) > self.MAX_FIGURES:
                process.partial = process.partial[: self.MAX_REPORT]
            for line in lines:
                self._say(line, process.report)

    def _say(self, line: bytes, key: int) -> None:
        if line.startswith(STATS_LINE.encode()):
            self._figures_line(line[1:], key)
            return
        text = line[: self.MAX_REPORT].decode("utf-8", "replace").strip()
        if text:
            self.warn(text)

    def restart_dead(self) -> None:
        """Start a data-plane process again for each one that died."""
        for process in list(self.processes.values()):
            status = process.proc.poll()
            if status is None:
                continue
            self._forget(process)
            self.warn(f"data plane {process.pid} ended (status {status}); starting another")
            self._start_process(process.slot)

    def _forget(self, process: _Process) -> None:
        if process.reading:
            self._read(process)
        with contextlib.suppress(OSError, ValueError):
            self.watch.unregister(process.report)
        del self.processes[process.report]
        with self.answered:
            self.answers.pop(process.report, None)
        assert process.proc.stdout is not None
        process.proc.stdout.close()
        os.close(process.feed)

    # -- figures ---------------------------------------------------------------------------
    def _figures_line(self, data: bytes, key: int) -> None:
        import json

        try:
            message = json.loads(data)
            asked, figures = int(message["stats"]), message["backends"]
        except (ValueError, KeyError, TypeError):
            self.warn("a data plane's figures were not readable: dropped")
            return
        if isinstance(figures, dict):
            self._store(key, asked, figures)

    def _store(self, key: int, asked: int, figures: Figures) -> None:
        with self.answered:
            self.answers[key] = (asked, figures)
            self.answered.notify_all()

    def send_asks(self) -> None:
        """Send a round of figures asked for since the last one (the proxy's loop)."""
        import json

        with self.answered:
            if self.wanted <= self.asked:
                return
            self.asked = self.wanted
        message = json.dumps({"stats": self.asked}).encode() + b"\n"
        for feed in self._feeds():
            self._send(feed, message)

    def collect(self, wake: Callable[[], None], timeout: float) -> tuple[Figures, int, int]:
        """Ask every data plane for its figures (from any thread but the proxy's loop,
        which *wake* wakes to send the round) and sum them, waiting *timeout* at most:
        (per instance, data planes that answered, data planes there are)."""
        with self.answered:
            self.wanted += 1
            asked = self.wanted
        wake()
        deadline = time.monotonic() + timeout
        with self.answered:
            while True:
                planes = [*self.processes, *(-1 - i for i in range(len(self.threads)))]
                got = [self.answers.get(k) for k in planes]
                fresh = [a[1] for a in got if a is not None and a[0] >= asked]
                left = deadline - time.monotonic()
                if len(fresh) == len(planes) or left <= 0:
                    break
                self.answered.wait(left)
        total: Figures = {}
        for figures in fresh:
            for key, counts in figures.items():
                into = total.setdefault(str(key), dict.fromkeys(COUNTERS, 0))
                if isinstance(counts, dict):
                    for name in COUNTERS:
                        value = counts.get(name)
                        if isinstance(value, int) and not isinstance(value, bool):
                            into[name] += value
        return total, len(fresh), len(planes)

    # -- the end -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self.processes or self.threads)

    def stop(self, timeout: float) -> None:
        """Drain every data plane and wait for them (a little past *timeout* at most).

        The caller closes its listeners after this is sent: the data planes
        hold their own copies until drained.
        """
        import json

        self.send(json.dumps({"drain": timeout}).encode() + b"\n")
        for listener in self.listeners:
            listener.close()
        deadline = time.monotonic() + timeout + 2.0
        for thread, _feed in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(
            p.proc.poll() is None for p in self.processes.values()
        ):
            self.read_reports()  # what a data plane says while draining, and room for more
            time.sleep(0.02)
        for process in list(self.processes.values()):
            if process.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.proc.send_signal(signal.SIGKILL)
                process.proc.wait()
            self._forget(process)
        for _thread, feed in self.threads:
            os.close(feed)
        self.threads.clear()
