"""How 2PC daemons find each other, and stay findable.

A participant or a coordinator is found by name: an explicit endpoint
(``--peer``), else the registry, else mDNS (:class:`Directory`; in a daemon
its lookups run in a background thread, :class:`Lookups`, never in the poll
loop).  A daemon stays registered through :class:`Registration` (the work is
:class:`~eda.core.presence.Presence`'s).

Secure mode: what is found carries the key to pin (:func:`usable`): a
registry record's key (the one its registry's handshake proved) or the
announced ``k=``; an instance whose key is missing or not trusted is never
used, and the lookup says why (:meth:`Directory.missing`).  An explicit
``--peer NAME=KEY@tcp://HOST:PORT`` names a trusted key (:func:`parse_peers`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

from .. import reqrep, security
from ..daemon import Daemon
from ..endpoint import Endpoint
from ..errors import EdaError, UsageError
from ..limits import BoundedMap
from ..reqrep import client_endpoint
from .protocol import COORDINATOR_SERVICE, TxnError, check_name, printable

Ignored = Callable[[Any, str], None]  # (peer: id, endpoint, key; why) of an instance skipped
MAX_SKIPPED = 1024  # names whose last lookup skipped instances, remembered for the reason
# names whose answer is kept (a commit names any participant it likes: a flood of made-up
# names forgets the least recently used ones, counted in Lookups.cache.evicted)
MAX_NAMES = 4096


def _quiet(_text: str) -> None:
    pass


class LookupFailed(TxnError):
    """A lookup that got no answer (no registry answered): it says nothing about the name."""


def participant_service(name: str) -> str:
    """The registry service a participant registers as: ``txn-NAME``."""
    return f"txn-{name}".lower()


class Lookups:
    """Lookups by name run in one background thread, never in the daemon's loop.

    :meth:`get` answers at once: the endpoints known for a name (kept *ttl*
    seconds; a name not found, *miss_ttl* seconds), or ``None`` while a
    lookup of it is under way.  An answer past its *ttl* is still given
    while a fresh lookup runs (a known participant never waits on mDNS).
    A lookup that fails (*find* raises: no registry answered) changes
    nothing known: the endpoints found before stay in use, looked up again
    after *miss_ttl*; a name never found is answered ``[]`` with the failure
    in :attr:`failed` (a reason, never "not found").
    When a lookup ends, the daemon's loop is woken (a pipe it watches,
    :meth:`attach`) and *on_found* hears the names looked up since.  At
    most *max_pending* names wait for a lookup; more are answered "not
    found" at once (a flood of made-up names cannot grow the queue), and
    the answers of at most *max_names* names are kept, the least recently
    used forgotten first (counted: ``cache.evicted``).
    """

    def __init__(
        self,
        find: Callable[[str], list[str]],
        *,
        ttl: float = 30.0,
        miss_ttl: float = 1.0,
        max_pending: int = 256,
        max_names: int = MAX_NAMES,
    ) -> None:
        self.find = find
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self.max_pending = max_pending
        # name -> (when found, endpoints); read and written under _lock (its reads move keys)
        self.cache: BoundedMap[str, tuple[float, list[str]]] = BoundedMap(max_names)
        self.pending: set[str] = set()  # queued or being looked up
        self.failed: dict[str, str] = {}  # name -> why its last lookup got no answer
        self.previous: dict[str, list[str]] = {}  # found, then declared stale: a fallback
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[str] = []
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self.on_found: Callable[[list[str]], None] | None = None

    def attach(self, daemon: Daemon, on_found: Callable[[list[str]], None]) -> None:
        """Have *daemon*'s loop call *on_found(names)* when lookups of *names* ended."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.on_found = on_found
        daemon.watch(self._wake_r, "lookups", self._woken)

    def get(self, name: str) -> list[str] | None:
        with self._lock:
            hit = self.cache.get(name)
        now = time.monotonic()
        if hit is not None and now - hit[0] < (self.ttl if hit[1] else self.miss_ttl):
            return hit[1]
        if name not in self.pending:
            if len(self.pending) >= self.max_pending:
                return hit[1] if hit is not None else []
            self.pending.add(name)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="txn-lookups", daemon=True)
                self._thread.start()
            self._queue.put(name)
        return hit[1] if hit is not None and hit[1] else None

    def stale(self, name: str) -> None:
        """Look *name* up afresh before using it again (an endpoint stopped answering);
        what was found stays the answer should that lookup get no answer."""
        with self._lock:
            hit = self.cache.pop(name, None)
        if hit is not None and hit[1] and len(self.previous) < 4 * self.max_pending:
            self.previous[name] = hit[1]

    def _run(self) -> None:
        while True:
            name = self._queue.get()
            if name is None:
                return
            found, failure = self._find(name)
            with self._lock:  # (close takes it too: never a write to a closed descriptor)
                self._store(name, found, failure)
                self.pending.discard(name)
                self._done.append(name)
                if self._wake_w >= 0:
                    with contextlib.suppress(OSError):  # full pipe: a wake-up is already due
                        os.write(self._wake_w, b"x")

    def _find(self, name: str) -> tuple[list[str], str | None]:
        """What *find* says of *name*, or why it could not say (the loop goes on)."""
        try:
            return list(self.find(name)), None
        except Exception as exc:
            return [], printable(exc, 200) or type(exc).__name__

    def _store(self, name: str, found: list[str], failure: str | None) -> None:
        now = time.monotonic()
        previous = self.previous.pop(name, None)
        if failure is None:
            self.failed.pop(name, None)
            self.cache[name] = (now, found)
            return
        if len(self.failed) < 4 * self.max_pending or name in self.failed:
            self.failed[name] = failure
        old = self.cache.get(name)
        known = old[1] if old is not None and old[1] else previous
        if known:  # keep what was found; look again after miss_ttl
            self.cache[name] = (now - self.ttl + self.miss_ttl, known)
        else:
            self.cache[name] = (now, [])

    def lookup_now(self, name: str) -> list[str]:
        """Look *name* up in the calling thread (a command), with the same rules."""
        with self._lock:
            hit = self.cache.get(name)
        if hit is None or time.monotonic() - hit[0] >= (self.ttl if hit[1] else self.miss_ttl):
            found, failure = self._find(name)
            with self._lock:
                self._store(name, found, failure)
                hit = self.cache[name]
        return hit[1]

    def _woken(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        with self._lock:
            done, self._done = self._done, []
        if done and self.on_found is not None:
            self.on_found(done)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
        with self._lock:
            fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)


