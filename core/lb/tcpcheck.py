"""Active health checks of ``eda-lb tcp``: a TCP connect to every candidate instance.

An instance is checked every ``check_interval`` seconds (a connect within
``check_timeout``), and goes up and down by the one rise/fall rule of
core/measure.py: a new instance is used at once, until its first check;
failing that first check takes it out at once, passing its first check for
the first time puts it in at once; after that ``fall`` failures in a row take
it down and ``rise`` passes in a row bring it back.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..measure import Debounce
from .dataplane import Backend, Log, Settings

EPOLLOUT = select.EPOLLOUT


def _quiet(_message: str) -> None:
    pass


@dataclass
class _Check:
    backend: Backend
    debounce: Debounce[bool]
    due: float = 0.0
    sock: socket.socket | None = None
    deadline: float = 0.0

    @property
    def up(self) -> bool:
        """Used by the data planes: not down (a new instance is up until its first check)."""
        return self.debounce.status is not False

    @property
    def confirmed(self) -> bool:
        """A check has passed."""
        return self.debounce.passed

    @property
    def ok(self) -> int:
        """Checks passed in a row."""
        return self.debounce.passes

    @property
    def failed(self) -> int:
        """Checks failed in a row."""
        return self.debounce.fails


class Health:
    """TCP connect checks with rise/fall for every candidate instance."""

    def __init__(self, settings: Settings, log: Log = _quiet) -> None:
        self.settings = settings
        self.log = log
        self.checks: dict[str, _Check] = {}
        self.ep = select.epoll()
        self.by_fd: dict[int, _Check] = {}

    def set_candidates(self, backends: Iterable[Backend]) -> bool:
        """The instances the registry says are passing; True if the set that is up changed."""
        now, s = time.monotonic(), self.settings
        wanted = {b.id: b for b in backends}
        changed = False
        for inst_id in list(self.checks):
            check = self.checks[inst_id]
            if wanted.get(inst_id) != check.backend:
                self._abort(check)
                del self.checks[inst_id]
                changed = changed or check.up
        for inst_id, backend in wanted.items():
            if inst_id not in self.checks:
                self.checks[inst_id] = _Check(backend, Debounce(s.rise, s.fall, True), due=now)
                changed = True
        return changed

    def up(self) -> list[Backend]:
        return [c.backend for c in sorted(self.checks.values(), key=lambda c: c.backend.id) if c.up]

    def timeout(self) -> float:
        """Seconds until the next check starts or times out."""
        now = time.monotonic()
        times = [c.deadline if c.sock else c.due for c in self.checks.values()]
        return max(0.0, min(times) - now) if times else 1.0

    def step(self, wait: float) -> bool:
        """Run due checks, wait up to *wait* for answers; True if the set that is up changed."""
        changed = False
        now = time.monotonic()
        for check in self.checks.values():
            if check.sock is None and now >= check.due:
                changed |= self._start(check, now)
        for fd, _ev in self.ep.poll(min(wait, self.timeout())):
            answered = self.by_fd.get(fd)
            if answered is not None and answered.sock is not None:
                err = answered.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                changed |= self._result(answered, err == 0)
        now = time.monotonic()
        for check in list(self.by_fd.values()):
            if check.sock is not None and now >= check.deadline:
                changed |= self._result(check, False)
        return changed

    def _start(self, check: _Check, now: float) -> bool:
        backend = check.backend
        try:
            sock = socket.socket(backend.family, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors: this round is lost, not the proxy
            self.log(f"cannot check {backend.id}: {exc.strerror}")
            check.due = now + self.settings.check_interval
            return False
        sock.setblocking(False)
        err = sock.connect_ex((backend.host, backend.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            check.due = now + self.settings.check_interval
            return self._record(check, False)
        check.sock, check.deadline = sock, now + self.settings.check_timeout
        self.by_fd[sock.fileno()] = check
        self.ep.register(sock.fileno(), EPOLLOUT)
        return False

    def _abort(self, check: _Check) -> None:
        if check.sock is not None:
            self.by_fd.pop(check.sock.fileno(), None)
            self.ep.unregister(check.sock.fileno())
            check.sock.close()
            check.sock = None

    def _result(self, check: _Check, ok: bool) -> bool:
        self._abort(check)
        check.due = time.monotonic() + self.settings.check_interval
        return self._record(check, ok)

    def _record(self, check: _Check, ok: bool) -> bool:
        """Count one result; True when the instance went up or down."""
        was_up = check.up
        check.debounce.feed(ok)
        if check.up == was_up:
            return False
        name = f"{check.backend.id} ({check.backend.endpoint})"
        if check.up:
            self.log(f"instance {name} is up ({check.ok} checks passed)")
        else:
            self.log(f"instance {name} is down ({check.failed} checks failed)")
        return True

    def close(self) -> None:
        for check in self.checks.values():
            self._abort(check)
        self.ep.close()
