"""Consumer groups of the NATS engine: JetStream durable pull consumers (``eda_g_<group>``).

Members claim by fetching (a no-wait pull: the bus never waits for new
messages), a message is acknowledged once a member acknowledged all its
events, ``release`` naks what a dead member held (redelivered at once), what
live members hold is reported in progress on every claim and ack of the
group, and JetStream itself redelivers what a crashed engine held after
``ack_wait``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final

from ...errors import NotFoundError, UsageError
from ...topics import Matcher
from ..engine import Record
from ..streams import check_name
from .client import JsNotFound, NatsTimeout, jsapi
from .consumers import Consumers
from .state import _Held
from .wire import bucket_key, head_of, joined, nats_name, record

# nats-server 2.9 never answers a no-wait pull on a consumer that held messages a
# purge removed (it answers at once otherwise).  A group whose pull went unanswered
# this long is pulled with an expiry instead for a while (the server answers by then,
# as it also waits that long when it has nothing: a cost only such groups pay).
_NO_WAIT_ANSWER: Final = 0.5
_PULL_EXPIRES: Final = 0.05
_EXPIRING_FOR: Final = 60.0


class Groups(Consumers):
    """Consumer groups (see the module docstring)."""

    def _group(self, group: str, patterns: Sequence[str], start: int | None) -> Matcher:
        nats_name(check_name(group, "group"), "group")
        spec = list(self._matcher(patterns).patterns)
        known = self._groups.get(group)
        if known is None:
            row = self._run(self._kv_get(bucket_key("g", group)))
            if row is None:
                first = self._durable + 1 if start is None else max(1, min(start, self._next))
                i = self._locate(first)
                sseq = self._heads[i].sseq if i < len(self._heads) else self._sseq + 1
                self._run(self._kv_put(bucket_key("g", group), {"name": group, "patterns": spec}))
                known = spec
            else:
                known, sseq = list(row["patterns"]), 1
            self._run(self._bind(group, known, sseq))  # the consumer, if it is not there yet
            self._groups[group] = known
        if known != spec:
            raise UsageError(f"group {group!r} has patterns {known}, not {spec}")
        return self._matcher(spec)

    async def _bind(self, group: str, patterns: list[str], sseq: int) -> None:
        durable = f"eda_g_{group}"
        try:
            await self._js.consumer_info(self.stream, durable)
        except JsNotFound:
            subject = f"{self.prefix}.{patterns[0]}" if len(patterns) == 1 else None
            config = jsapi.ConsumerConfig(
                durable_name=durable,
                deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=sseq,
                ack_policy=jsapi.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                filter_subject=subject or f"{self.prefix}.>",
                max_ack_pending=-1,
            )
            await self._js.add_consumer(self.stream, config)

    def claim(
        self, group: str, member: str, patterns: Sequence[str], limit: int, start: int | None = None
    ) -> list[Record]:
        self._usable()
        check_name(member, "member")
        matcher = self._group(group, patterns, start)
        self._touch(group)
        out: list[Record] = []
        held = self._held.setdefault(group, {}).setdefault(member, [])
        got = 0
        # a message holds one batch: ask for about as many as *limit* events fill
        avg = max(1, sum(h.size for h in self._heads[-64:]) // max(1, len(self._heads[-64:])))
        while got < limit:
            msgs = self._run(self._pull(group, max(1, min((limit - got) // avg, 256))))
            if not msgs:
                break
            for msg in msgs:
                head = head_of(self.prefix, msg.metadata.sequence.stream, msg.subject, msg.headers,
                                     msg.data)  # fmt: skip
                if head is None or not matcher(head.topic):
                    self._run(msg.ack_sync(timeout=self.deadline / 2))
                    continue
                out.append(record(head, msg))
                held.append(_Held(head.seq, head.seq + head.size - 1, msg, time.monotonic()))
                got += head.size
        return list(joined(out)) if self.format == "cloudevents" else out

    async def _pull(self, group: str, n: int) -> list[Any]:
        """Up to *n* messages the group's consumer has now; never waits for new ones.

        A ``no_wait`` pull request: the server answers at once with what it
        has and a 404 status when that is less than *n* (nats-py's fetch
        would wait for its timeout on an idle consumer, stalling the bus).
        For a group whose consumer left one unanswered (see _NO_WAIT_ANSWER),
        the request also expires after _PULL_EXPIRES; what came by the
        deadline is all there is.
        """
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        msgs: list[Any] = []
        now = time.monotonic()
        expiring = now - self._unanswered.get(group, -_EXPIRING_FOR) < _EXPIRING_FOR
        answered = False
        try:
            request: dict[str, Any] = {"batch": n, "no_wait": True}
            if expiring:
                request["expires"] = int(min(_PULL_EXPIRES, self.deadline / 4) * 1e9)
            api = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.eda_g_{group}"
            await self._nc.publish(api, json.dumps(request).encode(), reply=inbox)
            until = now + self.deadline / 2
            first = until if expiring else now + min(_NO_WAIT_ANSWER, self.deadline / 2)
            while len(msgs) < n:
                wait = (until if msgs else first) - time.monotonic()
                msg = await sub.next_msg(timeout=max(0.001, wait))
                if not msg.data and msg.headers and "Status" in msg.headers:
                    answered = True  # 404 no messages, 408 request expired
                    break
                msgs.append(msg)
        except NatsTimeout:
            pass  # no answer: what came is what there is now (JetStream redelivers the rest)
        finally:
            await sub.unsubscribe()
        if not answered and len(msgs) < n and not expiring:
            self._unanswered[group] = time.monotonic()
        return msgs

    def _touch(self, group: str) -> None:
        """Tell JetStream that what live members hold is in progress (restarts ack_wait).

        Called on every claim and group_ack of the group, so a member that
        works longer than ``ack_wait`` does not see its messages redelivered
        to another while the bus is serving the group.
        """
        now = time.monotonic()
        stale = [
            (member, i, h)
            for member, hs in self._held.get(group, {}).items()
            for i, h in enumerate(hs)
            if now - h.since > self.ack_wait / 3
        ]
        if not stale:
            return

        async def progress() -> None:
            for _, _, h in stale:
                await self._nc.publish(h.msg.reply, b"+WPI")
            await self._nc.flush(max(1, int(self.deadline / 2)))

        self._run(progress())
        for member, i, h in stale:
            self._held[group][member][i] = h._replace(since=now)

    def group_ack(self, group: str, member: str, seq: int, first: int = 0) -> int:
        self._group_known(group)
        self._touch(group)
        held = self._held.get(group, {}).get(member, [])
        done = [h for h in held if first <= h.first and h.last <= seq]
        acked = self._run(self._each([h.msg.ack_sync(timeout=self.deadline / 2) for h in done]))
        unacked = {id(h) for h, ok in zip(done, acked, strict=True) if not ok}
        settled = 0
        keep: list[_Held] = []
        for h in held:
            if id(h) in unacked or h.first < first:  # (no answer: server gone, message
                keep.append(h)  # purged: acked again later; or not among those acknowledged)
                continue
            settled += max(0, min(h.last, seq) - h.first + 1)
            if h.first <= seq < h.last:
                keep.append(h._replace(first=seq + 1))
            elif seq < h.first:
                keep.append(h)
        held[:] = keep
        return settled

    def release(self, group: str, member: str) -> int:
        self._group_known(group)
        held = self._held.get(group, {}).pop(member, [])
        # each answered by the server, so the next claim sees it; one left unanswered
        # (a purged message, a server gone) is redelivered by JetStream after ack_wait
        naks = [self._nc.request(h.msg.reply, b"-NAK", timeout=self.deadline / 2) for h in held]
        self._run(self._each(naks))
        return sum(h.last - h.first + 1 for h in held)

    def held(self, group: str) -> dict[str, list[tuple[int, int]]]:
        self._group_known(group)
        return {
            m: _adjacent_joined([(h.first, h.last) for h in hs])
            for m, hs in self._held.get(group, {}).items()
            if hs
        }

    def _group_known(self, group: str) -> dict[str, Any]:
        self._usable()
        row = self._run(self._kv_get(bucket_key("g", group)))
        if row is None:
            raise NotFoundError(f"no consumer group {group!r}")
        return row


def _adjacent_joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Held ranges with adjacent ones shown as one (format ``cloudevents`` holds a
    message per event)."""
    out: list[tuple[int, int]] = []
    for first, last in ranges:
        if out and out[-1][1] + 1 == first:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out
