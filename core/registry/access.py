"""Using the registry from any program: find instances, register one, follow changes.

One call each, with the same rules for every caller (``eda-registry``'s
subcommands today, a load balancer tomorrow):

- :func:`lookup` -- the passing instances of a service (``include_all`` for
  every instance), from a registry if one is known or answers, else from the
  LAN by mDNS (serverless mode), unless mDNS is off.
- :func:`registration` -- a validated record with the defaults ``register``
  uses (TTL three heartbeat intervals, an id stable per service, host, port).
- :func:`connect_for_registration` and :func:`default_host` -- which
  registry an instance registers with (none: serverless), and which of this
  host's addresses it publishes.
- :func:`changes` -- the change stream of a service, from a registry or by
  polling the LAN.

Records that come back from a registry or the LAN are validated again here
(:func:`~.model.from_dict`): a misbehaving registry cannot hand a caller an
out-of-range port or a record that breaks printing; such records are left
out and counted in :attr:`Access.dropped`.

Secure mode (:mod:`eda.core.security` on): registries are used under trusted
keys only (the client base pins them; :attr:`Access.on_ignored` hears of the
announced ones skipped), a record carries its registrant's proven key, and an
instance registered by mDNS announces this process's key.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from .. import metrics
from .. import security as secure_mode
from ..errors import EdaError, UsageError
from .client import Client, NoRegistry, local_address_towards
from .model import (
    PASSING,
    Instance,
    InvalidRecord,
    default_id,
    from_dict,
    parse_meta,
    validate_id,
    validate_name,
)
from .store import Event

Log = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


DEFAULT_TTL, DEFAULT_INTERVAL = 6.0, 2.0


@dataclass
class Access:
    """How to reach registries: explicit endpoints, the interface, whether mDNS may be used.

    *registries* items may each hold several endpoints separated by commas or
    spaces (as ``EDA_REGISTRY`` does).  *serverless* skips registries: mDNS only.
    """

    registries: tuple[str, ...] = ()
    interface: str | None = None  # an IPv4 address (see :func:`resolve_interface`)
    mdns: bool = True
    serverless: bool = False
    timeout: float = 1.0
    log: Log = _quiet  # diagnostics: which way an answer was found
    dropped: int = 0  # invalid records received from a registry or the LAN
    # set when registries seen before (cached, announced) did not answer and the
    # answer came from the LAN by mDNS instead: what to tell the user
    registry_down: str = ""
    # secure mode: a registry announced by mDNS and skipped, and why (untrusted, not secure)
    on_ignored: Callable[[Any, str], None] | None = None

    @property
    def security(self) -> secure_mode.Security | None:
        """The process's secure mode (None: plain)."""
        return secure_mode.active()

    @property
    def endpoints(self) -> list[str]:
        return [e for item in self.registries for e in item.replace(",", " ").split()]

    def client(self, timeout: float | None = None) -> Client:
        client = Client(
            self.endpoints,
            interface=self.interface,
            use_mdns=self.mdns,
            timeout=self.timeout if timeout is None else timeout,
        )
        client.on_ignored = self.on_ignored
        return client

    def valid(self, records: Iterable[object]) -> list[Instance]:
        """*records* that validate; the others are counted in :attr:`dropped`."""
        kept = []
        for data in records:
            try:
                kept.append(from_dict(data))
            except InvalidRecord:
                self.dropped += 1
        return kept


def resolve_interface(interface: str | None) -> str | None:
    """The IPv4 address for an interface name or address (discovery imported only if needed)."""
    if not interface:
        return None
    from .. import discovery

    return discovery.resolve_interface(interface)


# -- finding instances ----------------------------------------
def query(op: str, service: str | None, include_all: bool, access: Access) -> list[Instance]:
    """``lookup`` (passing, or every instance with *include_all*) or ``list`` (every one).

    When registries seen before refuse connections and the answer comes from
    the LAN instead, :attr:`Access.registry_down` says so (for the caller to
    tell the user: a registry that is down is not an empty one).

    Raises :class:`~.client.NoRegistry` when no registry is known and mDNS is
    off, :class:`~.client.RegistryUnavailable` when known registries do not answer.
    """
    if op not in ("lookup", "list"):
        raise ValueError(f"unknown query {op!r}")
    name = validate_name(service) if service is not None else None
    access.registry_down = ""  # (an Access may be used for many queries)
    if not access.serverless:
        client = access.client()
        try:
            msg: dict[str, Any] = {"op": op, "all": include_all}
            if name is not None:
                msg["service"] = name
            reply = client.request(msg)
            records = reply.get("instances")
            return access.valid(records if isinstance(records, list) else [])
        except NoRegistry:
            if not access.mdns:
                raise
            if client.unreachable:
                access.registry_down = client.down_message()
            access.log("no registry found: asking the LAN by mDNS (serverless mode)")
        finally:
            client.close()
    from . import serverless

    if name is None:
        return serverless.query(access.interface, log=access.log)
    found = serverless.lookup(name, include_all or op == "list", access.interface, log=access.log)
    return [i for i in found if i.service == name]


def deregister(inst_id: str, access: Access) -> None:
    """Remove instance *inst_id* from the registry (an operator's fix for a stuck entry).

    Raises :class:`~eda.core.errors.NotFoundError` when the registry has no such
    instance, :class:`~.client.NoRegistry` when no registry is known: an mDNS
    announcement belongs to its announcer, and only it can withdraw it.  A
    live owner's next heartbeat registers the instance again.
    """
    inst_id = validate_id(inst_id)
    client = access.client()
    try:
        client.request({"op": "deregister", "id": inst_id, "operator": True})
    finally:
        client.close()


