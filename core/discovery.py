"""Zero-configuration discovery: DNS-SD over mDNS, plus a cache for short-lived commands.

Long-running programs (subscribers, streaming publishers, registries) start
a zeroconf stack (:func:`make_zeroconf`), announce themselves
(:meth:`Discovery.announce`) and browse continuously
(:meth:`Discovery.browse`).  Short-lived ones ask once (:func:`discover`,
built on :func:`eda.core.mdns.one_shot_query`, which repeats its question
within the wait because multicast loses packets), helped by a cache of the
peers that answered before, with their endpoints:

* when every cached peer answers again, the query ends early;
* a cached peer whose answer was lost is still used if its endpoint
  answers a probe, and forgotten only when the connection fails;
* every endpoint is checked with a TCP connect and the first byte of the
  ZMTP greeting (concurrently, bounded in time) before it is used; one that
  refuses is remembered as dead for a while (with the peer id it claimed: a
  new peer on the same port is tried), so a forged announcement of a dead
  port costs one probe, not a wait; one that does not answer the probe in
  time is reported as unreachable, and costs :data:`PROBE_TIMEOUT` once,
  then :data:`QUICK_PROBE_TIMEOUT` per command for :data:`DEAD_FOR` seconds.

What a hostile LAN can make a browsing process do is bounded: names are
resolved by a small pool of threads from a bounded queue (a name that does
not resolve in time is dropped), and endpoints are probed before anyone
connects to them.

Service types are standard DNS-SD, so ``avahi-browse -r _eda-sub._tcp``
shows them.  TXT keys: ``id`` (peer id), ``p`` (space-separated patterns, or
the topic for a publisher), ``v`` (wire version), ``k`` (secure mode: the
peer's CURVE public key, Z85, 40 characters; absent when not secure).

Probing an endpoint (is a ZeroMQ peer listening there?) is :mod:`eda.core.probe`.
About 750 lines for a reason: this is the one module that drives zeroconf --
announcing, browsing, resolving on a bounded pool, the cache, the one-shot
question a command starts early in a thread (:func:`discover_soon`) -- and its
threads share the state of one :class:`Discovery`; split, a reader would have
to follow that state across files.
"""

from __future__ import annotations

import contextlib
import fcntl
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cache, codec, mdns
from .endpoint import Endpoint
from .errors import UsageError
from .probe import MAX_PROBES, probe, probeable

SUB_TYPE = "_eda-sub._tcp.local."
PUB_TYPE = "_eda-pub._tcp.local."
TXT_LIMIT = 200  # RFC 6763 6.2: keep each TXT string well under 255 bytes

DEAD_FOR = 30.0  # seconds an endpoint that refused (or stayed silent) is not probed again
CACHE_TTL = 3600.0  # a cached peer not confirmed for this long is forgotten
CACHE_MAX = 64  # peers remembered per service type
DEAD_KEY = "dead-endpoints"

RESOLVER_THREADS = 3  # threads resolving names that came without their records
MAX_PENDING = 64  # names waiting to be resolved; more are dropped (counted)
RESOLVE_TIMEOUT = 1.5  # seconds; a name that does not resolve by then is dropped
REGISTER_TIMEOUT = 5.0  # seconds for zeroconf's loop to take a registration


@dataclass(frozen=True)
class Peer:
    """A discovered eda process: its id, where to connect and what it carries."""

    id: str
    endpoint: str
    patterns: tuple[str, ...]
    name: str
    key: str = ""  # secure mode: the public key it announced (Z85), "" when not secure


@dataclass
class Found:
    """What :func:`discover` found: peers to use, and peers seen but not reachable."""

    peers: list[Peer] = field(default_factory=list)
    unreachable: list[Peer] = field(default_factory=list)  # announced, no answer to a probe
    cached: int = 0  # peers the cache knew before asking
    seen: list[Peer] = field(default_factory=list)  # those peers


def resolve_interface(value: str | None) -> str | None:
    """Map an interface name or IPv4 address to the IPv4 address to use.

    :class:`UsageError` when no interface has that name, or that address.
    """
    if not value:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if _is_ipv4(value):
            sock.bind((value, 0))  # only this host's addresses bind; nothing is sent
            return value
        packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", value.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])  # SIOCGIFADDR
    except OSError:
        if _is_ipv4(value):
            raise UsageError(f"no interface has the IPv4 address {value!r}") from None
        raise UsageError(f"no IPv4 address on interface {value!r}") from None
    finally:
        sock.close()


