"""What the parts of the NATS engine share: its state, the bridge, the key-value bucket.

The engine is one class built in layers, one module each (index, setup,
consumers, groups, stats, then the engine with writing); this is the bottom
layer: the attributes every layer uses, declared once, and the calls to NATS
they all make (through :class:`.bridge.Bridge`, and the bucket
``<stream>_consumers`` that holds consumer positions, groups and floors).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

from ..base import EngineBase
from ..engine import StoreError
from ..streams import Ranges
from .bridge import Bridge
from .connect import Plan
from .wire import Format, _Head

T = TypeVar("T")


class _Held(NamedTuple):
    first: int
    last: int
    msg: Any  # nats.aio.msg.Msg
    since: float  # monotonic time it was claimed or last reported in progress


class NatsState(EngineBase):
    """The state of a NATS engine (see the module docstring); no behaviour of its own."""

    stream: str
    prefix: str
    replicas: int
    timeout: float  # opening (patient: a cluster may be electing leaders)
    deadline: float  # every call once open (see SERVE_DEADLINE)
    ack_wait: float
    changes: list[str]  # what opening changed in an existing stream's config
    warnings: list[str]  # what the caller should tell its user
    errors: list[str]  # the client's last connection errors (it reconnects)
    _want_replicas: int | None
    format: Format  # how events are stored: eda batches, or one CloudEvent per message
    _want_format: Format | None
    _bridge: Bridge
    _nc: Any  # nats.aio.client.Client
    _js: Any  # its JetStreamContext
    _kv: Any  # the bucket
    _sseq: int  # the stream's last sequence, as this engine knows it
    _heads: list[_Head]
    _head_seqs: list[int]  # bus sequences of _heads, for bisect
    _pending: list[_Head]  # appended, not committed yet (the engine publishes them then)
    # publisher sequences of events no longer in the stream (retention), kept for a
    # while so that a late resend of one is still a duplicate, also after a resync
    # or a reopen (JetStream's duplicate window refuses its Msg-Id meanwhile)
    _gone: dict[tuple[str, str], tuple[Ranges, float]]
    _gone_for: float
    _groups: dict[str, list[str]]  # group -> patterns (its consumer exists)
    _held: dict[str, dict[str, list[_Held]]]  # group -> member -> messages
    _servers: list[str]  # without credentials: they are in _plan
    _plan: Plan  # how to connect (credentials, TLS)
    _unanswered: dict[str, float]  # group -> when a no-wait pull went unanswered

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._bridge.run(coro, timeout)

    def _usable(self) -> None:
        if self._closed:
            raise StoreError(f"NATS stream {self.stream} is closed")

    # -- the key-value bucket ---------------------------------------------------
    async def _kv_get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self._kv.get(key)
        except Exception as exc:  # KeyNotFoundError / KeyDeletedError
            if "NotFound" in type(exc).__name__ or "Deleted" in type(exc).__name__:
                return None
            raise
        if not entry.value:
            return None
        value: dict[str, Any] = json.loads(entry.value)
        return value

    async def _kv_put(self, key: str, value: dict[str, Any]) -> None:
        await self._kv.put(key, json.dumps(value).encode())

    async def _keys(self) -> list[str]:
        try:
            keys: list[str] = await self._kv.keys()
        except Exception as exc:  # NoKeysError when the bucket is empty
            if "NoKeys" in type(exc).__name__:
                return []
            raise
        return sorted(keys)

    async def _each(self, calls: Sequence[Coroutine[Any, Any, Any]]) -> list[bool]:
        """Run *calls* concurrently (each with its own timeout); which of them succeeded."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [not isinstance(r, BaseException) for r in results]