def services(access: Access) -> list[dict[str, Any]]:
    """Every service with its instance counts, sorted by name, as ``consul catalog services``.

    Each item: ``service``, ``instances`` (how many are registered) and
    ``passing`` (how many of them pass their health check).
    """
    counts: dict[str, list[int]] = {}
    for inst in query("list", None, True, access):
        count = counts.setdefault(inst.service, [0, 0])
        count[0] += 1
        count[1] += inst.status == PASSING
    return [
        {"service": name, "instances": total, "passing": passing}
        for name, (total, passing) in sorted(counts.items())
    ]


def lookup(service: str, access: Access | None = None, include_all: bool = False) -> list[Instance]:
    """The passing instances of *service* (every instance with *include_all*), sorted by id.

    The one call a load balancer needs for its backends.
    """
    return query("lookup", service, include_all, access or Access())


# -- registering ----------------------------------------
def registration(
    name: str,
    port: int,
    *,
    host: str | None = None,
    inst_id: str | None = None,
    meta: Iterable[str] = (),
    weight: int = 1,
    ttl: float | None = None,
    interval: float | None = None,
) -> dict[str, Any]:
    """A validated record as a dict; a host left None is chosen by :func:`finish`.

    Defaults: TTL three heartbeat intervals, or 6 s; interval a third of the
    TTL, or 2 s.  Raises :class:`~.model.InvalidRecord` on bad input, before
    any network work.
    """
    if ttl is None:
        ttl = round(3 * interval, 3) if interval else DEFAULT_TTL
    if interval is None:
        interval = round(ttl / 3, 3)
    record: dict[str, Any] = {
        "service": name,
        "host": host,
        "port": port,
        "weight": weight,
        "meta": parse_meta((*meta, *metrics.meta())),  # where its /metrics is, if served
        "ttl": ttl,
        "interval": interval,
    }
    if inst_id:
        record["id"] = inst_id
    from_dict({**record, "host": host or "127.0.0.1"})  # refuse bad input now
    return record


def finish(record: dict[str, Any], client: Client | None, interface: str | None) -> Instance:
    """The instance to register: the default host (see :func:`default_host`) and id filled
    in; in secure mode this process's public key (what an mDNS announcement carries; a
    registry sets the key the handshake proves instead)."""
    record = dict(record)
    active = secure_mode.active()
    record["key"] = active.public_key if active is not None else ""
    if record.get("host") is None:
        record["host"] = default_host(client, interface)
    if "id" not in record:
        service = validate_name(record["service"])
        record["id"] = default_id(service, str(record["host"]), int(record["port"]))
    return from_dict(record)


def heartbeat_timeout(interval: float) -> float:
    """How long a registration waits for each registry reply: within one heartbeat interval."""
    return min(1.0, max(0.3, interval))


def connect_for_registration(access: Access, interval: float) -> Client | None:
    """A client of the registry to register with, or None for serverless mode.

    With explicit registries the client is returned as is (its first request
    says whether they answer).  Otherwise a registry that answers now, else
    None (serverless) -- unless mDNS is off: then :class:`~.client.NoRegistry`.
    """
    if access.serverless:
        if not access.mdns:
            raise UsageError("with --no-mdns, give --registry")
        return None
    client = access.client(heartbeat_timeout(interval))
    if access.endpoints:
        return client
    try:
        client.hello()
    except NoRegistry:
        client.close()
        if not access.mdns:
            raise
        access.log("no registry found: serverless mode (mDNS only)")
        return None
    return client


def answering_registry(access: Access, interval: float) -> Client | None:
    """A client of a registry that answers now, else None (quietly): the serverless probe."""
    client = Access(interface=access.interface, mdns=True).client(heartbeat_timeout(interval))
    try:
        client.hello()
    except EdaError:
        client.close()
        return None
    return client


def default_host(client: Client | None, interface: str | None) -> str:
    """The address to publish: the interface's, else the one facing the registry, else ours."""
    from ..discovery import local_addresses

    if interface:
        return interface
    if client is not None and client.current:
        return local_address_towards(client.current)
    return local_addresses(None)[0]


# -- following changes ----------------------------------------
def changes(
    service: str | None, access: Access, *, snapshot: bool = False, warn: Log = _quiet
) -> Generator[Event, None, None]:
    """Change events of *service* (every service if None), forever.

    From a registry (surviving restarts and failover; see :mod:`.watch`),
    else, when none is known and mDNS is allowed, by polling the LAN.  With
    *snapshot* the current instances come first, as type ``present``.
    Closing the generator releases every socket.
    """
    from . import serverless
    from .watch import Watcher

    name = validate_name(service) if service is not None else None
    if not access.serverless:
        client = access.client()
        watcher = Watcher(client, name, warn)
        try:
            try:
                initial = watcher.start(snapshot)
            except NoRegistry:
                if not access.mdns:
                    raise
                if client.unreachable:
                    access.registry_down = client.down_message()
                    warn(f"warning: {access.registry_down}; watching the LAN by mDNS instead")
                access.log("no registry found: watching the LAN by mDNS (serverless mode)")
            else:
                access.log(f"watching registry {client.registry_id} at {client.current}")
                yield from initial
                yield from watcher.follow()
                return
        finally:
            watcher.close()
            client.close()
    yield from serverless.watch(name, snapshot=snapshot, interface=access.interface,
                                log=access.log)  # fmt: skip
