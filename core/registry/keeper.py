"""The foreground life of one registration: child process, health checks, heartbeats.

``eda-registry register`` is this loop.  With a registry it registers and
heartbeats through an :class:`~eda.core.registry.agent.Agent`; without one it
announces the instance by mDNS (serverless mode) and, when it only fell back
to that for want of a registry, moves to one as soon as one answers.  With a
child command the registration lives exactly as long as the child, and the
child's exit status is the result.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable

from ..errors import UsageError
from .client import Client
from .model import Instance

PROBE_EVERY = 2.0  # seconds between looks for a registry while in serverless fallback

Log = Callable[[str], None]


class Keeper:
    """Keeps *inst* registered until the child exits or the caller is interrupted."""

    def __init__(
        self,
        inst: Instance,
        client: Client | None,
        iface: str | None,
        *,
        warn: Log,
        debug: Log,
        find_registry: Callable[[], Client | None] | None = None,
    ) -> None:
        self.inst, self.client, self.iface = inst, client, iface
        self.warn, self.debug = warn, debug
        # set when registered by mDNS only for want of a registry: finds one later
        self.find_registry = find_registry
        self.wake = threading.Event()
        self.status = inst.status
        self.child: subprocess.Popen[bytes] | None = None

    def _on_change(self, status: str) -> None:
        self.debug(f"health of {self.inst.id}: {status}")
        self.status = status
        self.wake.set()

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
                self.status = self.inst.status = monitor.first()
                monitor.start()
            client = self.client or self._serverless()
            if client is not None:
                self._registered(client)
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

    def _reap_child(self) -> int:
        assert self.child is not None
        try:
            code = self.child.wait(10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            code = self.child.wait()
        return 128 - code if code < 0 else code

    def _loop(self, beat: Callable[[], object], stop: Callable[[], bool] = bool) -> None:
        """Call *beat* every interval and at once on a health change.

        Returns when the child exits, or when *stop* () says so.
        """
        next_beat = time.monotonic() + self.inst.interval
        while (self.child is None or self.child.poll() is None) and not stop():
            wait = next_beat - time.monotonic()
            if self.child is not None:
                wait = min(wait, 0.05)
            changed = self.wake.wait(max(0.0, wait))
            if changed or time.monotonic() >= next_beat:
                self.wake.clear()
                beat()
                next_beat = time.monotonic() + self.inst.interval

    def _registered(self, client: Client) -> None:
        from .agent import Agent

        agent = Agent(client, self.inst, self.warn)
        try:
            inst = agent.register()
            self.debug(
                f"registered {inst.service}/{inst.id} at {inst.host}:{inst.port} "
                f"({inst.status}) with registry {agent.registry}"
            )
            self._loop(lambda: agent.beat(self.status))
        finally:
            agent.deregister()
            self.debug(f"deregistered {self.inst.id}")
            client.close()

    def _serverless(self) -> Client | None:
        """Announce by mDNS until the end, or until a registry appears (returned)."""
        from .serverless import Announcer

        announcer = Announcer(self.inst, self.iface)
        found: list[Client] = []
        next_probe = time.monotonic() + PROBE_EVERY
        try:
            announcer.start()
            self.debug(
                f"registered {self.inst.service}/{self.inst.id} at "
                f"{self.inst.host}:{self.inst.port} ({self.inst.status}) by mDNS"
            )

            def beat() -> None:
                nonlocal next_probe
                if announcer.inst.status != self.status:
                    announcer.update(self.status)
                if self.find_registry is not None and time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + PROBE_EVERY
                    client = self.find_registry()
                    if client is not None:
                        found.append(client)

            self._loop(beat, stop=lambda: bool(found))
        finally:
            announcer.close()
            if found:
                self.debug(f"a registry appeared: moving {self.inst.id} to it")
            else:
                self.debug(f"deregistered {self.inst.id}")
        return found[0] if found else None
