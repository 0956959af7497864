"""The publisher: XPUB, joins and departures, the end of stream and its accounting
(the design is in the package docstring, :mod:`eda.core.pubsub`)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from .. import codec, discovery
from ..limits import BoundedMap, BoundedSet
from ..sockets import new_socket
from .node import (
    _PEER_ID,
    END_RESEND,
    GONE_GRACE,
    MAX_PEERS,
    _Node,
)


@dataclass(frozen=True)
class Departure:
    """A subscriber whose connection dropped and did not come back."""

    subid: str
    after: float  # seconds since its connection dropped
    sent_before: int  # events sent between its joining and the drop (the last of them may be lost)
    sent_after: int  # events sent since (none of them reached it)


@dataclass
class Outcome:
    """What :meth:`Publisher.finish` found out about each subscriber."""

    lost: dict[str, int] = field(default_factory=dict)  # subid -> events it confirmed lost
    unconfirmed: dict[str, int] = field(default_factory=dict)  # subid -> events due to it
    gone: list[Departure] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.unconfirmed or self.gone)


class Publisher(_Node):
    """An XPUB socket that sends batches of events with per-topic sequence numbers."""

    announce_type = discovery.PUB_TYPE
    browse_type = discovery.SUB_TYPE

    def __init__(
        self,
        *,
        headers: dict[str, str] | None = None,
        source: str | None = None,
        interface: str | None = None,
        hwm: int = 10_000,
        block: bool = False,
    ) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = new_socket(zmq.XPUB, context=ctx)
        super().__init__(ctx, sock, interface)
        # what its events and end of stream carry: 128 random bits, since a subscriber
        # that outlives publisher runs takes an id it saw before for the same stream
        # and drops sequences it already had as copies (self.id, in mDNS names and
        # the welcome, stays short)
        self.pubid = os.urandom(16).hex()  # (secrets.token_hex, without loading OpenSSL)
        self.source = source or f"eda://{socket.gethostname()}/pub/{self.pubid}"
        self._origin = codec.encode_origin(self.pubid, self.source)
        self._ext = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
        self._seq: dict[str, int] = {}
        self._envelope_ids = 0
        self.subscribers = self.linked  # ids whose beacon arrived (at most MAX_PEERS)
        self.linked.on_evict = self._forget_subscribers
        # called with a subscriber's id once its subscriptions have arrived
        self.on_subscriber: Callable[[str], None] | None = None
        # called with a departed subscriber's record once it is reported gone
        self.on_gone: Callable[[Departure], None] | None = None
        # subid -> next sequences when it joined (entries go with the subscriber)
        self._joined: dict[str, dict[str, int]] = {}
        self.joined = 0  # subscribers that joined at some point
        self._acks: BoundedMap[str, int] = BoundedMap(MAX_PEERS)  # subid -> it confirmed lost
        self._left: BoundedSet[str] = BoundedSet(MAX_PEERS)  # subscribers that said goodbye
        self._dropped: dict[str, tuple[float, int]] = {}  # subid -> (when, total_sent then)
        # subscribers reported gone: the last MAX_PEERS of them, and how many in all
        self.gone: collections.deque[Departure] = collections.deque(maxlen=MAX_PEERS)
        self.gone_count = 0
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        sock.setsockopt(zmq.XPUB_WELCOME_MSG, codec.WELCOME_PREFIX + self.id.encode())
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_NODROP, int(block))
        # queue only to live connections: a dropped subscriber's queue goes with it,
        # so --block cannot wait forever on a dead peer (and XPUB reports who left)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)

    def connect_subscribers(
        self,
        timeout: float = 0.15,
        topic: str | None = None,
        found: discovery.Found | None = None,
    ) -> set[str]:
        """Connect to every subscriber found now; return the ids to wait for.

        Found means: answering a one-shot mDNS query (asked several times
        within *timeout*), or remembered in the discovery cache; either way
        answering a probe (TCP connect and ZMTP greeting).  Announced
        subscribers that do not answer the probe in time are left out and
        listed in :attr:`unreachable`; :attr:`seen_before` is how many the
        cache knew that may want *topic* and are gone now.  With *topic*,
        subscribers whose announced patterns cannot match it are connected
        (a later topic may be theirs) but not waited for.  *found*: what
        :func:`eda.core.discovery.discover` found for ``SUB_TYPE`` already (one started
        earlier, :func:`~eda.core.discovery.discover_soon`), instead of asking now.
        """
        if found is None:
            found = discovery.discover(
                discovery.SUB_TYPE, interface=self.interface, timeout=timeout
            )
        self.unreachable = [
            p for p in found.unreachable if topic is None or discovery.may_want(p, topic)
        ]
        # seen before and wanting this topic, but not found now: gone
        here = {p.id for p in found.peers} | {p.id for p in found.unreachable}
        self.seen_before = sum(
            1
            for p in found.seen
            if p.id not in here and (topic is None or discovery.may_want(p, topic))
        )
        ids = set()
        for peer in found.peers:
            key = self.admit(peer)
            if key is None:
                continue
            self.connect(peer.endpoint, key=key)
            self._peer_at[peer.endpoint] = peer.id
            if topic is None or discovery.may_want(peer, topic):
                ids.add(peer.id)
        return ids

    def service(self) -> None:
        """Read subscription messages: subscribers joining, leaving, confirming."""
        sock = self.sock
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[1:2] == b"\x00":  # a control subscription; topics never start with NUL
                self._control(msg[:1] == b"\x01", msg[1:3], msg[3:])
        if self.security is not None:
            self.take_refusals()
        if self._dropped:
            self._report_gone(GONE_GRACE)
        self.connect_discovered()

    def _control(self, subscribe: bool, tag: bytes, rest: bytes) -> None:
        text = rest.decode(errors="replace")
        if tag != codec.ACK_PREFIX and not _PEER_ID.fullmatch(text):
            return  # not an id eda gives (a peer's odd subscription): never state
        if tag == codec.BEACON_PREFIX:
            if subscribe:
                self._dropped.pop(text, None)  # (back within the grace period: not reported)
                if text not in self.subscribers and text not in self._left:
                    self.subscribers.add(text)
                    self._joined[text] = dict(self._seq)
                    self.joined += 1
                    if self.on_subscriber is not None:
                        self.on_subscriber(text)
            elif text in self._left:
                self._forget(text)
            elif text in self.subscribers:
                self._dropped.setdefault(text, (time.monotonic(), self.total_sent))
        elif subscribe and tag == codec.BYE_PREFIX:
            self._left.add(text)
            self._dropped.pop(text, None)
        elif subscribe and tag == codec.ACK_PREFIX:
            pubid, subid, lost = [*text.split(" "), "", ""][:3]
            if pubid == self.pubid and subid in self.subscribers and lost.isdigit():
                self._acks[subid] = int(lost[:18])

    def _report_gone(self, grace: float) -> None:
        """Report subscribers whose connection dropped *grace* seconds ago and did not return."""
        now = time.monotonic()
        for subid, (since, sent) in list(self._dropped.items()):
            if now - since < grace:
                continue
            joined = sum(self._joined.get(subid, {}).values()) - len(self._joined.get(subid, {}))
            self._forget(subid)
            departure = Departure(subid, now - since, sent - joined, self.total_sent - sent)
            self.gone.append(departure)
            self.gone_count += 1
            if self.on_gone is not None:
                self.on_gone(departure)

    def _forget(self, subid: str) -> None:
        """*subid* is no longer a subscriber (it left, or is reported gone)."""
        self.subscribers.discard(subid)
        self._forget_subscribers({subid: None})

    def _forget_subscribers(self, subids: dict[str, None]) -> None:
        """What is kept about each of *subids* (evicted, or gone) goes with it (but
        the loss it confirmed, reported at the end)."""
        for subid in subids:
            self._dropped.pop(subid, None)
            self._joined.pop(subid, None)

    @property
    def evicted(self) -> int:
        """Subscriber ids forgotten to stay within :data:`MAX_PEERS` (a peer inventing ids)."""
        return self.subscribers.evicted + self._left.evicted + self._acks.evicted

    def wait_for(
        self, ids: Iterable[str], count: int, timeout: float, at_least: float = 0.0
    ) -> set[str]:
        """Wait until the subscribers *ids* (and at least *count* in all) are connected.

        With *at_least*, wait that long in any case (a grace period for
        subscribers that connect to a bound endpoint: nobody knows they exist
        until they do).  Returns the ids still missing when *timeout* ran out.
        """
        wanted = set(ids)
        start = time.monotonic()
        deadline = start + timeout
        while True:
            self.service()
            # a subscriber that refused our key will not come: not waited for
            wanted -= {self._peer_at.get(e, "") for e in self.refused}
            missing = wanted - self.subscribers.keys()
            if (
                not missing
                and len(self.subscribers) >= count
                and time.monotonic() - start >= at_least
            ):
                return set()
            left = deadline - time.monotonic()
            if left <= 0:
                return missing
            self.sock.poll(max(1, int(min(left, 0.05) * 1000)))

    # -- sending (hot path) ---------------------------------------------------
    def send(self, topic: str, body: bytes, count: int, kind: int = codec.TEXT) -> None:
        """Send *count* events of *topic* as one batch (see :mod:`eda.core.codec`)."""
        seq = self._seq.get(topic, 1)
        self._seq[topic] = seq + count
        frames = [
            topic.encode(),
            codec.encode_header(kind, count, seq, time.time(), self._origin),
            body,
        ]
        if self._ext:
            frames.append(self._ext)
        self.sock.send_multipart(frames, copy=len(body) < 65536)

    def next_envelope_id(self) -> str:
        self._envelope_ids += 1
        return f"{self.pubid}-e{self._envelope_ids}"

    @property
    def ever_joined(self) -> int:
        """How many subscribers joined at some point (0: every event reached nobody)."""
        return self.joined

    @property
    def total_sent(self) -> int:
        return sum(self._seq.values()) - len(self._seq)

    # -- the end of the stream ----------------------------------------------------
    def _due(self, subid: str) -> dict[str, list[int]]:
        """Per topic sent since *subid* joined: [first sequence due to it, next sequence]."""
        joined = self._joined.get(subid, {})
        return {
            topic: [joined.get(topic, 1), nxt]
            for topic, nxt in self._seq.items()
            if nxt > joined.get(topic, 1)
        }

    def _send_end(self, subid: str) -> None:
        payload = {"p": self.pubid, "s": self.source, "t": self._due(subid)}
        frames = [
            codec.BEACON_PREFIX + subid.encode(),
            codec.END_MARK,
            json.dumps(payload, separators=(",", ":")).encode(),
        ]
        with contextlib.suppress(zmq.Again):  # --block, queue full: again next round
            self.sock.send_multipart(frames, zmq.NOBLOCK)

    def finish(self, linger: float) -> Outcome:
        """End the stream: wait up to *linger* seconds until every subscriber confirmed it.

        An acknowledgement comes after everything sent before it (one
        connection keeps order), so a confirmed subscriber has nothing queued
        any more and reports exactly what it lost.
        """
        deadline = time.monotonic() + linger
        pending = self.subscribers.keys() - self._left.keys()
        resend = 0.0
        while True:
            self.service()
            pending -= self._left.keys() | self._acks.keys()
            pending &= self.subscribers.keys() | self._dropped.keys()
            now = time.monotonic()
            if pending and now >= resend:  # (sent at least once, even with no linger)
                for subid in pending - self._dropped.keys():
                    self._send_end(subid)
                resend = now + END_RESEND
            if not pending or now >= deadline:
                break
            self.sock.poll(max(1, int(min(deadline - now, resend - now, 0.05) * 1000)))
        self._report_gone(0.0)
        unconfirmed = {
            subid: sum(n - first for first, n in self._due(subid).values())
            for subid in pending
            if subid in self.subscribers
        }
        lost = {subid: n for subid, n in self._acks.items() if n}
        return Outcome(lost, unconfirmed, list(self.gone))