def _is_ipv4(value: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, value)
    except OSError:
        return False
    return True


def local_addresses(interface: str | None = None) -> list[str]:
    """IPv4 addresses to announce: *interface* alone, else all (loopback last)."""
    if interface:
        return [interface]
    import ifaddr

    found = [
        ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)
    ]
    outside = [a for a in found if not a.startswith("127.")]
    return outside + [a for a in found if a.startswith("127.")] or ["127.0.0.1"]


def make_zeroconf(interface: str | None = None) -> Any:
    """The one way eda starts a zeroconf stack: IPv4, on *interface* or on all."""
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    return Zeroconf(
        interfaces=[interface] if interface else InterfaceChoice.All,
        ip_version=IPVersion.V4Only,
    )


def _peer_from_instance(inst: mdns.Instance) -> Peer | None:
    """The peer an mDNS answer announces, or None when it lacks an id or a valid endpoint."""
    peer_id = inst.txt.get("id")
    address = inst.best_address()
    if not peer_id or not address:
        return None
    where = Endpoint.from_peer(Endpoint(address, inst.port).zmq)  # (IPv6 written bracketed)
    if where is None:
        return None
    patterns = tuple(inst.txt.get("p", "").split())
    return Peer(peer_id, where.zmq, patterns, inst.name, inst.txt.get("k", "")[:64])


# (endpoint, peer id) -> (until, wall clock; refused, or only silent)
Dead = dict[tuple[str, str], tuple[float, bool]]


def _dead_endpoints(now: float) -> Dead:
    dead: Dead = {}
    for entry in cache.cached_entries(DEAD_KEY):
        until = entry.get("until")
        if isinstance(until, (int, float)) and until > now:
            key = (str(entry.get("endpoint")), str(entry.get("id")))
            dead[key] = (float(until), entry.get("refused") is not False)
    return dead


def _remember_dead(dead: Dead) -> None:
    latest = sorted(dead.items(), key=lambda kv: -kv[1][0])[: 4 * CACHE_MAX]
    cache.remember_entries(
        DEAD_KEY,
        [{"endpoint": e, "id": i, "until": u, "refused": r} for (e, i), (u, r) in latest],
    )


def _key(peer: Peer) -> tuple[str, str]:
    return (peer.endpoint, peer.id)


def _cached_peers(service_type: str, now: float) -> dict[str, tuple[Peer, float]]:
    peers: dict[str, tuple[Peer, float]] = {}
    for entry in cache.cached_entries(service_type):
        try:
            peer = Peer(
                str(entry["id"]),
                str(entry["endpoint"]),
                tuple(str(p) for p in entry.get("patterns", ())),
                str(entry["name"]),
                str(entry.get("key", ""))[:64],
            )
            seen = float(entry["seen"])
        except (KeyError, TypeError, ValueError):
            continue
        if seen > now - CACHE_TTL and probeable(peer.endpoint) is not None:
            peers[peer.name.lower()] = (peer, seen)
    return peers


