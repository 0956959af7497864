"""Opening a NATS engine: the connection, the stream, the bucket, and changes to them.

The connection, with NATS's own security, is :mod:`.connect`'s.

The stream (``EDA`` by default, subjects ``<prefix>.>``, file storage, the
replicas, limits and duplicate window asked for) and the key-value bucket
``<stream>_consumers`` are created when missing; an existing stream is given
the replicas and limits asked for (those given only), or the change is
refused with a UsageError naming it.  A cluster that just lost or regained
a node answers 503 for a while: opening retries within its patience.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from ...errors import UsageError
from .client import JsApiError, JsNotFound, NatsTimeout, ServiceUnavailable, jsapi
from .connect import connect
from .index import Index
from .wire import FORMATS


class Setup(Index):
    """Connecting and setting the stream up (see the module docstring)."""

    async def _open(self, window: float, max_age: float | None, max_bytes: int | None) -> None:
        self.errors: list[str] = []  # the client's last connection errors (it reconnects)
        # nats-py retries the first connect forever when reconnecting is on: connect
        # gives up after the timeout, at once when the servers refuse (see .connect)
        self._nc = await connect(
            self._plan,
            self.timeout,
            self.errors,
            connect_timeout=min(2.0, self.timeout),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            allow_reconnect=True,
            # a server cut off by the network is silent: found dead after two
            # unanswered pings (not nats-py's 2 x 120 s), then another is used
            ping_interval=max(1, int(self.timeout / 4)),
            max_outstanding_pings=2,
            disconnected_cb=self._disconnected,  # (the acks awaited on it: see the engine)
        )
        self._js = self._nc.jetstream(timeout=self.timeout)
        deadline = time.monotonic() + self.timeout * 7
        while True:  # a cluster that just lost or regained a node answers 503 for a while
            try:
                return await self._setup(window, max_age, max_bytes)
            except (ServiceUnavailable, NatsTimeout):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)

    async def _disconnected(self) -> None:
        """nats-py lost the connection and reconnects (the engine fails the acks awaited)."""

    async def _setup(self, window: float, max_age: float | None, max_bytes: int | None) -> None:
        """The stream, the bucket and the index; safe to run again after a failure."""
        config = jsapi.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            storage=jsapi.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=window,
            max_age=max_age,
            max_bytes=max_bytes,
            discard=jsapi.DiscardPolicy.OLD,
        )
        try:
            info = await self._js.stream_info(self.stream)
        except JsNotFound:
            await self._js.add_stream(config)
        else:
            subjects = info.config.subjects or []
            if f"{self.prefix}.>" not in subjects:
                raise UsageError(
                    f"NATS stream {self.stream} holds subjects {subjects}, not {self.prefix}.>: "
                    f"choose another stream name or prefix"
                )
            await self._reconfigure(info, max_age, max_bytes)
        bucket = f"{self.stream}_consumers"
        try:
            self._kv = await self._js.key_value(bucket)
        except Exception:
            self._kv = await self._js.create_key_value(
                bucket=bucket, history=1, replicas=self.replicas
            )
        await self._catch_up()
        await self._choose_format()
        limit = int(self._nc.max_payload)
        if self.max_event_bytes > limit:
            self.warnings[:] = [
                f"events larger than the NATS server's max payload ({limit} bytes, less "
                f"headers) are refused, though the event limit is {self.max_event_bytes}"
            ]

    async def _choose_format(self) -> None:
        """The stream's message format, kept in the bucket (``format``): every front
        writes the one the stream has.  Asked for another, an empty stream takes it;
        one holding events refuses (a consumer of the stream would see both)."""
        row = await self._kv_get("format")
        had = str(row.get("name")) if row else "eda"  # (streams from before the option)
        if had not in FORMATS:
            raise UsageError(f"NATS stream {self.stream} is in message format {had!r}, "
                             "unknown to this eda: upgrade it")  # fmt: skip
        want = self._want_format or had
        if want != had and self._heads:
            raise UsageError(
                f"NATS stream {self.stream} holds events in the {had} message format: "
                f"--nats-format {want} needs another stream (--stream NAME)"
            )
        if row is None or want != had:
            await self._kv_put("format", {"name": want})
            if row is not None:
                self.changes.append(f"NATS stream {self.stream} changed: format {had} -> {want}")
        self.format = want

    async def _reconfigure(self, info: Any, max_age: float | None, max_bytes: int | None) -> None:
        """Give an existing stream the limits and replicas asked for (those given only).

        JetStream changes them in place (a replicated stream grows or shrinks
        its copies); what it refuses (more replicas than servers, ...) is a
        UsageError naming the change.  The consumers' bucket follows the
        stream's replicas.
        """
        config = info.config
        want: dict[str, Any] = {}
        if self._want_replicas is not None and config.num_replicas != self._want_replicas:
            want["num_replicas"] = self._want_replicas
        if max_age is not None and (config.max_age or 0.0) != max_age:
            want["max_age"] = max_age
        if max_bytes is not None and config.max_bytes != max_bytes:
            want["max_bytes"] = max_bytes
        if not want:
            self.replicas = config.num_replicas or 1
            return
        said = ", ".join(
            f"{k.removeprefix('num_')} {_said(k, getattr(config, k))} -> {_said(k, v)}"
            for k, v in want.items()
        )
        if want.get("num_replicas", 1) > 1 and (info.cluster is None or not info.cluster.name):
            # a single server would record the number and keep one copy (2.9 says no
            # cluster; 2.10 on name their leader, themselves, but no cluster name)
            raise UsageError(
                f"cannot change NATS stream {self.stream} ({said}): the server is not "
                f"clustered, so it keeps one copy (more need a JetStream cluster)"
            )
        try:
            await self._js.update_stream(dataclasses.replace(config, **want))
            if "num_replicas" in want:
                kv = (await self._js.stream_info(f"KV_{self.stream}_consumers")).config
                if kv.num_replicas != self.replicas:
                    await self._js.update_stream(
                        dataclasses.replace(kv, num_replicas=self.replicas)
                    )
        except JsNotFound:
            pass  # no bucket yet: created with these replicas
        except JsApiError as exc:
            why = exc.description or type(exc).__name__
            raise UsageError(f"cannot change NATS stream {self.stream} ({said}): {why}") from None
        self.changes.append(f"NATS stream {self.stream} changed: {said}")


def _said(key: str, value: Any) -> Any:
    """A stream setting as an operator wrote it (``7d``, not ``604800.0``)."""
    from ..retention import format_age

    return format_age(value) if key == "max_age" and value else value
