"""The registry's state: instances by service, expiry, and the change events.

Pure bookkeeping, single-threaded, time passed in: the server feeds it
requests, peer events and clock ticks, and publishes the events it returns.

Ownership and revisions (the replication model): the registry that receives
an instance's heartbeats *owns* it and is the only one that expires it.
Every change the owner makes bumps the record's ``rev``; an event's id is
``<instance id>@<rev>``, so the same change has the same id on every
registry.  A replica applies a peer's change only when its ``rev`` is newer
than what it holds (deletions win ties), which stops replication loops.
Replicas keep a peer's instances while that peer is alive; when it goes
silent they give them one TTL for their heartbeats to arrive elsewhere.

Bounded (CONVENTIONS §7): a registration of a new id past ``max_instances``
is refused (:class:`RegistryFull`, counted in ``refused_full``); heartbeats of
the instances held, and peers' replicated changes, are still taken (a
replica refusing them would never converge with its peer).  Tombstones are
kept :data:`TOMBSTONE_SECONDS`, at most :data:`MAX_TOMBSTONES` of them, the
oldest forgotten first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import EdaError, NotFoundError
from .model import (
    DEFAULT_MAX_INSTANCES,
    PASSING,
    Instance,
    InvalidRecord,
    from_dict,
    next_rev,
    validate_registry_id,
)

REGISTERED, DEREGISTERED, EXPIRED, HEALTH, UPDATED = (
    "registered",
    "deregistered",
    "expired",
    "health",
    "updated",
)
SYNC = "sync"  # ownership moved; replicated, never shown to watchers
DELETIONS = (DEREGISTERED, EXPIRED)
TOMBSTONE_SECONDS = 600.0
MAX_REASON = 200  # characters of a replicated event's reason
MAX_TOMBSTONES = 200_000  # deleted ids remembered (their revision), oldest forgotten first

Event = dict[str, Any]


@dataclass
class Entry:
    inst: Instance
    deadline: float  # unix time after which the registry drops it
    stale: bool = False  # loaded after a restart, not yet re-confirmed by a heartbeat


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(
    kind: str, inst: Instance, reason: str, registry: str, when: float, **extra: Any
) -> Event:
    """A change event: stable id (instance@revision), reason and the full record."""
    return {
        "id": f"{inst.id}@{inst.rev}",
        "type": kind,
        "reason": reason,
        "service": inst.service,
        "time": iso(when),
        "registry": registry,
        **extra,
        "instance": inst.to_dict(),
    }


class RegistryFull(EdaError):
    """A registration of a new instance past the registry's --max-instances."""


