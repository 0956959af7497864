"""Being found and finding others, off the serving thread.

A daemon (an eda-lb worker or broker, an eda-txn coordinator or participant)
serves from one poll loop that must never wait on the registry or on mDNS;
these helpers do that work in a background thread:

- :class:`Presence` -- keeps one instance registered (a registry through
  :class:`~eda.core.registry.agent.Agent`, else serverless mDNS through
  :class:`~eda.core.registry.serverless.Announcer`) and deregisters it on
  :meth:`Presence.close`;
- :class:`Finder` -- looks up a service's instances every few seconds
  (:func:`~eda.core.registry.access.lookup`) and keeps the latest answer for
  the loop to take with :meth:`Finder.take`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from .errors import EdaError
from .registry import access as reg
from .registry.model import Instance

Log = Callable[[str], None]
PROBE_EVERY = 2.0  # seconds between looks for a registry while announced by mDNS for want of one


def _quiet(_msg: str) -> None:
    pass


class Presence:
    """One registration kept alive by a daemon thread until :meth:`close`."""

    def __init__(
        self,
        access: reg.Access,
        record: dict[str, object],
        *,
        log: Log = _quiet,
        warn: Log = _quiet,
    ) -> None:
        """*record* comes from :func:`~eda.core.registry.access.registration`.

        With no registry known and mDNS off, nothing is registered (callers
        then need the endpoint); :attr:`mode` says which way it went.
        """
        self.log, self.warn = log, warn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._announcer: object = None
        interval = float(record["interval"])  # type: ignore[arg-type]
        self.client = None
        if access.serverless or access.endpoints or access.mdns:
            self.client = reg.connect_for_registration(access, interval)
        self.inst: Instance = reg.finish(record, self.client, access.interface)
        self.interface = access.interface
        if self.client is not None:
            self.mode = "registry"
        elif access.mdns:
            self.mode = "mdns"
        else:
            self.mode = "none"
        # announced by mDNS only for want of a registry: move to one as soon as one answers
        self.access = access
        self.fell_back = self.mode == "mdns" and not access.serverless

    def start(self) -> Instance:
        """Register now (raises if a registry refuses), then heartbeat in the background."""
        if self.mode == "registry":
            from .registry.agent import Agent

            assert self.client is not None
            agent = Agent(self.client, self.inst, self.warn)
            self.inst = agent.register()
            self.log(f"registered {self.inst.id} with registry {agent.registry}")
            self._thread = threading.Thread(target=self._beat, args=(agent,), daemon=True)
            self._thread.start()
        elif self.mode == "mdns":
            from .registry.serverless import Announcer

            announcer = Announcer(self.inst, self.interface)
            announcer.start()
            self._announcer = announcer
            self.log(f"announced {self.inst.id} by mDNS (serverless mode)")
            if self.fell_back:
                self._thread = threading.Thread(target=self._look_for_registry, daemon=True)
                self._thread.start()
        else:
            self.log("not registered (no registry and mDNS off): callers need the endpoint")
        return self.inst

    def _look_for_registry(self) -> None:
        """While announced by mDNS for want of a registry: every few seconds, ask whether
        one answers now; if so, register there and stop announcing (as eda-registry does)."""
        from .registry.agent import Agent

        while not self._stop.wait(PROBE_EVERY):
            client = reg.answering_registry(self.access, self.inst.interval)
            if client is None:
                continue
            agent = Agent(client, self.inst, self.warn)
            try:
                self.inst = agent.register()
            except Exception as exc:  # refused or gone again: stay announced, try later
                client.close()
                self.log(f"a registry appeared but refused the registration: {exc}")
                continue
            self.client, self.mode = client, "registry"
            self.log(f"a registry appeared: {self.inst.id} moved to registry {agent.registry}")
            announcer, self._announcer = self._announcer, None
            if announcer is not None:
                with contextlib.suppress(Exception):
                    announcer.close()  # type: ignore[attr-defined]
            self._beat(agent)
            return

    def _beat(self, agent: object) -> None:
        from .registry.agent import Agent

        assert isinstance(agent, Agent)
        while not self._stop.wait(self.inst.interval):
            with contextlib.suppress(Exception):  # never let a heartbeat end the thread
                agent.beat("passing")

    def close(self) -> None:
        """Deregister (best effort) and stop; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3.0)
            self._thread = None
            if self.client is not None and self.mode == "registry":
                from .registry.agent import Agent

                Agent(self.client, self.inst, self.warn).deregister()
                self.client.close()
                self.client = None
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            with contextlib.suppress(Exception):
                announcer.close()  # type: ignore[attr-defined]


class Finder:
    """The instances of *service* matching *keep*, looked up every *every* seconds."""

    def __init__(
        self,
        service: str,
        access: reg.Access,
        keep: Callable[[Instance], bool],
        *,
        every: float = 2.0,
        warn: Log = _quiet,
    ) -> None:
        self.service, self.access, self.keep, self.every = service, access, keep, every
        self.warn = warn
        self._lock = threading.Lock()
        self._latest: list[Instance] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self._fresh = False  # once() just answered: the background starts a period later

    def once(self) -> list[Instance]:
        """A lookup now, in the calling thread (raises what the lookup raises)."""
        found = [i for i in reg.lookup(self.service, self.access) if self.keep(i)]
        self._fresh = True
        return found

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Look up again now rather than at the next period."""
        self._wake.set()

    def _run(self) -> None:
        if self._fresh:  # the same lookup again at once would only delay close()
            self._wake.wait(self.every)
            self._wake.clear()
        while not self._stop.is_set():
            try:
                found = self.once()
            except EdaError as exc:
                self.errors += 1
                self.warn(f"warning: cannot look up {self.service}: {exc}")
            except Exception as exc:  # a bug must not end discovery silently
                self.errors += 1
                self.warn(f"warning: lookup of {self.service} failed: {type(exc).__name__}: {exc}")
            else:
                with self._lock:
                    self._latest = found
            self._wake.wait(self.every)
            self._wake.clear()

    def take(self) -> list[Instance] | None:
        """The latest answer not yet taken, else None."""
        with self._lock:
            found, self._latest = self._latest, None
        return found

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
