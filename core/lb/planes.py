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

from .dataplane import DataPlane, Log, Settings


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
        plane = DataPlane(self.listeners[0].dup(), control, self.settings, self.warn)
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
                    self._say(process.partial)
                return
            lines = (process.partial + data).split(b"\n")
            process.partial = lines.pop()[: self.MAX_REPORT]
            for line in lines:
                self._say(line)

    def _say(self, line: bytes) -> None:
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
        assert process.proc.stdout is not None
        process.proc.stdout.close()
        os.close(process.feed)

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