class Store:
    """Instances by id and by service, with their deadlines."""

    def __init__(
        self,
        registry_id: str,
        clock: Callable[[], float] = time.time,
        max_instances: int = DEFAULT_MAX_INSTANCES,
    ) -> None:
        self.id = registry_id
        self.clock = clock
        self.max_instances = max_instances
        self.refused_full = 0  # registrations refused by max_instances
        self.entries: dict[str, Entry] = {}
        self.services: dict[str, dict[str, Entry]] = {}
        self.tombstones: dict[str, tuple[int, float]] = {}
        self.live_peers: set[str] = set()
        self.seq = 0

    # -- events --------------------------------------------------------------
    def _event(self, kind: str, inst: Instance, reason: str, origin: str | None = None) -> Event:
        self.seq += 1
        return make_event(kind, inst, reason, origin or self.id, self.clock(), seq=self.seq)

    def _put(self, inst: Instance, deadline: float) -> Entry:
        entry = self.entries.get(inst.id)
        if entry is None:
            entry = Entry(inst, deadline)
            self.entries[inst.id] = entry
            self.services.setdefault(inst.service, {})[inst.id] = entry
        else:
            entry.inst, entry.deadline = inst, deadline
        entry.stale = False
        return entry

    def _drop(self, inst_id: str) -> Entry | None:
        entry = self.entries.pop(inst_id, None)
        if entry is not None:
            group = self.services.get(entry.inst.service, {})
            group.pop(inst_id, None)
            if not group:
                self.services.pop(entry.inst.service, None)
            self._bury(inst_id, entry.inst.rev)
        return entry

    def _bury(self, inst_id: str, rev: int) -> None:
        """Remember that *inst_id* was deleted at *rev* (bounded: oldest forgotten first)."""
        self.tombstones[inst_id] = (rev, self.clock())
        while len(self.tombstones) > MAX_TOMBSTONES:
            del self.tombstones[next(iter(self.tombstones))]

    def _tomb_rev(self, inst_id: str) -> int:
        return self.tombstones.get(inst_id, (-1, 0.0))[0]

    # -- requests from owners ---------------------------------------------------
    def heartbeat(
        self, inst: Instance, *, register: bool = False, late: float = 0.0
    ) -> list[Event]:
        """Accept a registration or heartbeat; this registry becomes the owner.

        *late*: seconds the heartbeat arrived late at least (:mod:`.lateness`); its TTL
        counts from when it was sent, and one sent a whole TTL ago or more says nothing
        of now: ignored, so it neither keeps nor revives the instance."""
        now = self.clock()
        if late >= inst.ttl and not register:
            return []
        now -= late
        inst.registry, inst.heartbeat = self.id, now
        entry = self.entries.get(inst.id)
        if entry is None:
            if len(self.entries) >= self.max_instances:
                self.refused_full += 1
                raise RegistryFull(
                    f"registry full: it holds {len(self.entries)} instances (--max-instances);"
                    f" {inst.id!r} not registered"
                )
            inst.registered = now if register or not inst.registered else inst.registered
            inst.rev = next_rev(max(inst.rev, self._tomb_rev(inst.id)))
            self._put(inst, now + inst.ttl)
            reason = "registered" if register else "re-learned from a heartbeat"
            return [self._event(REGISTERED, inst, reason)]
        old = entry.inst
        if old.service != inst.service:
            raise InvalidRecord(
                f"instance id {inst.id!r} is registered for service {old.service!r}"
            )
        inst.registered = old.registered
        kind, reason = "", ""
        if not old.same_registration(inst):
            kind, reason = UPDATED, "registration changed"
        elif old.status != inst.status:
            kind, reason = HEALTH, f"{old.status} -> {inst.status}"
        elif old.registry != self.id:
            kind, reason = SYNC, f"heartbeats moved here from registry {old.registry}"
        inst.rev = next_rev(old.rev) if kind else old.rev
        # a late heartbeat never shortens what a later one, come sooner, granted
        self._put(inst, max(now + inst.ttl, entry.deadline) if late else now + inst.ttl)
        return [self._event(kind, inst, reason)] if kind else []

    def deregister(self, inst_id: str, reason: str = "deregistered by its owner") -> list[Event]:
        entry = self._drop(inst_id)
        if entry is None:
            raise NotFoundError(f"no instance {inst_id!r}")
        entry.inst.rev = next_rev(entry.inst.rev)
        self.tombstones[inst_id] = (entry.inst.rev, self.clock())
        return [self._event(DEREGISTERED, entry.inst, reason)]

    def expire(self) -> list[Event]:
        """Drop instances whose deadline passed."""
        now = self.clock()
        events = []
        for entry in [e for e in self.entries.values() if e.deadline < now]:
            inst = entry.inst
            reason = (
                "no heartbeat since the registry restarted"
                if entry.stale
                else f"no heartbeat for {inst.ttl:g}s"
            )
            self._drop(inst.id)
            inst.rev = next_rev(inst.rev)
            self.tombstones[inst.id] = (inst.rev, now)
            events.append(self._event(EXPIRED, inst, reason))
        for key in [k for k, (_, t) in self.tombstones.items() if now - t > TOMBSTONE_SECONDS]:
            del self.tombstones[key]
        return events

    # -- queries ------------------------------------------------------------------
    def lookup(self, service: str, include_all: bool = False) -> list[Instance]:
        found = [
            e.inst
            for e in self.services.get(service, {}).values()
            if not e.stale and (include_all or e.inst.status == PASSING)
        ]
        return sorted(found, key=lambda i: i.id)

    def instances(self, service: str | None = None, *, with_stale: bool = False) -> list[Instance]:
        entries: Iterable[Entry] = (
            self.entries.values() if service is None else self.services.get(service, {}).values()
        )
        found = [e.inst for e in entries if with_stale or not e.stale]
        return sorted(found, key=lambda i: (i.service, i.id))

    # -- replication -----------------------------------------------------------------
    def _replica_deadline(self, inst: Instance) -> float:
        if inst.registry in self.live_peers:
            return math.inf
        return self.clock() + inst.ttl

    def apply_remote(self, event: Event) -> list[Event]:
        """Apply a peer's change if it is newer than ours; return it to re-publish."""
        kind = event.get("type")
        inst = from_dict(event.get("instance"))
        origin = validate_registry_id(event.get("registry", ""))
        reason = event.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON or not reason.isprintable():
            raise InvalidRecord("bad reason in a replicated event")
        entry = self.entries.get(inst.id)
        if kind in DELETIONS:
            if entry is None or inst.rev < entry.inst.rev:
                return []
            self._drop(inst.id)
            self.tombstones[inst.id] = (inst.rev, self.clock())
            return [self._event(str(kind), inst, reason, origin)]
        if kind not in (REGISTERED, HEALTH, UPDATED, SYNC):
            return []
        known = entry.inst.rev if entry is not None else self._tomb_rev(inst.id)
        if inst.rev <= known:
            return []
        self._put(inst, self._replica_deadline(inst))
        return [self._event(str(kind), inst, reason, origin)]

    def merge_peer(self, peer: str, records: list[Instance]) -> list[Event]:
        """Bring our copy of *peer*'s instances in line with its full list."""
        events: list[Event] = []
        seen = set()
        for inst in records:
            seen.add(inst.id)
            entry = self.entries.get(inst.id)
            if entry is None:
                # the owner holds it now: that beats a tombstone we made by expiring our
                # copy while the owner was silent (a partition), else we never re-learn it
                if inst.rev > self._tomb_rev(inst.id) or inst.registry == peer:
                    self._put(inst, self._replica_deadline(inst))
                    events.append(
                        self._event(REGISTERED, inst, f"replicated from registry {peer}", peer)
                    )
                continue
            old = entry.inst
            if inst.rev <= old.rev:
                if old.registry == peer:  # its owner confirms it: serve it again after a restart
                    entry.deadline, entry.stale = self._replica_deadline(old), False
                continue
            if not old.same_registration(inst):
                kind = UPDATED
            elif old.status != inst.status:
                kind = HEALTH
            else:
                kind = SYNC
            self._put(inst, self._replica_deadline(inst))
            events.append(self._event(kind, inst, f"replicated from registry {peer}", peer))
        for entry in [e for e in self.entries.values() if e.inst.registry == peer]:
            if entry.inst.id not in seen:
                self._drop(entry.inst.id)
                entry.inst.rev = next_rev(entry.inst.rev)
                self.tombstones[entry.inst.id] = (entry.inst.rev, self.clock())
                events.append(
                    self._event(DEREGISTERED, entry.inst, f"no longer held by registry {peer}")
                )
        return events

    def peer_alive(self, peer: str) -> None:
        self.live_peers.add(peer)
        for entry in self.entries.values():
            if entry.inst.registry == peer:
                entry.deadline = math.inf

    def peer_lost(self, peer: str) -> None:
        """*peer* went silent: its instances get one TTL to heartbeat somewhere else."""
        self.live_peers.discard(peer)
        now = self.clock()
        for entry in self.entries.values():
            if entry.inst.registry == peer:
                entry.deadline = min(entry.deadline, now + entry.inst.ttl)

    # -- persistence ---------------------------------------------------------------------
    def restore(self, records: list[Instance], seq: int) -> None:
        """Load persisted records after a restart.

        A record still inside its TTL (counted from its last heartbeat) is
        served at once.  One whose TTL ran out while the registry was down is
        kept aside, not served: if its owner is alive its next heartbeat
        revives it silently; otherwise it expires after two heartbeat intervals.
        """
        now = self.clock()
        self.seq = seq
        for inst in records:
            last = inst.heartbeat or inst.registered
            deadline = last + inst.ttl
            entry = self._put(inst, deadline if deadline >= now else now + 2 * inst.interval)
            entry.stale = deadline < now