def discover(
    service_type: str,
    *,
    interface: str | None = None,
    timeout: float = 0.15,
    on_asked: Callable[[], None] | None = None,
) -> Found:
    """Peers of *service_type* now: those answering a one-shot query, and cached ones alive.

    Every endpoint is probed (:func:`probe`) before it is returned;
    the cache is updated with what was learned.  *on_asked* is called once the
    first mDNS question went out.
    """
    now = time.time()
    known = _cached_peers(service_type, now)
    dead = _dead_endpoints(now)
    answers = mdns.one_shot_query(
        service_type, interface=interface, timeout=timeout, expect=set(known), on_asked=on_asked
    )
    answered: dict[str, Peer] = {}
    found = Found(cached=len(known), seen=[peer for peer, _ in known.values()])
    for peer in map(_peer_from_instance, answers):
        if peer is None:
            continue
        marked = dead.get(_key(peer))
        if marked is None or not marked[1]:
            answered[peer.name.lower()] = peer  # silent a moment ago: asked again, quickly
    taken = {p.endpoint for p in answered.values()}
    # a cached peer whose endpoint another peer now answers for is gone (its port reused)
    silent = {
        name: (peer, seen)
        for name, (peer, seen) in known.items()
        if name not in answered and peer.endpoint not in taken
    }
    alive = probe(
        [p.endpoint for p in answered.values()]
        + [p.endpoint for p, _ in silent.values() if _key(p) not in dead],
        quick=[p.endpoint for p in answered.values() if _key(p) in dead],
    )
    keep: dict[str, tuple[Peer, float]] = {}
    for name, peer in answered.items():
        state = alive.get(peer.endpoint)
        if state:
            found.peers.append(peer)
            keep[name] = (peer, now)
        elif state is None:
            found.unreachable.append(peer)  # reported; probed only briefly next time
            dead[_key(peer)] = (now + DEAD_FOR, False)
        else:
            dead[_key(peer)] = (now + DEAD_FOR, True)  # refused: nobody is there
    for name, (peer, seen) in silent.items():
        state = alive.get(peer.endpoint)
        if state:
            found.peers.append(peer)
            keep[name] = (peer, now)
        elif state is False:
            dead[_key(peer)] = (now + DEAD_FOR, True)  # refused: forget it
        else:  # no answer (now, or a moment ago) is not proof: keep it, do not wait for it
            keep[name] = (peer, seen)
            dead.setdefault(_key(peer), (now + DEAD_FOR, False))
    found.peers = list({p.endpoint: p for p in found.peers}.values())  # one per endpoint
    newest = sorted(keep.values(), key=lambda ps: -ps[1])[:CACHE_MAX]
    cache.remember_entries(
        service_type,
        [
            {
                "name": p.name,
                "id": p.id,
                "endpoint": p.endpoint,
                "patterns": list(p.patterns),
                "key": p.key,
                "seen": s,
            }
            for p, s in sorted(newest, key=lambda ps: ps[0].name)
        ],
    )
    _remember_dead(dead)
    return found


