"""Durable consumers of the NATS engine: exact positions in the key-value bucket.

A JetStream consumer acknowledges whole messages and is pulled by the
server, whereas the bus reads by sequence and acknowledges per event; so a
durable consumer is a row ``c<name>`` in the bucket with its patterns and
its next bus sequence (which may fall inside a message).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from ...errors import NotFoundError, UsageError
from ..engine import StoreError
from ..streams import check_name
from .setup import Setup
from .wire import NAME_OK, bucket_key


class Consumers(Setup):
    """Durable consumers (see the module docstring)."""

    def consumer(self, name: str, patterns: Sequence[str], start: int) -> int:
        self._usable()
        check_name(name, "consumer")
        spec = self._matcher(patterns).patterns
        key = bucket_key("c", name)
        row = self._run(self._kv_get(key))
        if row:
            if row["patterns"] != list(spec):
                self._run(self._kv_put(key, {**row, "patterns": list(spec)}))
            return int(row["next"])
        start = max(1, min(start, self._next))
        self._run(self._kv_put(key, {"name": name, "patterns": list(spec), "next": start}))
        return start

    def position(self, name: str) -> int:
        self._usable()
        row = self._run(self._kv_get(bucket_key("c", name)))
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        return int(row["next"])

    def ack(self, name: str, seq: int) -> int:
        key = bucket_key("c", name)
        row = self._run(self._kv_get(key))
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        if seq > self.last_seq:
            raise UsageError(f"consumer {name!r} acknowledged {seq}, beyond the last event")
        if seq + 1 > row["next"]:
            row["next"] = seq + 1
            self._run(self._kv_put(key, row))
        return int(row["next"])

    def patterns_of(self, name: str) -> tuple[str, ...] | None:
        self._usable()
        row = self._run(self._kv_get(bucket_key("c", name)))
        return None if row is None else tuple(str(x) for x in row["patterns"])

    def move(self, name: str, seq: int) -> int:
        self._usable()
        key = bucket_key("c", name)
        row = self._run(self._kv_get(key))
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        row["next"] = max(1, min(seq, self._next))
        self._run(self._kv_put(key, row))
        return int(row["next"])

    def drop_consumer(self, name: str) -> None:
        self._usable()
        found = False
        for key in (bucket_key("c", name), bucket_key("g", name)):
            if self._run(self._kv_get(key)) is not None:
                self._run(self._kv.delete(key))
                found = True
        if not found:
            raise NotFoundError(f"no durable consumer or group {name!r}")
        if NAME_OK.fullmatch(name):
            with contextlib.suppress(StoreError):  # a group never claimed from has none
                self._run(self._js.delete_consumer(self.stream, f"eda_g_{name}"))
            self._groups.pop(name, None)
            self._held.pop(name, None)
