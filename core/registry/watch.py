"""Following a registry's change stream safely across reconnects.

The watcher subscribes first, waits for the registry's tick (its
subscription is live), then takes a snapshot (the clone pattern): events
numbered at or below the snapshot's ``seq`` are already in it.  It keeps
each instance's latest revision, so a change seen twice (from two
registries, or after a reconnect) is printed once.  When the registry goes
silent it fails over, takes a new snapshot and reports only the real
differences, marked ``"resync": true``: stale events are never replayed as new.

Everything a registry sends is checked before use: a hello without a valid
stream port is a failed connection; snapshot records and change events whose
record does not validate (:func:`~.model.from_dict`), whose ``seq`` is not a
sequence number or whose type is unknown are skipped and counted in
:attr:`Watcher.dropped`, so a misbehaving registry cannot stop the watch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from .. import reqrep, security
from ..errors import EdaError
from ..sockets import connect, new_socket
from . import protocol
from .client import Client
from .model import MAX_REV, InvalidRecord, from_dict
from .store import (
    DELETIONS,
    DEREGISTERED,
    EXPIRED,
    HEALTH,
    REGISTERED,
    SYNC,
    UPDATED,
    Event,
    iso,
)

KINDS = (REGISTERED, DEREGISTERED, EXPIRED, HEALTH, UPDATED, SYNC)


def _seq(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REV:
        return None
    return value


def _record(data: object) -> dict[str, Any] | None:
    """A registry's record, validated and normalised, or None."""
    try:
        return from_dict(data).to_dict()
    except InvalidRecord:
        return None


