"""The index of the NATS engine: the heads of the stored messages, in memory.

Each stored message's head (stream sequence, bus sequence, count, stored
time, topic, publisher stream, size) is read from the stream on open and
kept, so lookups by bus sequence and time, ``seq_for_last``, counts and stats
never scan messages; reads fetch the messages they need, concurrently.  The
publisher sequences retention removed are kept beside (``_gone``), also in
the bucket, so a late resend of one is still a duplicate.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Final

from ...topics import Matcher
from ..base import Span
from ..engine import Record
from ..streams import MAX_SEQ, add
from .client import JsNotFound, NatsTimeout, jsapi
from .state import NatsState
from .wire import _Head, head_of, joined, record

_CHUNK: Final = 128  # messages fetched concurrently while reading
_CHUNK_EVENTS: Final = 256  # ... in the cloudevents format (a message per event, small)
_RUN: Final = 16  # consecutive messages of that format read through a consumer, not one by one
_CHUNK_BYTES: Final = 8 << 20  # ... and at most about this many bytes of them


class Index(NatsState):
    """The heads of the stored messages (see the module docstring)."""

    async def _fetch(self, sseqs: Sequence[int]) -> list[Any]:
        """The stored messages at *sseqs* (None where a message is gone), concurrently;
        in the cloudevents format (many small messages) the runs of consecutive ones
        through an ephemeral consumer each (:meth:`_fetch_run`)."""

        async def one(s: int) -> Any:
            try:
                return await self._js.get_msg(self.stream, s)
            except JsNotFound:
                return None

        if self.format != "cloudevents" or len(sseqs) < _RUN:
            return list(await asyncio.gather(*(one(s) for s in sseqs)))
        runs: list[list[int]] = []
        for s in sseqs:
            if runs and runs[-1][-1] + 1 == s:
                runs[-1].append(s)
            else:
                runs.append([s])
        found: dict[int, Any] = {}
        for run in runs:
            if len(run) >= _RUN:
                found.update(await self._fetch_run(run[0], run[-1]))
        rest = [s for s in sseqs if s not in found]
        found.update(zip(rest, await asyncio.gather(*(one(s) for s in rest)), strict=True))
        return [found.get(s) for s in sseqs]

    async def _fetch_run(self, first: int, last: int) -> dict[int, Any]:
        """Messages *first* to *last* of the stream (those still there) through an
        ephemeral consumer: one request for the run, not one per message."""
        config = jsapi.ConsumerConfig(
            deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            ack_policy=jsapi.AckPolicy.NONE,
            inactive_threshold=max(5.0, self.deadline * 2),  # gone by itself if left
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self._js.pull_subscribe(f"{self.prefix}.>", stream=self.stream, config=config)
        got: dict[int, Any] = {}
        try:
            while True:
                want = last - first + 1 - len(got)
                msgs = await sub.fetch(want, timeout=self.deadline / 2)
                for msg in msgs:
                    s = msg.metadata.sequence.stream
                    if s > last:
                        return got
                    got[s] = msg
                if not msgs or len(got) >= last - first + 1 or max(got, default=0) >= last:
                    return got
        except NatsTimeout:
            return got  # what retention left of the run (the rest reads as gone)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _catch_up(self) -> None:
        """Read the heads of messages this engine has not seen (all of them on open).

        A call cut off by its deadline (a cluster electing a leader answers
        slowly) keeps the heads it read, and the next one goes on from there:
        ``_sseq``, which tells :meth:`refresh` the stream has not moved, is set
        last, with ``_next`` and ``_durable``, once nothing is awaited any more.
        """
        info = await self._js.stream_info(self.stream)
        last = info.state.last_seq
        pos = max(info.state.first_seq, self._heads[-1].sseq + 1 if self._heads else 1)
        gone = bisect.bisect_left([h.sseq for h in self._heads], info.state.first_seq)
        if gone:  # removed by the stream's own limits (max_age, max_bytes) or another front
            self._forget(self._heads[:gone])
            del self._heads[:gone]
            del self._head_seqs[:gone]
        while pos <= last:
            chunk = list(range(pos, min(last, pos + _CHUNK - 1) + 1))
            for msg in await self._fetch(chunk):
                if msg is not None:
                    self._index(msg)
            pos = chunk[-1] + 1
        floor = await self._kv_get("floor")  # bus sequences are never reused after a purge
        retained = await self._kv_get("retained")
        # from here on nothing is awaited: the rest is taken in at once or not at all
        self._load_gone(retained)
        self._took_in(last, int(floor["next"]) if floor else 1)

    def _took_in(self, sseq: int, floor: int) -> None:
        """The stream was read up to stream sequence *sseq*: every head read is durable
        (JetStream stored it), the next bus sequence follows them (or *floor*).

        Never below a sequence already acknowledged: a leader whose copy of the stream
        lags (elected after kills and partitions) reports less than the stream holds,
        and writing on top of its view would have it acknowledge events where the
        others hold other events (nemesis seed 2); expecting the true last sequence,
        it refuses the write instead, until the stream is whole."""
        top = self._heads[-1].seq + self._heads[-1].size if self._heads else 1
        self._next = max(top, floor)
        self._durable = self._next - 1
        self._sseq = max(sseq, self._heads[-1].sseq if self._heads else 0)

    def _forget(self, heads: Sequence[_Head]) -> None:
        """*heads* leave the stream: remember their publisher sequences (see _gone)."""
        now = time.time()
        for h in heads:
            ranges, _ = self._gone.get((h.pubid, h.topic), ([], now))
            add(ranges, h.pubseq, h.pubseq + h.size)
            self._gone[h.pubid, h.topic] = (ranges, now)
        expired = [k for k, v in self._gone.items() if v[1] <= now - self._gone_for]
        if expired:
            for key in expired:
                del self._gone[key]
            # (heads are the oldest of _heads, about to leave: the streams of the rest stay)
            live = {(h.pubid, h.topic) for h in self._heads[len(heads) :]}
            self._ledger.forget(k for k in expired if k not in live)

    def _load_gone(self, value: dict[str, Any] | None) -> None:
        """Merge what retention (of any front) wrote to the bucket; malformed rows are skipped."""
        rows = value.get("streams") if isinstance(value, dict) else None
        for row in rows if isinstance(rows, list) else []:
            try:
                pubid, topic, spans, when = row
                key, when = (str(pubid), str(topic)), float(when)
                ranges, seen = self._gone.get(key, ([], when))
                for lo, hi in spans:
                    if 1 <= int(lo) < int(hi) <= MAX_SEQ + 1:
                        add(ranges, int(lo), int(hi))
                self._gone[key] = (ranges, max(seen, when))
            except (TypeError, ValueError):
                continue
        for key, (ranges, _) in self._gone.items():
            for lo, hi in ranges:
                self._ledger.add(key, lo, hi)

    def _gone_value(self) -> dict[str, Any]:
        return {"streams": [[k[0], k[1], r, when] for k, (r, when) in self._gone.items()]}

    def _index(self, msg: Any) -> _Head | None:
        # (a stored message as get_msg gives it, or as a consumer delivers it)
        sseq = msg.seq if hasattr(msg, "seq") else msg.metadata.sequence.stream
        head = head_of(self.prefix, sseq, msg.subject, msg.headers, msg.data)
        if head is None:
            return None  # not written by eda: skipped by every read
        self._add_head(head)
        return head

    def _add_head(self, head: _Head) -> None:
        self._heads.append(head)
        self._head_seqs.append(head.seq)
        self._ledger.add((head.pubid, head.topic), head.pubseq, head.pubseq + head.size)

    @property
    def first_seq(self) -> int:
        return self._heads[0].seq if self._heads else self._durable + 1

    def _locate(self, seq: int) -> int:
        """Index in _heads of the batch holding bus sequence *seq* (or the next one)."""
        i = bisect.bisect_right(self._head_seqs, seq) - 1
        if i >= 0 and self._heads[i].seq + self._heads[i].size <= seq:
            i += 1
        return max(i, 0)

    def _records(
        self, start: int, end: int, matcher: Matcher | None, left: int
    ) -> Iterator[Record]:
        i = self._locate(start)
        while i < len(self._heads) and self._heads[i].seq <= end:
            heads: list[_Head] = []
            want = nbytes = 0
            most = _CHUNK_EVENTS if self.format == "cloudevents" else _CHUNK
            while i < len(self._heads) and len(heads) < most and self._heads[i].seq <= end:
                h = self._heads[i]
                i += 1
                if matcher is None or matcher(h.topic):
                    heads.append(h)
                    want += min(h.seq + h.size - 1, end) - max(h.seq, start) + 1
                    nbytes += h.nbytes
                    if want >= left or nbytes >= _CHUNK_BYTES:  # one fetch, one deadline
                        break
            msgs = self._run(self._fetch([h.sseq for h in heads]))
            left = max(1, left - want)  # the caller stops reading once it has enough
            found = (record(h, m) for h, m in zip(heads, msgs, strict=True) if m is not None)
            # (a message is None when retention removed it meanwhile)
            yield from joined(found) if self.format == "cloudevents" else found

    def seq_at(self, when: float) -> int:
        stored = [h.stored for h in self._heads]
        i = bisect.bisect_left(stored, when)
        return self._heads[i].seq if i < len(self._heads) else self._next

    def _backwards(self, pos: int) -> Iterator[Span]:
        for h in reversed(self._heads):
            if h.seq <= pos:
                yield h.seq, h.size, h.topic

    def _spans(self, first: int, last: int) -> Iterator[Span]:
        for i in range(self._locate(first), len(self._heads)):
            h = self._heads[i]
            if h.seq > last:
                return
            yield h.seq, h.size, h.topic

    def _sizes(self) -> Generator[tuple[int, int, float, int], None, None]:
        for h in self._heads:
            yield h.seq, h.size, h.stored, h.nbytes

    def _stored_bytes(self) -> int:
        return sum(h.nbytes for h in self._heads)
