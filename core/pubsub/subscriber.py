"""The subscriber: SUB, loss detection per (publisher, topic) stream, the end of stream
(the design is in the package docstring, :mod:`eda.core.pubsub`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import codec, discovery
from ..limits import BoundedMap
from ..sockets import new_socket
from ..topics import Matcher
from .node import (
    _PEER_ID,
    _RECV_HWM_CAP,
    CLOSE_LINGER,
    MAX_EVENTS_PER_RECEIVE,
    MAX_PEERS,
    MAX_STREAMS,
    UNREADY_AFTER,
    LossCallback,
    _Node,
)


class Subscriber(_Node):
    """A SUB socket that yields accepted batches, reporting gaps and dropping duplicates."""

    announce_type = discovery.SUB_TYPE
    browse_type = discovery.PUB_TYPE

    def __init__(
        self,
        patterns: list[str],
        *,
        interface: str | None = None,
        hwm: int = 10_000,
        on_loss: LossCallback | None = None,
        on_connect: Callable[[discovery.Peer], None] | None = None,
        on_unreachable: Callable[[str, bool], None] | None = None,
    ) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = new_socket(zmq.SUB, context=ctx)
        super().__init__(ctx, sock, interface)
        self.matcher = Matcher(patterns)
        self.on_connect = on_connect
        self.subid = self.id
        self.on_loss = on_loss
        # called once per watched endpoint (connect(..., watch=True)) that has not
        # answered UNREADY_AFTER seconds after connecting, with "connection refused"
        self.on_unreachable = on_unreachable
        self.malformed = 0
        self.publishers = self.linked  # pubids whose welcome arrived
        # (pubid, topic) -> [next sequence, first sequence seen (0: unknown)]
        self._streams: BoundedMap[tuple[str, str], list[int]] = BoundedMap(MAX_STREAMS)
        self._lost: BoundedMap[str, int] = BoundedMap(MAX_PEERS)  # pubid -> lost in gaps so far
        # pubid -> events lost, once its end of stream came
        self._ended: BoundedMap[str, int] = BoundedMap(MAX_PEERS)
        # events an end of stream said were sent whose fate is unknown here: their
        # stream was forgotten (more than MAX_STREAMS), so neither delivered nor lost
        self.unaccounted = 0
        self._alarm = False  # a publisher refused this key since poll last returned
        # the queue is bounded in bytes too: a batch of many small events is up to
        # codec.MAX_BATCH_BYTES, so --hwm batches of any size cannot take gigabytes
        sock.setsockopt(zmq.RCVHWM, min(hwm, _RECV_HWM_CAP))
        sock.setsockopt(zmq.IMMEDIATE, 1)  # subscriptions (and the goodbye) go to live peers only
        sock.setsockopt(zmq.LINGER, 0)
        for prefix in self.matcher.prefixes():
            sock.subscribe(prefix.encode())
        sock.subscribe(codec.WELCOME_PREFIX)
        sock.subscribe(codec.BEACON_PREFIX + self.subid.encode())

    def poll(self, timeout: float | None) -> bool:
        """Wait up to *timeout* seconds (None: forever) for a message.

        False (no message) also as soon as a publisher refused this key (secure
        mode: see :meth:`take_refusals`), so a caller never waits in vain.
        """
        self.housekeeping()
        if timeout is None:
            while not self.sock.poll(100):
                self.housekeeping()
                if self._alarm:
                    self._alarm = False
                    return False
            return True
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self.sock.poll(max(0, int(min(left, 0.1) * 1000))):
                return True
            self.housekeeping()
            if self._alarm:
                self._alarm = False
                return False
            if left <= 0.1:
                return bool(self.sock.poll(0))

    def housekeeping(self) -> None:
        """What goes on while no message arrives (:meth:`poll` does it; a caller
        waiting on this socket with others does it at least every 0.1 s): connect
        to discovered publishers, take refusals, report unanswered endpoints."""
        self.connect_discovered()
        if self.security is not None and self.take_refusals():
            self._alarm = True  # poll returns: the caller may have to give up
        if self._watch is not None and self.on_unreachable is not None:
            for endpoint, refused in self._watch.unready(UNREADY_AFTER):
                if endpoint not in self._watch.reported:
                    self._watch.reported.add(endpoint)
                    self.on_unreachable(endpoint, refused)

    def receive(
        self, max_messages: int = 256, max_events: int = MAX_EVENTS_PER_RECEIVE
    ) -> list[codec.Batch]:
        """Accept the messages waiting now, without blocking: at most *max_messages*,
        and no more once *max_events* events are taken (so output keeps flowing
        and memory stays bounded under a burst)."""
        out: list[codec.Batch] = []
        recv = self.sock.recv_multipart
        matcher = self.matcher
        streams = self._streams
        recent = streams.recent.get  # (a hit here is all the per-batch lookup costs)
        events = 0
        for _ in range(max_messages):
            if events >= max_events:
                break
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[0][:1] == b"\x00":
                if frames[0][:2] == codec.WELCOME_PREFIX:
                    pubid = frames[0][2:].decode(errors="replace")
                    if _PEER_ID.fullmatch(pubid):
                        self.publishers.add(pubid)
                    else:
                        self.malformed += 1
                elif frames[0][:2] == codec.BEACON_PREFIX:
                    self._end_of_stream(frames)
                continue
            try:
                batch = codec.decode(frames)
            except codec.WireError:
                self.malformed += 1
                continue
            if not matcher(batch.topic):
                continue
            events += batch.size
            key = (batch.pubid, batch.topic)
            stream = recent(key) or streams.get(key)
            if stream is None:
                # a new stream; after streams were forgotten it may be one of them
                # coming back, whose first sequence is then unknown
                streams[key] = [batch.seq + batch.size, 0 if streams.evicted else batch.seq]
                out.append(batch)
                continue
            expected = stream[0]
            if batch.seq == expected:
                stream[0] = expected + batch.size
                out.append(batch)
            elif batch.seq > expected:
                stream[0] = batch.seq + batch.size
                self._lost[batch.pubid] = self._lost.get(batch.pubid, 0) + batch.seq - expected
                if self.on_loss is not None:
                    self.on_loss(batch.source, batch.topic, batch.seq - expected)
                out.append(batch)
            else:
                stream[0] = max(expected, batch.seq + batch.size)
                trimmed = _trim(batch, expected)
                if trimmed is not None:
                    out.append(trimmed)
        return out

    @property
    def evicted(self) -> int:
        """Publishers and streams forgotten to stay within :data:`MAX_PEERS` and
        :data:`MAX_STREAMS` (a peer inventing ids, or a very wide stream)."""
        return self._streams.evicted + self.publishers.evicted + self._lost.evicted

    def _end_of_stream(self, frames: list[bytes]) -> None:
        """A publisher's end of stream: report head and tail gaps, then acknowledge."""
        try:
            pubid, source, due = _parse_end(frames)
        except ValueError:
            self.malformed += 1
            return
        ended = self._ended.get(pubid)
        if ended is None:
            ended = self._ended[pubid] = self._gaps(pubid, source, due)
        self._acknowledge(pubid, ended)

    def _gaps(self, pubid: str, source: str, due: dict[str, tuple[int, int]]) -> int:
        """Events of *pubid* lost here, given what its end of stream says was sent."""
        lost = self._lost.pop(pubid, 0)
        streams = self._streams
        for topic, (first, end) in due.items():
            if not self.matcher(topic):
                continue
            stream = streams.get((pubid, topic))
            if stream is None and streams.evicted:
                self.unaccounted += end - first  # forgotten, or never arrived: unknown
                continue
            if stream is None:
                missing = end - first  # not one of them arrived
            else:
                got, seen = stream
                head = max(0, seen - first) if seen else 0  # (0: first one unknown)
                missing = head + max(0, end - got)
            if missing > 0:
                lost += missing
                if self.on_loss is not None:
                    self.on_loss(source, topic, missing)
        return lost

    def _acknowledge(self, pubid: str, lost: int) -> None:
        """Tell publisher *pubid* how many of its events were lost here."""
        ack = codec.ACK_PREFIX + f"{pubid} {self.subid} {lost}".encode()
        self.sock.subscribe(ack)  # XPUB_VERBOSE hands this to the publisher...
        self.sock.unsubscribe(ack)  # ...and nothing stays subscribed

    def close(self, linger: float = CLOSE_LINGER) -> None:
        """Say goodbye to every publisher (leaving on purpose is not loss), then close.

        A publisher whose events were lost here (a gap, before its end of
        stream) is first told how many, as an acknowledgement would: leaving
        early (``--strict``, ``-C``) must not hide that loss from it.
        """
        for pubid, lost in self._lost.items():
            if lost and pubid not in self._ended:
                self._acknowledge(pubid, lost)
        self.sock.subscribe(codec.BYE_PREFIX + self.subid.encode())
        super().close(linger)


