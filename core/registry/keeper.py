"""The foreground life of one registration: child process and health checks.

``eda-registry register`` is this loop.  Staying registered -- registering,
heartbeating, the serverless (mDNS) fallback and the move to a registry that
appears, deregistering -- is :class:`~eda.core.presence.Presence`'s, as for
every daemon; the keeper adds what only this command has: a child command
whose life the registration follows exactly (the child's exit status is the
result) and health checks whose changes the presence carries at once.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable

from ..errors import UsageError
from ..presence import Presence

Log = Callable[[str], None]
CHILD_POLL = 0.05  # seconds between looks at the child's exit


class Keeper:
    """Keeps *presence*'s instance registered until the child exits or the caller is
    interrupted."""

    def __init__(self, presence: Presence, *, warn: Log, debug: Log) -> None:
        self.presence = presence
        self.inst = presence.inst
        self.warn, self.debug = warn, debug
        self.child: subprocess.Popen[bytes] | None = None
        self._never = threading.Event()  # waited on without a child: until interrupted

    def _on_change(self, status: str) -> None:
        self.debug(f"health of {self.inst.id}: {status}")
        self.presence.set_status(status)

    def run(
        self,
        cmd: tuple[str, ...],
        check: str | None,
        check_interval: float,
        check_timeout: float,
        rise: int,
        fall: int,
        interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    ) -> int | None:
        """Run until the end; the child's exit status, or None without a child.

        An exception in *interrupts* (SIGINT, SIGTERM as the caller maps them)
        is passed on to the child as SIGINT (KeyboardInterrupt) or SIGTERM,
        whose exit then ends the registration; without a child it propagates.
        Any other failure terminates the child: it must not outlive its
        registration.
        """
        from .health import Monitor

        monitor = None
        if cmd:
            try:
                self.child = subprocess.Popen(list(cmd))
            except OSError as exc:
                raise UsageError(f"cannot run {cmd[0]}: {exc.strerror}") from None
        try:
            if check:
                env = {
                    "EDA_SERVICE": self.inst.service,
                    "EDA_HOST": self.inst.host,
                    "EDA_PORT": str(self.inst.port),
                    "EDA_INSTANCE": self.inst.id,
                }
                monitor = Monitor(
                    check,
                    self.inst.host,
                    self.inst.port,
                    interval=check_interval,
                    timeout=check_timeout,
                    rise=rise,
                    fall=fall,
                    env=env,
                    on_change=self._on_change,
                )
                self.presence.set_status(monitor.first())
                monitor.start()
            try:
                self.inst = self.presence.start()
                self._wait()
            finally:
                self.presence.close()
        except interrupts as exc:
            if self.child is None:
                raise
            sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            if self.child.poll() is None:
                self.child.send_signal(sig)
        except BaseException:
            if self.child is not None and self.child.poll() is None:
                self.child.terminate()
                self._reap_child()
            raise
        finally:
            if monitor is not None:
                monitor.stop()
        return None if self.child is None else self._reap_child()

    def _wait(self) -> None:
        """Until the child exits; without one, until interrupted."""
        while self.child is None or self.child.poll() is None:
            self._never.wait(CHILD_POLL if self.child is not None else 1.0)

    def _reap_child(self) -> int:
        assert self.child is not None
        try:
            code = self.child.wait(10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            code = self.child.wait()
        return 128 - code if code < 0 else code
