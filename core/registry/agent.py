"""One registration's requests: register, heartbeat, fail over, deregister.

Blocking requests: only :class:`~eda.core.presence.Presence` drives an
:class:`Agent`, from its own thread (never a daemon's poll loop).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable

from ..errors import EdaError
from .client import Client, RegistryUnavailable
from .model import Instance, InvalidRecord, from_dict, validate_rev
from .protocol import RemoteError

CLOCK = secrets.token_hex(8)  # this process's monotonic clock, as heartbeats name it


def sent() -> dict[str, object]:
    """When a heartbeat is sent, by this process's clock (the registry's .lateness)."""
    return {"clock": CLOCK, "at": time.monotonic()}


class Agent:
    """The registering side of one instance, driven by a :class:`~eda.core.presence.Presence`."""

    def __init__(self, client: Client, inst: Instance, log: Callable[[str], None]) -> None:
        self.client = client
        self.inst = inst
        self.log = log
        self.registry = ""
        self._lost = False

    def register(self) -> Instance:
        """First registration; raises if refused or if no registry answers."""
        self.client.hello()
        reply = self.client.request(
            {"op": "register", "instance": self.inst.to_dict(), "sent": sent()}
        )
        try:
            self.inst = from_dict(reply.get("instance"))
        except InvalidRecord as exc:
            raise RemoteError(f"the registry sent a malformed record: {exc}") from None
        self.registry = self.client.registry_id
        return self.inst

    def beat(self, status: str) -> bool:
        """One heartbeat carrying the full record; False when no registry answered."""
        self.inst.status = status
        try:
            reply = self.client.request(
                {"op": "heartbeat", "instance": self.inst.to_dict(), "sent": sent()},
                timeout=min(1.0, max(0.2, self.inst.interval)),
            )
            if not self.client.registry_id:
                self.client.hello()  # a registry we moved to: learn its id and peers
        except RegistryUnavailable as exc:
            if not self._lost:
                self.log(f"warning: {exc}; still trying")
            self._lost = True
            return False
        rev = reply.get("rev", self.inst.rev)
        with contextlib.suppress(InvalidRecord):  # a malformed revision: keep ours
            self.inst.rev = validate_rev(rev)
        if self._lost or self.client.registry_id != self.registry:
            self.log(
                f"heartbeats now go to registry {self.client.registry_id} at {self.client.current}"
            )
        self._lost = False
        self.registry = self.client.registry_id
        return True

    def deregister(self) -> None:
        """Best effort: the registry would expire the instance anyway."""
        with contextlib.suppress(EdaError):
            self.client.request({"op": "deregister", "id": self.inst.id}, timeout=1.0)