class Pending:
    """A :func:`discover` running in a thread of its own since :func:`discover_soon`.

    A one-shot command's wait for mDNS answers (the question, the answers, then
    the settle for newcomers) needs no Python work, so it can run while the
    command imports click and pyzmq and makes its socket: started first, it
    is often over by the time the command needs its result.
    """

    def __init__(self, service_type: str, interface: str | None, timeout: float) -> None:
        self.asked = (service_type, interface, timeout)
        self._found: Found | None = None
        self._error: BaseException | None = None
        self._out = threading.Event()  # the first question went out (or never will)
        self._thread = threading.Thread(target=self._run, name="eda-discover", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        service_type, interface, timeout = self.asked
        try:
            self._found = discover(
                service_type, interface=interface, timeout=timeout, on_asked=self._out.set
            )
        except BaseException as exc:  # handed to result(), in the command's thread
            self._error = exc
        finally:
            self._out.set()

    def wait_asked(self, timeout: float = 0.1) -> None:
        """Wait (at most *timeout* s) until the question went out: the thread reading the
        cache and sending it would otherwise wait for the interpreter's lock while the
        command imports, and ask later."""
        self._out.wait(timeout)

    def result(self) -> Found:
        """What :func:`discover` found (waiting for it to end); its exception, if any."""
        if self in _soon:
            _soon.remove(self)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._found is not None
        return self._found

    def finish(self) -> None:
        """Let it end (it writes the cache last)."""
        self._thread.join()


_soon: list[Pending] = []  # started by discover_soon, result not taken yet


def discover_soon(
    service_type: str, *, interface: str | None = None, timeout: float = 0.15
) -> Pending:
    """:func:`discover`, started now in a thread (see :class:`Pending`).

    The same question asked again (service type, interface, timeout), before
    the first one's result was taken, gets the one already running: a
    program's entry point may ask as soon as its arguments say what the
    command will ask (:mod:`eda.cli.launch`), and the command, later, takes
    the answer.  A question whose result nobody took (the command failed
    first) is let end before the process exits: it writes the cache last.
    """
    asked = (service_type, interface, timeout)
    for pending in _soon:
        if pending.asked == asked:
            return pending
    if not _soon_exit:
        import atexit

        atexit.register(_finish_soon)
        _soon_exit.append(True)
    pending = Pending(service_type, interface, timeout)
    _soon.append(pending)
    return pending


_soon_exit: list[bool] = []  # [True] once _finish_soon is registered with atexit


def _finish_soon() -> None:
    while _soon:
        _soon.pop().finish()


def find_once(
    service_type: str, *, interface: str | None = None, timeout: float = 0.15
) -> list[Peer]:
    """Peers of *service_type* that can be connected to now (see :func:`discover`)."""
    return discover(service_type, interface=interface, timeout=timeout).peers


def txt_patterns(patterns: list[str]) -> str:
    """Patterns for a TXT record, cut to the RFC 6763 size advice.

    A cut list ends in ``>`` (matches any topic), so a publisher reading it
    errs on the side of "this subscriber may want my topic".
    """
    text = " ".join(patterns)
    if len(text) <= TXT_LIMIT:
        return text
    return text[: TXT_LIMIT - 2].rsplit(" ", 1)[0] + " >"


def may_want(peer: Peer, topic: str) -> bool:
    """Whether subscriber *peer* (by its announced patterns) may want events of *topic*.

    No patterns, or patterns that do not parse (a foreign or newer peer),
    count as "may want": only a clear no leaves a subscriber out.
    """
    from .topics import Matcher

    if not peer.patterns:
        return True
    try:
        return Matcher(peer.patterns)(topic)
    except Exception:
        return True


def instance_of(service_type: str, info: Any) -> mdns.Instance:
    """A resolved zeroconf ServiceInfo as an :class:`eda.core.mdns.Instance`."""
    txt: dict[str, str] = {}
    for k, v in list(info.properties.items())[: mdns.MAX_TXT_KEYS]:
        key = k.decode(errors="replace").lower() if isinstance(k, bytes) else str(k).lower()
        txt.setdefault(key, v.decode(errors="replace") if isinstance(v, bytes) else (v or ""))
    return mdns.Instance(
        info.name, info.port or 0, info.server or "", info.parsed_addresses()[:8], txt
    )


class _Resolver:
    """A small pool resolving browsed names; what does not fit or resolve in time is dropped."""

    def __init__(self, zc: Any, closed: Callable[[], bool]) -> None:
        self._zc = zc
        self._closed = closed
        self._names: queue.Queue[tuple[str, str, Callable[[mdns.Instance], None]]] = queue.Queue(
            MAX_PENDING
        )
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.dropped = 0

    def submit(self, service_type: str, name: str, done: Callable[[mdns.Instance], None]) -> None:
        """Resolve *name* from zeroconf's cache now, else queue it for the pool."""
        from zeroconf import ServiceInfo

        try:
            info = ServiceInfo(service_type, name)
        except Exception:  # a forged name zeroconf refuses (control characters, ...)
            self.dropped += 1  # (raising here would end zeroconf's browser thread)
            return
        with contextlib.suppress(Exception):
            if info.load_from_cache(self._zc) and info.port:
                done(instance_of(service_type, info))
                return
        key = (service_type, name.lower())
        with self._lock:
            if key in self._pending:
                return
            try:
                self._names.put_nowait((service_type, name, done))
            except queue.Full:
                self.dropped += 1
                return
            self._pending.add(key)
            if len(self._threads) < RESOLVER_THREADS:
                thread = threading.Thread(target=self._work, name="eda-resolve", daemon=True)
                self._threads.append(thread)
                thread.start()

    def cancel(self, service_type: str, name: str) -> None:
        with self._lock:
            self._pending.discard((service_type, name.lower()))

    def _work(self) -> None:
        from zeroconf import ServiceInfo

        while not self._closed():
            try:
                service_type, name, done = self._names.get(timeout=0.5)
            except queue.Empty:
                continue
            key = (service_type, name.lower())
            with self._lock:
                if key not in self._pending:
                    continue  # withdrawn while it waited
            info = ServiceInfo(service_type, name)
            try:
                ok = info.request(self._zc, int(RESOLVE_TIMEOUT * 1000)) and bool(info.port)
            except Exception:
                ok = False
            with self._lock:
                self._pending.discard(key)
            if ok and not self._closed():
                try:
                    done(instance_of(service_type, info))
                except Exception:  # (a bad record must not end a pool thread for good)
                    self.dropped += 1


class _Prober:
    """One thread that TCP-probes discovered peers in batches before they are handed on."""

    def __init__(self, closed: Callable[[], bool]) -> None:
        self._closed = closed
        self._peers: queue.Queue[tuple[Peer, Callable[[Peer], None]]] = queue.Queue(4 * MAX_PROBES)
        self._thread: threading.Thread | None = None
        self._dead: dict[tuple[str, str], float] = {}  # refused (endpoint, id) -> until
        self.dropped = 0
        self.refused = 0

    def submit(self, peer: Peer, done: Callable[[Peer], None]) -> None:
        if self._dead.get(_key(peer), 0.0) > time.monotonic():
            return
        try:
            self._peers.put_nowait((peer, done))
        except queue.Full:
            self.dropped += 1
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="eda-probe", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while not self._closed():
            try:
                batch = [self._peers.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(batch) < MAX_PROBES:
                try:
                    batch.append(self._peers.get_nowait())
                except queue.Empty:
                    break
            alive = probe(peer.endpoint for peer, _ in batch)
            now = time.monotonic()
            for peer, done in batch:
                if alive.get(peer.endpoint) is False:
                    self.refused += 1
                    self._dead[_key(peer)] = now + DEAD_FOR
                elif not self._closed():
                    done(peer)  # accepted, or no answer yet: the connection cap bounds it
            if len(self._dead) > 4096:
                self._dead = {e: t for e, t in self._dead.items() if t > now}


def _host_label(name: str) -> str:
    """*name* as a host name label: letters, digits and hyphens (RFC 952), at most 40."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in name)[:40] or "eda"


class Discovery:
    """One zeroconf stack per process: announce services, browse for peers."""

    def __init__(self, interface: str | None = None) -> None:
        self._interface = interface
        self._zc = make_zeroconf(interface)
        self._infos: list[Any] = []
        self._browsers: list[Any] = []
        self._closed = False
        self._resolver = _Resolver(self._zc, lambda: self._closed)
        self._prober = _Prober(lambda: self._closed)

    @property
    def zeroconf(self) -> Any:
        return self._zc

    def announce(
        self,
        service_type: str,
        name: str,
        port: int,
        txt: Mapping[str, str] | list[str],
        on_ready: Callable[[], None] | None = None,
        *,
        server: str | None = None,
        ttl: int | None = None,
        rename: bool = True,
        background: bool = True,
        unique: bool = False,
    ) -> Any:
        """Announce instance *name* of *service_type* (any DNS-SD type) on *port* with *txt*.

        Probing (about a second, RFC 6762 8.1) runs in a background thread
        unless *background* is false; *on_ready* is called once announced.
        With *unique* (a name and host name made from a random id of this
        process, which nobody else can hold), probing is skipped: queries are
        answered at once, *on_ready* is called then, and the announcements
        follow (RFC 6762 8.1 probes only to find a conflict, and there is none).
        *ttl* sets every record's TTL (short-lived records for instances that
        may die without a goodbye); *rename* allows a new name on conflict.
        Returns the zeroconf ServiceInfo (for :meth:`update` and :meth:`withdraw`).
        (Transition: a list as *txt* means the eda peer form,
        :meth:`announce_peer`, with *name* as the peer id.)
        """
        from zeroconf import ServiceInfo

        if isinstance(txt, list):
            return self.announce_peer(service_type, name, port, txt, on_ready)
        host = socket.gethostname().split(".")[0] or "eda"
        ttls: dict[str, Any] = {"host_ttl": ttl, "other_ttl": ttl} if ttl else {}
        info = ServiceInfo(
            service_type,
            f"{name}.{service_type}",
            port=port,
            addresses=[socket.inet_aton(a) for a in local_addresses(self._interface)],
            properties=dict(txt),
            server=server or f"{host}-{_host_label(name)}.local.",
            **ttls,
        )
        self._infos.append(info)

        def register() -> None:
            if unique:
                self._register_unique(info)
            else:
                self._zc.register_service(info, allow_name_change=rename)
            if on_ready is not None:
                on_ready()

        if not background:
            register()
            return info

        def register_quietly() -> None:
            with contextlib.suppress(Exception):
                register()

        threading.Thread(target=register_quietly, name="eda-announce", daemon=True).start()
        return info

    def _register_unique(self, info: Any) -> None:
        """Register *info* without probing; return once queries for it are answered
        (its announcements go on in zeroconf's loop)."""
        import asyncio

        registered = asyncio.run_coroutine_threadsafe(
            self._zc.async_register_service(info, cooperating_responders=True), self._zc.loop
        )
        registered.result(REGISTER_TIMEOUT)

    def update(self, info: Any, txt: Mapping[str, str]) -> Any:
        """Announce new TXT records for an instance :meth:`announce` returned; the new info."""
        from zeroconf import ServiceInfo

        new = ServiceInfo(
            info.type,
            info.name,
            port=info.port,
            addresses=info.addresses,
            properties=dict(txt),
            server=info.server,
            host_ttl=info.host_ttl,
            other_ttl=info.other_ttl,
        )
        self._zc.update_service(new)
        self._infos = [new if i is info else i for i in self._infos]
        return new

    def withdraw(self, info: Any) -> None:
        """Send goodbye packets (TTL 0) for *info* so browsers drop it at once."""
        with contextlib.suppress(Exception):
            self._zc.unregister_service(info)
        if info in self._infos:
            self._infos.remove(info)

    def announce_peer(
        self,
        service_type: str,
        peer_id: str,
        port: int,
        patterns: list[str],
        on_ready: Callable[[], None] | None = None,
        *,
        unique: bool = False,
        key: str | None = None,
    ) -> Any:
        """Announce this eda process (id, patterns, wire version in TXT).

        *unique*: the peer id is random and new for this process (no probing;
        see :meth:`announce`).  *key*: secure mode's public key (TXT ``k``).
        """
        txt = {"id": peer_id, "p": txt_patterns(patterns), "v": str(codec.VERSION)}
        if key is not None:
            txt["k"] = key
        kind = service_type.split(".")[0].lstrip("_")
        host = socket.gethostname().split(".")[0] or "eda"
        return self.announce(
            service_type,
            f"{kind}-{host}-{peer_id}",
            port,
            txt,
            on_ready,
            server=f"{host}-{peer_id}.local.",
            unique=unique,
        )

    def browse(
        self,
        service_type: str,
        on_peer: Callable[[Peer], None],
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        """Call *on_peer* (from another thread) for each reachable peer that appears.

        *on_gone* gets the instance name of a peer that withdrew (goodbye).
        Names are resolved by a bounded pool and endpoints probed first, so a
        flood of forged names or dead endpoints costs bounded threads and memory.
        """
        self.browse_instances(
            service_type,
            lambda inst: self._found(inst, on_peer),
            on_gone,
        )

    def browse_instances(
        self,
        service_type: str,
        on_instance: Callable[[mdns.Instance], None],
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        """Call *on_instance* for each instance of any DNS-SD type that appears or changes."""
        from zeroconf import ServiceBrowser, ServiceStateChange

        def changed(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if self._closed:
                return
            if state_change is ServiceStateChange.Removed:
                self._resolver.cancel(service_type, name)
                if on_gone is not None:
                    on_gone(name)
                return
            self._resolver.submit(service_type, name, on_instance)

        self._browsers.append(ServiceBrowser(self._zc, service_type, handlers=[changed]))

    def resolve(
        self, service_type: str, name: str, timeout: float = RESOLVE_TIMEOUT
    ) -> mdns.Instance | None:
        """Resolve one instance now (blocking, at most *timeout* s): the one resolve path."""
        from zeroconf import ServiceInfo

        try:
            info = ServiceInfo(service_type, name)
        except Exception:  # a name zeroconf refuses (control characters, ...)
            return None
        if self._closed or not info.request(self._zc, int(timeout * 1000)) or not info.port:
            return None
        return instance_of(service_type, info)

    def _found(self, inst: mdns.Instance, on_peer: Callable[[Peer], None]) -> None:
        peer = _peer_from_instance(inst)
        if peer is not None and not self._closed:
            self._prober.submit(peer, on_peer)

    @property
    def dropped(self) -> int:
        """Names and peers dropped because the pending queues were full."""
        return self._resolver.dropped + self._prober.dropped

    def close(self) -> None:
        """Withdraw announcements (goodbye packets) and stop browsing."""
        self._closed = True
        for browser in self._browsers:
            with contextlib.suppress(Exception):
                browser.cancel()
        with contextlib.suppress(Exception):
            self._zc.close()