class Directory:
    """Endpoints by name: explicit ones, else what the registry or mDNS said (cached).

    *find* (name -> endpoints) is the lookup; by default the registry (or
    mDNS without one) through :func:`eda.core.registry.access.lookup`.  In a
    daemon (:meth:`attach`) lookups run in a background thread
    (:class:`Lookups`) and :meth:`endpoints` may answer ``None``: "being
    looked up, you will hear"; elsewhere (a command) they block.  Answers are
    kept *ttl* seconds, dropped at once by :meth:`stale` when an endpoint
    stops answering; a name not found is not looked up again for *miss_ttl*
    seconds.
    """

    def __init__(
        self,
        explicit: Mapping[str, Endpoint | str] | None = None,
        *,
        access: Any = None,
        find: Callable[[str], list[str]] | None = None,
        ttl: float = 30.0,
        miss_ttl: float = 1.0,
    ) -> None:
        self.explicit = {
            name: client_endpoint(where, f"peer {name}").zmq
            for name, where in (explicit or {}).items()
        }
        self.access = access
        self.lookups = Lookups(find or self._lookup, ttl=ttl, miss_ttl=miss_ttl)
        self.attached = False
        # secure mode: instances skipped (untrusted or no key); cli/secure.py reports them
        self.security = security.active()
        self.on_ignored: Ignored | None = None
        self.on_refused: Callable[[str, str], None] | None = None  # (set by secure_reports)
        self.on_skipped: Callable[[str], None] | None = None  # an announcement left out
        self.skipped: dict[str, str] = {}  # name -> why its instances were not used

    def _lookup(self, name: str) -> list[str]:
        if self.access is None:
            return []
        skipped: list[str] = []

        def ignored(peer: Any, why: str) -> None:  # a registry record
            skipped.append(f"{peer.endpoint}: {why}")
            if self.on_ignored is not None:
                self.on_ignored(peer, why)

        def heard(text: str) -> None:  # an announcement the lookup left out
            skipped.append(text.removeprefix("ignoring "))
            if self.on_skipped is not None:
                self.on_skipped(text)

        service = participant_service(name)
        found = usable(find_instances(service, self.access, skipped=heard), ignored)
        if skipped and (name in self.skipped or len(self.skipped) < MAX_SKIPPED):
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            self.skipped[name] = skipped[0] + more
        elif not skipped:
            self.skipped.pop(name, None)
        return found

    def attach(self, daemon: Daemon, on_found: Callable[[list[str]], None]) -> None:
        """Look up in the background from now on; *on_found* (in *daemon*'s loop) hears
        which names a lookup ended for."""
        self.lookups.attach(daemon, on_found)
        self.attached = True

    def endpoints(self, name: str) -> list[str] | None:
        """Where *name* is (``[]``: not found); ``None`` while it is being looked up."""
        if name in self.explicit:
            return [self.explicit[name]]
        if not self.attached:  # a command: just look
            return self.lookups.lookup_now(name)
        return self.lookups.get(name)

    def missing(self, name: str) -> str:
        """Why participant *name* has no endpoint: not found, or no registry answered."""
        failure = self.lookups.failed.get(name)
        if failure is not None:
            return f"participant {name} could not be looked up: {failure}"
        skipped = self.skipped.get(name)
        if skipped is not None:
            return f"participant {name} not found (ignored {skipped})"
        return f"participant {name} not found"

    def stale(self, name: str) -> None:
        self.lookups.stale(name)

    def close(self) -> None:
        self.lookups.close()


