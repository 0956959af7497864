"""Confirmed publishing to eda-bus.

:class:`BusPublisher` has the ``send(topic, body, count, kind)`` shape of
:class:`eda.core.pubsub.Publisher`, so :class:`eda.core.feed.Feeder` feeds it
unchanged.  Batches go out pipelined (up to a window); each is kept until the
bus confirms it durable.  When no confirmation arrives for
:data:`RESEND_AFTER` seconds (a bus restart, a lost connection), every
unconfirmed batch is sent again with the same publisher id and sequences:
the bus stores each event at most once, so resending is always safe.  A batch
the bus refused for now (``retry``: its store failed, e.g. a JetStream stream
electing a leader) goes again as soon as a confirmation shows the bus stores
again.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import time
from typing import Any, NamedTuple

import zmq

from .. import codec
from ..endpoint import Endpoint
from ..errors import ProtocolError
from ..reqrep import client_endpoint, decode
from ..sockets import stop_monitor
from . import protocol as p
from .link import LOOK_AGAIN_AFTER, ConfirmTimeout, Relocate, check_refused, moved, watched_dealer

RESEND_AFTER = 1.0  # s without any confirmation while some are due: send them all again
WINDOW_BYTES = 32 << 20  # unconfirmed bytes in flight before send() waits
WINDOW_BATCHES = 4096


class Unconfirmed(NamedTuple):
    topic: str
    first: int  # publisher sequence of the first event
    events: int
    pubid: str

    def __str__(self) -> str:
        last = self.first + self.events - 1
        ids = f"{self.pubid}-{self.first}" + (f"..{self.pubid}-{last}" if self.events > 1 else "")
        return f"{self.topic} {ids} ({self.events} event(s))"


class BusPublisher:
    """Confirmed publishing to a bus (see the module docstring)."""

    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        headers: dict[str, str] | None = None,
        source: str | None = None,
        timeout: float = 30.0,
        resend_after: float = RESEND_AFTER,
        relocate: Relocate | None = None,
    ) -> None:
        """*relocate* finds the bus again (e.g. :func:`find_bus`: cache, then mDNS) when
        it stops answering; the pending batches then go to where it is now."""
        self.endpoint = client_endpoint(endpoint, "bus")
        self._relocate = relocate
        self._looked = 0.0
        # 128 random bits: the bus keeps every (pubid, topic)'s sequences, so an id
        # another run ever used would have this run's events dropped as duplicates
        # (os.urandom(n).hex(): secrets.token_hex(n) without importing hmac and OpenSSL)
        self.pubid = os.urandom(16).hex()
        self.source = source or f"eda://{socket.gethostname()}/pub/{self.pubid}"
        self._origin = codec.encode_origin(self.pubid, self.source)
        self._ext = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
        self.timeout = timeout
        self.resend_after = resend_after
        # secure mode: the monitor that tells of a refusal later than dealer()'s wait
        self.sock, self._mon = watched_dealer(self.endpoint)
        self._seq: dict[str, int] = {}
        self._envelope_ids = 0
        self._tags = 0
        self.pending: collections.OrderedDict[int, list[bytes]] = collections.OrderedDict()
        self._pending_bytes = 0
        self._progress = time.monotonic()  # last confirmation (or start of waiting)
        self._resent_at = 0.0
        self.confirmed = 0  # events
        self.resent = 0  # batches sent again
        self.refused: list[tuple[Unconfirmed, str]] = []  # batches the bus will never take
        self.warnings: list[str] = []  # retryable refusals (disk full...), newest last
        self._retry: set[int] = set()  # tags the bus refused for now, to send again

    # -- the Publisher shape Feeder uses --------------------------------------------
    def send(self, topic: str, body: bytes, count: int, kind: int = codec.TEXT) -> None:
        seq = self._seq.get(topic, 1)
        self._seq[topic] = seq + count
        self._tags += 1
        tag = self._tags
        frames = [
            p.PUBLISH,
            p.TAG.pack(tag),
            topic.encode(),
            codec.encode_header(kind, count, seq, time.time(), self._origin),
            body,
        ]
        if self._ext:
            frames.append(self._ext)
        if not self.pending:
            self._progress = time.monotonic()
        self.pending[tag] = frames
        self._pending_bytes += len(body)
        self._push(frames)
        self.service()
        while len(self.pending) >= WINDOW_BATCHES or self._pending_bytes >= WINDOW_BYTES:
            self._wait(time.monotonic() + self.timeout, stall=True)

    def service(self) -> None:
        """Take in confirmations that arrived (never waits); :class:`~eda.core.reqrep.Refused`
        when the bus refused this program's key (secure mode), however late."""
        check_refused(self._mon, self.endpoint)
        while self.sock.poll(0):
            self._receive()

    def bind_for_announce(self) -> None:  # a bus publisher is never announced
        pass

    def announce(self, *_args: Any) -> None:
        pass

    def next_envelope_id(self) -> str:
        self._envelope_ids += 1
        return f"{self.pubid}-e{self._envelope_ids}"

    @property
    def total_sent(self) -> int:
        return sum(self._seq.values()) - len(self._seq)

    # -- confirmations ----------------------------------------------------------------
    def _push(self, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[4]) < 65536)
        except zmq.Again:
            return False  # sent again after RESEND_AFTER
        return True

    def _receive(self) -> None:
        frames = self.sock.recv_multipart()
        kind = frames[0]
        if kind == p.CONFIRM and len(frames) == 2:
            try:
                tags = p.unpack_tags(frames[1])
            except ValueError:
                return
            for tag in tags:
                self._settle(tag)
            self._progress = time.monotonic()
            if self._retry:  # the bus stores again: what it refused meanwhile goes again
                retry, self._retry = self._retry, set()
                for tag in sorted(retry):  # in the order they were sent first
                    again = self.pending.get(tag)
                    if again is not None:
                        if not self._push(again):
                            break  # (the rest go with the next resend of everything)
                        self.resent += 1
        elif kind == p.REFUSED and len(frames) == 3 and len(frames[1]) == 8:
            (tag,) = p.TAG.unpack(frames[1])
            try:
                info = decode(frames[2])
            except ProtocolError:
                return
            error = str(info.get("error", "refused"))[:300]
            if info.get("retry"):
                self.warnings[:] = [*self.warnings[-9:], error]
                if tag in self.pending:
                    self._retry.add(tag)
                return
            batch = self.pending.get(tag)
            if batch is not None:
                self.refused.append((self._describe(batch), error))
                self._settle(tag, stored=False)

    def _settle(self, tag: int, *, stored: bool = True) -> None:
        frames = self.pending.pop(tag, None)
        if frames is not None:
            self._pending_bytes -= len(frames[4])
            if stored:  # a refused batch is settled, never counted as confirmed
                self.confirmed += struct_count(frames[3])

    def _describe(self, frames: list[bytes]) -> Unconfirmed:
        return Unconfirmed(frames[2].decode(), struct_seq(frames[3]), struct_count(frames[3]),
                           self.pubid)  # fmt: skip

    def _wait(self, deadline: float, *, stall: bool = False, limit: float | None = None) -> None:
        """Wait for confirmations until *deadline*, resending when they stop coming."""
        while self.pending:
            now = time.monotonic()
            if stall:
                deadline = self._progress + (self.timeout if limit is None else limit)
            if now >= deadline:
                raise ConfirmTimeout(self._timeout_text())
            since = max(self._progress, self._resent_at)
            if now - since >= self.resend_after:
                self._look_again(now)
                self._resend()
                since = now
            wait = min(deadline, since + self.resend_after) - now
            if self._ready(max(1, int(wait * 1000))):
                self.service()
                if limit is None and stall and len(self.pending) < WINDOW_BATCHES // 2:
                    return

    def _ready(self, timeout_ms: int) -> bool:
        """Whether a confirmation (or, in secure mode, a handshake event) came within
        *timeout_ms*."""
        if self._mon is None:
            return bool(self.sock.poll(timeout_ms))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        return bool(poller.poll(timeout_ms))

    def _look_again(self, now: float) -> None:
        """No answer for a while: find the bus again; if it moved, talk to it there."""
        silent = now - self._progress
        if self._relocate is None or silent < LOOK_AGAIN_AFTER or now - self._looked < 1.0:
            return
        self._looked = now
        endpoint = moved(self._relocate, self.endpoint)
        if endpoint is not None:  # (None: not moved, or none found now: resend where it was)
            self.close()
            self.sock, self._mon = watched_dealer(endpoint)
            self.endpoint = endpoint

    def _resend(self) -> None:
        self._resent_at = time.monotonic()
        for frames in list(self.pending.values()):
            if not self._push(frames):
                break
            self.resent += 1

    def finish(self, timeout: float | None = None) -> None:
        """Wait until every batch is confirmed; :class:`ConfirmTimeout` after *timeout*
        seconds without confirmation progress."""
        self._progress = time.monotonic()
        limit = self.timeout if timeout is None else timeout
        self._wait(self._progress + limit, stall=True, limit=limit)

    def unconfirmed(self) -> list[Unconfirmed]:
        return [self._describe(frames) for frames in self.pending.values()]

    def _timeout_text(self) -> str:
        missing = self.unconfirmed()
        events = sum(u.events for u in missing)
        shown = "; ".join(str(u) for u in missing[:5])
        more = f" and {len(missing) - 5} more batch(es)" if len(missing) > 5 else ""
        why = f" (bus said: {self.warnings[-1]})" if self.warnings else ""
        return (
            f"the bus at {self.endpoint.zmq} did not confirm {events} event(s) within"
            f" {self.timeout:g}s{why}: {shown}{more}"
        )

    def close(self) -> None:
        if self._mon is not None:
            stop_monitor(self.sock, self._mon)
            self._mon = None
        self.sock.close()


def struct_count(header: bytes) -> int:
    return int.from_bytes(header[2:6], "big")


def struct_seq(header: bytes) -> int:
    return int.from_bytes(header[6:14], "big")
