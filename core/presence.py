"""Being found and finding others, off the serving thread.

Staying registered is written once, here: eda-lb workers and brokers, eda-txn
coordinators and participants, and ``eda-registry register``
(:class:`~eda.core.registry.keeper.Keeper`) all use :class:`Presence`.  A
daemon serves from one poll loop that must never wait on the registry or on
mDNS (a registry that is slow or SIGSTOPped would stall every request); these
helpers do that work in a background thread:

- :class:`Presence` -- keeps one instance registered (a registry through
  :class:`~eda.core.registry.agent.Agent`, else serverless mDNS through
  :class:`~eda.core.registry.serverless.Announcer`), carries health changes
  (:meth:`Presence.set_status`) at once, moves from mDNS to a registry that
  appears when mDNS was only for want of one, and deregisters on
  :meth:`Presence.close`;
- :class:`Finder` -- looks up a service's instances every few seconds
  (:func:`~eda.core.registry.access.lookup`) and keeps the latest answer for
  the loop to take with :meth:`Finder.take`.

Only :meth:`Presence.start` (the first registration, before serving: a
refusal is an error) and :meth:`Presence.close` (the last words) run in the
caller's thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .endpoint import Endpoint
from .errors import EdaError
from .registry import access as reg
from .registry.model import Instance

if TYPE_CHECKING:
    from .registry.agent import Agent
    from .registry.client import Client
    from .registry.serverless import Announcer

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
        required: bool = False,
    ) -> None:
        """*record* comes from :func:`~eda.core.registry.access.registration`.

        With no registry known and mDNS off, nothing is registered (callers
        then need the endpoint) unless *required*: then that is an error
        (:class:`~eda.core.registry.client.NoRegistry`).  :attr:`mode` says
        which way it went: ``registry``, ``mdns`` or ``none``.
        """
        self.log, self.warn = log, warn
        self._stop = threading.Event()
        self._wake = threading.Event()  # a new status to say now
        self._thread: threading.Thread | None = None
        self._announcer: Announcer | None = None
        self._agent: Agent | None = None
        interval = float(record["interval"])  # type: ignore[arg-type]
        self.client: Client | None = None
        if required or access.serverless or access.endpoints or access.mdns:
            self.client = reg.connect_for_registration(access, interval)
        self.inst: Instance = reg.finish(record, self.client, access.interface)
        self.status = self.inst.status
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

    def _said(self, where: str) -> None:
        inst = self.inst
        at = Endpoint(inst.host, inst.port)
        self.log(f"registered {inst.service}/{inst.id} at {at} ({inst.status}) {where}")

    def start(self) -> Instance:
        """Register now (raises if a registry refuses), then keep it in the background."""
        if self.mode == "registry":
            from .registry.agent import Agent

            assert self.client is not None
            agent = Agent(self.client, self.inst, self.warn)
            self.inst = agent.register()
            self._agent = agent
            where = f"with registry {agent.registry}"
        elif self.mode == "mdns":
            from .registry.serverless import Announcer

            announcer = Announcer(self.inst, self.interface)
            announcer.start()
            self._announcer = announcer
            where = "by mDNS"
        else:
            self.log("not registered (no registry and mDNS off): callers need the endpoint")
            return self.inst
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()
        self._said(where)  # once kept: a script may stop the program as soon as it reads this
        return self.inst

    def set_status(self, status: str) -> None:
        """The instance's health is now *status*: told at once (from the background)."""
        self.status = status
        if self._thread is None:  # not started: the first registration carries it
            self.inst.status = status
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # never let a registry or mDNS end the thread
                if self._agent is not None:
                    self._wake.wait(self.inst.interval)
                    self._wake.clear()
                    if not self._stop.is_set():
                        self._agent.beat(self.status)
                else:
                    self._wake.wait(PROBE_EVERY if self.fell_back else None)
                    self._wake.clear()
                    self._announce()
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                self.warn(f"warning: keeping {self.inst.id} registered: {why}")
                self._stop.wait(1.0)

    def _announce(self) -> None:
        """By mDNS: say a new status; look for a registry to move to (when fell back)."""
        announcer = self._announcer
        if announcer is None or self._stop.is_set():
            return
        if announcer.inst.status != self.status:
            announcer.update(self.status)
        if not self.fell_back:
            return
        client = reg.answering_registry(self.access, self.inst.interval)
        if client is None:
            return
        from .registry.agent import Agent

        self.log(f"a registry appeared: moving {self.inst.id} to it")
        agent = Agent(client, self.inst, self.warn)
        self.inst.status = self.status
        try:
            self.inst = agent.register()
        except Exception as exc:  # refused or gone again: stay announced, try later
            client.close()
            self.log(f"a registry appeared but refused the registration: {exc}")
            return
        self.client, self._agent, self.mode = client, agent, "registry"
        self.log(f"{self.inst.id} moved to registry {agent.registry}")
        self._said(f"with registry {agent.registry}")
        self._announcer = None
        with contextlib.suppress(Exception):
            announcer.close()

    def close(self) -> None:
        """Deregister (best effort) and stop; safe to call twice."""
        self._stop.set()
        self._wake.set()
        stuck = False
        if self._thread is not None:
            # a signal (SIGTERM as Terminated) may have cut start() short while it launched
            # the thread: joining one whose start never returned raises, and must not
            with contextlib.suppress(RuntimeError):
                self._thread.join(3.0)
            stuck = self._thread.is_alive()  # still waiting on a registry: leave it its socket
            self._thread = None
        agent, self._agent = self._agent, None
        if agent is not None and not stuck:
            agent.deregister()
            self.log(f"deregistered {self.inst.id}")
        if self.client is not None and not stuck:
            self.client.close()
        self.client = None
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            with contextlib.suppress(Exception):
                announcer.close()
            self.log(f"deregistered {self.inst.id}")


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