def _parse_end(frames: list[bytes]) -> tuple[str, str, dict[str, tuple[int, int]]]:
    """Validate an end-of-stream message; ValueError when it is not one."""
    if len(frames) != 3 or frames[1] != codec.END_MARK or len(frames[2]) > codec.MAX_END_BYTES:
        raise ValueError("not an end-of-stream message")
    try:
        value = json.loads(frames[2])
    except (ValueError, RecursionError):
        raise ValueError("invalid end-of-stream JSON") from None
    if not isinstance(value, dict):
        raise ValueError("end of stream is not an object")
    pubid, source, topics = value.get("p"), value.get("s"), value.get("t")
    if not isinstance(pubid, str) or not isinstance(source, str) or not isinstance(topics, dict):
        raise ValueError("end of stream lacks p, s or t")
    due: dict[str, tuple[int, int]] = {}
    for topic, pair in topics.items():
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(type(n) is int and 1 <= n < 1 << 63 for n in pair)
            or pair[0] > pair[1]
        ):
            raise ValueError(f"bad sequence range for topic {topic!r}")
        due[topic] = (pair[0], pair[1])
    return pubid, source, due


def _trim(batch: codec.Batch, first_seq: int) -> codec.Batch | None:
    """*batch* without the events before *first_seq* (duplicates), or None."""
    skip = first_seq - batch.seq
    if skip >= batch.size:
        return None
    parts = codec.split_body(batch)[skip:]
    return batch._replace(seq=first_seq, size=len(parts), body=b"\n".join(parts))
