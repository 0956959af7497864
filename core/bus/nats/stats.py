"""Statistics of the NATS engine: topics from the index, consumers from the bucket.

The stream's info and every consumer's row (with its JetStream consumer's
info for a group) are asked concurrently, so one deadline covers all of
``stats``; counts come from the in-memory index (no scan of messages).
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Any

from ..engine import ConsumerStats, Stats, TopicStats
from .groups import Groups


class StatsOf(Groups):
    """``stats`` (see the module docstring)."""

    async def _stats_sources(self) -> tuple[Any, list[tuple[str, dict[str, Any], Any]]]:
        """The stream's info and every consumer's row (with its JetStream consumer's
        info for a group), asked concurrently: one deadline covers all of stats."""
        if not self._pending:
            await self._catch_up()  # what other fronts wrote, what the limits removed
        keys = [k for k in await self._keys() if k[:1] in ("c", "g")]
        info, *rows = await asyncio.gather(
            self._js.stream_info(self.stream), *(self._kv_get(k) for k in keys)
        )

        async def group_info(key: str, row: dict[str, Any] | None) -> Any:
            if row is None or not key.startswith("g"):
                return None
            return await self._js.consumer_info(self.stream, f"eda_g_{row['name']}")

        infos = await asyncio.gather(*(group_info(k, r) for k, r in zip(keys, rows, strict=True)))
        found = zip(keys, rows, infos, strict=True)
        return info, [(k, r, ci) for k, r, ci in found if r is not None]

    def stats(self) -> Stats:
        self._usable()
        info, rows = self._run(self._stats_sources())
        topics: dict[str, TopicStats] = {}
        for h in self._heads:
            t = topics.get(h.topic, TopicStats(0, 0))
            topics[h.topic] = TopicStats(t.events + h.size, t.bytes + h.nbytes)
        consumers: list[ConsumerStats] = []
        last = self.last_seq
        for key, row, ci in rows:
            m = self._matcher(row["patterns"])
            if key.startswith("c"):
                nxt = int(row["next"])
                consumers.append(ConsumerStats(row["name"], "durable", tuple(m.patterns), nxt,
                                               self._count(nxt, last, m), 0))  # fmt: skip
                continue
            delivered = ci.delivered.stream_seq if ci.delivered else 0
            i = bisect.bisect_right([h.sseq for h in self._heads], delivered)
            nxt = self._heads[i].seq if i < len(self._heads) else self._next
            held = sum(
                h.last - h.first + 1 for hs in self._held.get(row["name"], {}).values() for h in hs
            )
            lag = self._count(nxt, last, m) + held
            consumers.append(ConsumerStats(row["name"], "group", tuple(m.patterns), nxt, lag,
                                           held))  # fmt: skip
        return self._stats(topics, consumers, int(info.state.bytes))