def _tick(value: object) -> float:
    """The tick a registry's hello announces, within (0, :data:`~.protocol.MAX_TICK`]:
    a registry claiming a longer one would keep a watcher waiting on a dead stream for
    :data:`SILENT_TICKS` of them."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if number and isinstance(value, (int, float)) and 0 < value <= protocol.MAX_TICK:
        return float(value)  # (NaN is in no range)
    limit = f"{protocol.MAX_TICK:g}s"  # (a huge int is not shown)
    raise protocol.RemoteError(f"the registry sent a malformed hello (tick: not in (0, {limit}])")


SILENT_TICKS = 6  # ticks without a message: the registry went silent
PRESENT = "present"


class Watcher:
    """Yields change events for one service (or every service)."""

    def __init__(self, client: Client, service: str | None, log: Callable[[str], None]) -> None:
        self.client = client
        self.service = service
        self.log = log
        self.state: dict[str, dict[str, Any]] = {}  # instance id -> record
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sub: zmq.Socket[bytes] | None = None
        self.silence = 3.0
        self.seq = 0
        self.dropped = 0  # malformed records and events from the registry

    def start(self, snapshot: bool = False) -> list[Event]:
        """Connect and take the first snapshot; its instances as events if *snapshot*.

        Raises :class:`~eda.core.registry.client.NoRegistry` when no registry is known.
        """
        self.seq, initial = self._connect(snapshot, resync=False)
        return initial

    def follow(self) -> Iterator[Event]:
        """Changes after :meth:`start`, forever, reconnecting when the registry goes silent."""
        while True:
            yield from self._follow(self.seq)
            self.log(f"registry at {self.client.current} went silent; reconnecting")
            self.client.disconnect()
            warned = False
            while True:
                try:
                    self.seq, missed = self._connect(False, resync=True)
                    break
                except EdaError as exc:
                    if not warned:
                        self.log(f"warning: {exc}; still trying")
                    warned = True
                    self.client.disconnect()
                    time.sleep(0.5)  # back off before asking every known registry again
            yield from missed

    def _connect(self, show_present: bool, resync: bool) -> tuple[int, list[Event]]:
        hello = self.client.hello()
        self.silence = SILENT_TICKS * _tick(hello.get("tick", 0.5))
        sub = new_socket(zmq.SUB, context=self.ctx)
        sub.subscribe(protocol.TICK)
        sub.subscribe(protocol.event_topic(self.service) if self.service else protocol.EVENTS)
        self.sub = sub  # closed by _close_sub whatever happens next (term() waits for it)
        try:  # secure mode: the registry's own key, pinned where it was found
            pinned = reqrep.pinned_key(self.client.current) if self.client.current else None
            connect(sub, self.client.pub_endpoint(hello), pinned)
        except zmq.ZMQError as exc:
            self._close_sub()
            raise protocol.RemoteError(f"bad change stream endpoint: {exc}") from None
        # the stream is live when its first message comes: waited for no longer than a
        # request of this client's may take in all (not what the registry claims)
        if not sub.poll(int(min(self.silence, self._budget()) * 1000)):
            self._close_sub()
            raise protocol.RemoteError("the registry's change stream did not answer")
        msg: dict[str, Any] = {"op": "snapshot"}
        if self.service:
            msg["service"] = self.service
        try:
            snap = self.client.request(msg)
        except EdaError:
            self._close_sub()
            raise
        listed = snap.get("instances")
        seq = _seq(snap.get("seq", 0))
        if not isinstance(listed, list) or seq is None:
            self._close_sub()
            raise protocol.RemoteError("the registry sent a malformed snapshot")
        records = {}
        for data in listed:
            record = _record(data)
            if record is None:
                self.dropped += 1
            else:
                records[record["id"]] = record
        events: list[Event] = []
        if show_present:
            events = [
                self._made(PRESENT, r, "present when the watch started", snapshot=True)
                for r in records.values()
            ]
        elif resync:
            events = list(self._diff(records))
        self.state = records
        return seq, events

    def _budget(self) -> float:
        """The most one request of :attr:`client` takes in all (its overall deadline)."""
        client = self.client
        return client.total if client.total is not None else reqrep.ATTEMPTS * client.timeout

    def _made(self, kind: str, record: dict[str, Any], reason: str, **flags: bool) -> Event:
        return {
            "id": f"{record['id']}@{record.get('rev', 0)}",
            "type": kind,
            "reason": reason,
            "service": record.get("service"),
            "time": iso(time.time()),
            "registry": self.client.registry_id,
            "instance": record,
            **flags,
        }

    def _diff(self, records: dict[str, dict[str, Any]]) -> Iterator[Event]:
        for inst_id, old in self.state.items():
            if inst_id not in records:
                yield self._made(DEREGISTERED, old, "gone while the watch reconnected", resync=True)
        for inst_id, new in records.items():
            before = self.state.get(inst_id)
            if before is None:
                yield self._made(
                    REGISTERED, new, "appeared while the watch reconnected", resync=True
                )
            elif new["rev"] > before["rev"]:
                kind = HEALTH if before.get("status") != new.get("status") else UPDATED
                if kind == UPDATED and _same(before, new):
                    continue
                yield self._made(kind, new, "changed while the watch reconnected", resync=True)

    def _follow(self, seq: int) -> Iterator[Event]:
        sub = self.sub
        assert sub is not None
        try:
            while True:
                if not sub.poll(int(self.silence * 1000)):
                    return
                frames = sub.recv_multipart()
                if len(frames) != 2 or frames[0] == protocol.TICK:
                    continue
                event = self._event(frames[1])
                if event is None:
                    self.dropped += 1
                    continue
                if event["seq"] <= seq:
                    continue
                shown = self._apply(event)
                if shown is not None:
                    yield shown
        finally:
            self._close_sub()

    @staticmethod
    def _event(raw: bytes) -> Event | None:
        """A change event from the stream, checked, or None."""
        try:
            event = protocol.decode(raw)
        except protocol.ProtocolError:
            return None
        record = _record(event.get("instance"))
        seq = _seq(event.get("seq", 0))
        if record is None or seq is None or event.get("type") not in KINDS:
            return None
        for key in ("id", "reason", "time", "service", "registry"):
            if not isinstance(event.get(key, ""), str) or len(event.get(key, "")) > 300:
                return None
        return {**event, "seq": seq, "instance": record}

    def _apply(self, event: Event) -> Event | None:
        record = event["instance"]
        inst_id, rev = record["id"], record["rev"]
        old = self.state.get(inst_id)
        if event.get("type") in DELETIONS:
            if old is None or rev < old["rev"]:
                return None
            del self.state[inst_id]
            return event
        if old is not None and rev <= old["rev"]:
            return None
        self.state[inst_id] = record
        if event.get("type") == SYNC:
            return None
        if old is None and event.get("type") != REGISTERED:
            event = {**event, "type": REGISTERED}
        return event

    def _close_sub(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None

    def close(self) -> None:
        self._close_sub()
        secure = security.active()
        if secure is not None:
            secure.release(self.ctx)  # its ZAP handler, before the context ends
        self.ctx.term()


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("host", "port", "weight", "meta", "ttl", "interval")
    return all(a.get(k) == b.get(k) for k in keys)
