"""Turning input into events: stdin lines, whole files and arguments, for a Publisher.

The plain-text path is the hot path of ``eda-pub < file``: a chunk read from
stdin goes out as one batch without splitting it into lines (only blank lines
force a split).  JSON, envelope and paced input are checked line by line;
a bad line is handed to ``on_reject`` and skipped, and the rest goes on.
"""

from __future__ import annotations

import json
import os
import select
import stat
import threading
import time
from collections.abc import Callable

from . import codec
from .envelope import parse_envelope
from .errors import InputError
from .pubsub import Publisher

CHUNK = codec.MAX_BATCH_BYTES  # one read, one batch: a batch of many events stays this small

RejectCallback = Callable[[InputError], None]


def compact_json(raw: bytes, lineno: int | None = None) -> bytes:
    """*raw* as compact JSON text, or InputError."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise InputError(f"invalid JSON: {exc}", lineno) from None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def send_arguments(
    pub: Publisher, topic: str, messages: list[bytes], kind: int, on_reject: RejectCallback
) -> int:
    """Send each message as one event (one batch when none spans lines); return rejects."""
    good: list[bytes] = []
    rejected = 0
    for number, raw in enumerate(messages, 1):
        try:
            good.append(compact_json(raw) if kind == codec.JSON else raw)
        except InputError as exc:
            rejected += 1
            on_reject(InputError(f"argument {number}: {exc}"))
    if any(b"\n" in m for m in good):
        for m in good:
            pub.send(topic, m, 1, kind)
    elif good:
        pub.send(topic, b"\n".join(good), len(good), kind)
    return rejected


class Feeder:
    """Reads a file descriptor in large chunks and publishes every complete line."""

    def __init__(
        self,
        pub: Publisher,
        topic: str | None,
        *,
        kind: int = codec.TEXT,
        envelope: bool = False,
        rate: float | None = None,
        on_reject: RejectCallback,
    ) -> None:
        self.pub = pub
        self.topic = topic
        self.kind = codec.ENVELOPE if envelope else kind
        self.rate = rate
        self.on_reject = on_reject
        self.rejected = 0
        self.lineno = 0
        self._next_send = time.monotonic()

    def run(
        self,
        fd: int,
        *,
        on_read: Callable[[int], None] | None = None,
        announce_after: float | None = None,
        on_announced: Callable[[], None] | None = None,
    ) -> None:
        """Publish until end of input.

        With *announce_after*, a feed still running after that many seconds
        announces itself by mDNS (a one-shot ``eda-pub < file`` never pays
        for it; a ``tail -f | eda-pub`` is found by later subscribers).
        """
        timer: threading.Timer | None = None
        if announce_after is not None:
            self.pub.bind_for_announce()
            topics = [self.topic] if self.topic else []
            timer = threading.Timer(announce_after, self.pub.announce, (topics, on_announced))
            timer.daemon = True
            timer.start()
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        pending = b""
        try:
            while True:
                if not regular:
                    while not select.select([fd], [], [], 0.1)[0]:
                        self.pub.service()  # idle: take in new subscribers meanwhile
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                if on_read is not None:
                    on_read(len(chunk))
                data = pending + chunk if pending else chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                pending = data[cut + 1 :]
                self.lines(data[:cut])
                self.pub.service()
            if pending:
                self.lines(pending)
        finally:
            if timer is not None:
                timer.cancel()

    def lines(self, body: bytes) -> None:
        """Publish the lines in *body* (no trailing newline); blank lines are skipped."""
        if self.kind != codec.TEXT or self.rate:
            self._checked_lines(body.split(b"\n"))
            return
        if b"\n\n" in body or body[:1] == b"\n":
            body = b"\n".join(line for line in body.split(b"\n") if line)
        if body:
            self.pub.send(self.topic or "", body, body.count(b"\n") + 1)

    def _checked_lines(self, lines: list[bytes]) -> None:
        pub = self.pub
        good: list[bytes] = []
        topic = self.topic or ""
        for line in lines:
            self.lineno += 1
            if not line.strip():
                continue
            try:
                if self.kind == codec.ENVELOPE:
                    line_topic, raw = parse_envelope(
                        line, self.lineno, self.topic, pub.source, pub.next_envelope_id
                    )
                    if line_topic != topic:
                        self._send(topic, good)
                        good, topic = [], line_topic
                    good.append(raw)
                elif self.kind == codec.JSON:
                    good.append(compact_json(line, self.lineno))
                else:
                    good.append(line)
            except InputError as exc:
                self.rejected += 1
                self.on_reject(exc)
            if self.rate:
                self._send(topic, good)
                good = []
        self._send(topic, good)

    def _send(self, topic: str, payloads: list[bytes]) -> None:
        if not payloads:
            return
        if self.rate:
            now = time.monotonic()
            if self._next_send > now:
                time.sleep(self._next_send - now)
            self._next_send = max(self._next_send, now) + 1.0 / self.rate
        self.pub.send(topic, b"\n".join(payloads), len(payloads), self.kind)
