"""Serverless mode: instances announce themselves by mDNS; lookups ask the LAN.

Each instance is a standard DNS-SD service of type ``_eda-svc._tcp``, named
after its instance id, with TXT keys ``svc`` (service name), ``id``, ``w``
(weight), ``st`` (health status), ``rv`` (revision), ``ttl``, ``iv`` and the
user's metadata, so ``avahi-browse -r _eda-svc._tcp`` lists them.  In secure
mode TXT ``k`` is the registrant's public key (:attr:`~.model.Instance.key`):
a lookup keeps only instances this process may use (:func:`eda.core.security.admission`:
trusted keys in secure mode, keyless instances in plain mode), so that whoever
connects to an instance pins the key it announced, and CURVE proves it.

A killed process cannot send a goodbye, and ordinary mDNS records live for
75 minutes in caches.  So the records carry a TTL of a few seconds, and a
lookup never trusts a cache: it asks the LAN with a one-shot query each time
and only instances whose own responder answers right now are returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import mdns, security
from ..discovery import Discovery
from .model import PASSING, RESERVED_META, Instance, InvalidRecord, from_dict
from .store import DEREGISTERED, HEALTH, REGISTERED, UPDATED, Event, make_event

SVC_TYPE = "_eda-svc._tcp.local."
MAX_SAID = 1000  # skipped instances a watch remembers having reported


def txt_of(inst: Instance) -> dict[str, str]:
    txt = {
        "svc": inst.service,
        "id": inst.id,
        "w": str(inst.weight),
        "st": inst.status,
        "rv": str(inst.rev),
        "ttl": f"{inst.ttl:g}",
        "iv": f"{inst.interval:g}",
        "h": inst.host,
    }
    if inst.key:
        txt["k"] = inst.key
    txt.update(inst.meta)
    return txt


def instance_of(found: mdns.Instance) -> Instance | None:
    """The record an mDNS answer describes, or None if it is not a valid eda instance."""
    txt = found.txt
    try:
        return from_dict(
            {
                "service": txt.get("svc"),
                "id": txt.get("id"),
                "host": txt.get("h") or found.best_address(),
                "port": found.port,
                "weight": int(txt.get("w", "1")),
                "status": txt.get("st", PASSING),
                "rev": int(txt.get("rv", "0")),
                "ttl": float(txt.get("ttl", "6")),
                "interval": float(txt.get("iv", "2")),
                "registry": "mdns",
                "key": txt.get("k", ""),
                "meta": {k: v for k, v in txt.items() if k not in RESERVED_META},
            }
        )
    except (InvalidRecord, ValueError):
        return None


class Announcer:
    """Announces one instance with short-lived records; re-announces on change."""

    def __init__(self, inst: Instance, interface: str | None = None) -> None:
        self.inst = inst
        self.interface = interface
        self._discovery = Discovery(interface)
        self._info: Any = None

    def start(self) -> None:
        """Probe and announce (takes about a second: RFC 6762 probing)."""
        self._info = self._discovery.announce(
            SVC_TYPE,
            self.inst.id,
            self.inst.port,
            txt_of(self.inst),
            server=f"{self.inst.id}.local.",
            ttl=max(1, round(self.inst.ttl)),
            rename=False,
            background=False,
        )

    def update(self, status: str) -> None:
        self.inst.status = status
        self.inst.rev += 1
        self._info = self._discovery.update(self._info, txt_of(self.inst))

    def close(self) -> None:
        """Send goodbye packets (TTL 0) so browsers drop the instance at once."""
        if self._info is not None:
            self._discovery.withdraw(self._info)
        self._discovery.close()


def _quiet(_message: str) -> None:
    pass


def query(
    interface: str | None = None, timeout: float = 0.3, log: Callable[[str], None] = _quiet
) -> list[Instance]:
    """Every eda instance whose responder answers a one-shot query now, and that this
    process may use (secure mode: a trusted key; else none); *log* says which were not."""
    found = mdns.one_shot_query(SVC_TYPE, interface=interface, timeout=timeout)
    usable = []
    for inst in map(instance_of, found):
        if inst is None:
            continue
        key, why = security.admission(inst.key)
        if key is None:
            log(f"ignoring instance {inst.service}/{inst.id} at {inst.host}:{inst.port}: {why}")
            continue
        usable.append(inst)
    return usable


def lookup(
    service: str,
    include_all: bool = False,
    interface: str | None = None,
    timeout: float = 0.3,
    log: Callable[[str], None] = _quiet,
) -> list[Instance]:
    return sorted(
        (
            i
            for i in query(interface, timeout, log)
            if i.service == service and (include_all or i.status == PASSING)
        ),
        key=lambda i: i.id,
    )


def _event(kind: str, inst: Instance, reason: str, **flags: bool) -> Event:
    return make_event(kind, inst, reason, "mdns", time.time(), **flags)


def watch(
    service: str | None,
    *,
    snapshot: bool = False,
    interface: str | None = None,
    period: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = _quiet,
) -> Iterator[Event]:
    """Poll the LAN every *period* seconds; yield a change event per difference.

    An instance missing from two polls in a row is reported gone (one lost
    answer does not make it flap).
    """
    known: dict[str, Instance] = {}
    missing: dict[str, int] = {}
    first = True
    said: set[str] = set()  # instances skipped (secure mode) are said once, not every poll

    def once(message: str) -> None:
        if message not in said and len(said) < MAX_SAID:
            said.add(message)
            log(message)

    while True:
        now = {
            i.id: i
            for i in query(interface, min(0.3, period), once)
            if service is None or i.service == service
        }
        for inst_id, inst in now.items():
            missing.pop(inst_id, None)
            old = known.get(inst_id)
            known[inst_id] = inst
            if old is None:
                if first and snapshot:
                    yield _event("present", inst, "present when the watch started", snapshot=True)
                elif not first:
                    yield _event(REGISTERED, inst, "announced by mDNS")
            elif old.status != inst.status:
                yield _event(HEALTH, inst, f"{old.status} -> {inst.status}")
            elif not old.same_registration(inst):
                yield _event(UPDATED, inst, "registration changed")
        for inst_id in [k for k in known if k not in now]:
            missing[inst_id] = missing.get(inst_id, 0) + 1
            if missing[inst_id] >= 2:
                gone = known.pop(inst_id)
                del missing[inst_id]
                gone.rev += 1
                yield _event(DEREGISTERED, gone, "no longer answers mDNS")
        first = False
        sleep(period)