def find_instances(
    service: str,
    access: Any,
    keep: Callable[[Any], bool] = lambda _inst: True,
    skipped: Callable[[str], None] | None = None,
) -> list[Any]:
    """The instances of *service* that *keep* accepts: the registry's; where it has
    none (daemons that announced themselves by mDNS before it started) or does not
    answer, what mDNS knows.  *skipped* hears of each announcement secure mode left
    out (an untrusted or missing key: one line each).

    Raises :class:`LookupFailed` when no registry answered and mDNS knows
    nothing either: that is no answer, not "not found".
    """
    from ..registry import access as reg
    from ..registry import serverless
    from ..registry.client import NoRegistry

    failure: EdaError | None = None
    try:
        found = [i for i in reg.lookup(service, access) if keep(i)]
    except NoRegistry:  # none known and mDNS off: nothing can be found
        return []
    except EdaError as exc:
        failure, found = exc, []
    if not found and not access.serverless and access.mdns:
        heard = serverless.lookup(service, False, access.interface, log=skipped or _quiet)
        found = [i for i in heard if i.service == service and keep(i)]
    if not found and failure is not None:
        raise LookupFailed(str(failure))
    return found


def usable(instances: Iterable[Any], on_ignored: Ignored | None = None) -> list[str]:
    """The endpoints of *instances* (registry records) this process may ask.

    Secure mode: only those whose key (as their registry's handshake proved it,
    or announced) is trusted, each key pinned for the connection
    (:func:`eda.core.reqrep.pin`); secure and plain never mix.  Each one skipped is
    told to *on_ignored* as (peer, why), the peer with ``id``, ``endpoint``, ``key``.
    """
    found: list[str] = []
    for inst in instances:
        endpoint = Endpoint(inst.host, inst.port)
        key, why = security.admission(inst.key)
        if key is None:
            if on_ignored is not None:
                on_ignored(SimpleNamespace(id=inst.id, endpoint=endpoint.zmq, key=inst.key), why)
            continue
        if key:
            reqrep.pin(endpoint, key)
        found.append(endpoint.zmq)
    return found


def pin_trusted(endpoint: str, key: object) -> None:
    """Secure mode: pin *key* (Z85 text, as a journal records it) for the server at
    *endpoint* if this process trusts it; else nothing is pinned, so nothing connects."""
    where = Endpoint.from_peer(endpoint)
    if security.active() is None or where is None or not isinstance(key, str):
        return
    pinned, _ = security.admission(key)
    if pinned:
        reqrep.pin(where, pinned)


def find_coordinators(
    access: Any,
    name: str | None = None,
    on_ignored: Ignored | None = None,
    skipped: Callable[[str], None] | None = None,
) -> list[str]:
    """Endpoints of coordinators (the one called *name* only), from the registry or mDNS
    (secure mode: trusted keys only, see :func:`usable` and :func:`find_instances`)."""
    found = find_instances(
        COORDINATOR_SERVICE, access, lambda i: name is None or i.meta.get("name") == name,
        skipped,
    )  # fmt: skip
    return usable(found, on_ignored)


class Registration:
    """Keeps a daemon registered under *service* while it runs.

    The work is :class:`~eda.core.presence.Presence`'s, as for eda-lb and
    ``eda-registry register``: with a registry, heartbeats from its thread,
    never from the daemon's loop (a stopped registry must not stall 2PC);
    without one, announced by mDNS (serverless mode) -- and, when that was
    for want of a registry, moved to one as soon as one answers, so that
    coordinators asking it find participants.  This class only says what a
    2PC daemon registers as.
    """

    def __init__(
        self,
        daemon: Daemon,
        service: str,
        port: int,
        access: Any,
        *,
        inst_id: str | None = None,
        meta: Mapping[str, str] | None = None,
        interval: float = 2.0,
    ) -> None:
        from ..presence import Presence
        from ..registry import access as reg

        record = reg.registration(
            service,
            port,
            inst_id=inst_id,
            meta=[f"{k}={v}" for k, v in (meta or {}).items()],
            interval=interval,
        )
        self.presence = Presence(access, record, log=daemon.log, warn=daemon.warn)
        self.inst = self.presence.start()

    @property
    def where(self) -> str:
        client = self.presence.client
        if self.presence.mode == "registry" and client is not None:
            return f"registry {client.registry_id}"
        return "mDNS" if self.presence.mode == "mdns" else "nothing"

    def close(self) -> None:
        self.presence.close()


def parse_peers(items: list[str] | tuple[str, ...]) -> dict[str, Endpoint]:
    """``NAME=tcp://HOST:PORT`` items as a dict (``--peer``); a malformed one is a
    :class:`UsageError` naming the option.  Secure mode: ``NAME=KEY@tcp://HOST:PORT``,
    KEY a trusted name (eda-keys list), whose key is pinned for that endpoint."""
    active = security.active()
    peers: dict[str, Endpoint] = {}
    for item in items:
        name, sep, where = item.partition("=")
        if not sep:
            raise UsageError(f"bad peer {item[:80]!r}: use NAME=tcp://HOST:PORT")
        option = f"--peer {check_name(name, 'participant name')}"
        key = None
        if active is not None:
            key, where = active.pinned(where, option=option)
        endpoint = client_endpoint(where, option)
        if key is not None:
            reqrep.pin(endpoint, key)
        peers[name] = endpoint
    return peers
