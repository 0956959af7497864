"""A caller's input and output: request bodies read as they can be sent, replies
written in input order.

:class:`Input` reads request bodies from a descriptor (one line each) or from
an iterable, only as fast as the caller asks for them (it stops watching the
descriptor once *read_ahead* lines wait).  A line over the size limit keeps
only its head (for the error message) and its real size: input without a
newline costs neither unbounded memory nor quadratic copying.

:class:`Output` writes replies in input order (or as they come with
*unordered*): a reply that comes before an earlier one is held until the
earlier one is answered or failed; the caller pauses reading input while
too many are held.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

READ_CHUNK = 1 << 16


class _Long(bytes):
    """The kept head of an input line over the size limit, and the line's real size."""

    size: int

    def __new__(cls, head: bytes, size: int) -> _Long:
        line = super().__new__(cls, head)
        line.size = size
        return line


class Input:
    """Request bodies from :meth:`feed` (an iterable) or :meth:`feed_fd` (lines of a
    descriptor, watched by *daemon*'s poll loop; *on_read* is called after each read)."""

    def __init__(
        self, daemon: Any, max_request: int, read_ahead: int, on_read: Callable[[], None]
    ) -> None:
        self.daemon = daemon  # a core.daemon.Daemon: watch() and forget()
        self.max_request, self.read_ahead, self.on_read = max_request, read_ahead, on_read
        self.source: Iterator[bytes] | None = None
        self.fd = -1
        self.partial = b""
        self.skipped = 0  # bytes of the current input line dropped (it is over the limit)
        self.eof = False
        self.lines: collections.deque[bytes] = collections.deque()

    def feed(self, items: Iterable[bytes]) -> None:
        """Requests from *items* (one body each), e.g. the command line's arguments."""
        self.source = iter(items)

    def feed_fd(self, fd: int) -> None:
        """Requests from the lines read from *fd* (newlines removed)."""
        self.fd = fd
        os.set_blocking(fd, False)
        self.daemon.watch(fd, "input", self._read)

    def start(self) -> None:
        if self.source is not None and self.fd < 0:
            self.eof = False

    def _read(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            self.daemon.forget(self.fd)
            if self.partial:
                tail = self.partial
                self.lines.append(_Long(tail, self.skipped + len(tail)) if self.skipped else tail)
                self.partial, self.skipped = b"", 0
        else:
            keep = self.max_request + 1
            parts = (self.partial + data).split(b"\n")
            tail = parts.pop()
            if self.skipped and parts:  # the long line ends here
                first = parts[0]
                parts[0] = _Long(first[:keep], self.skipped + len(first))
                self.skipped = 0
            if len(tail) > keep:
                self.skipped += len(tail) - keep
                tail = tail[:keep]
            self.partial = tail
            self.lines.extend(parts)
        if len(self.lines) >= self.read_ahead or self.eof:
            self.daemon.forget(self.fd)  # enough read ahead: read on when they are sent
        self.on_read()

    def next_body(self) -> bytes | None:
        """The next request body, or None when there is none yet (or no more)."""
        if self.lines:
            return self.lines.popleft()
        if self.source is not None:
            item = next(self.source, None)
            if item is None:
                self.source = None
                self.eof = True
            return item
        if self.fd >= 0 and not self.eof:
            self.daemon.watch(self.fd, "input", self._read)
        return None

    @property
    def more(self) -> bool:
        """Whether bodies may still come."""
        return bool(self.lines) or self.source is not None or not self.eof

    @property
    def exhausted(self) -> bool:
        return self.eof and not self.lines and self.source is None

    def next_unsent(self) -> bytes | None:
        """The next body already read or given, without reading the descriptor."""
        return self.next_body() if self.lines or self.source is not None else None

    def stop(self) -> None:
        """Read no more."""
        self.lines.clear()
        self.source = None
        self.eof = True
        if self.fd >= 0:
            self.daemon.forget(self.fd)

    def restore(self) -> None:
        """Leave the descriptor as it was (a terminal or a pipe shared with others)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, True)


class Output:
    """Replies to *out*, in input order unless *unordered*; failures leave a gap that is
    skipped (they are reported elsewhere)."""

    def __init__(self, out: Callable[[bytes], None], unordered: bool) -> None:
        self.out, self.unordered = out, unordered
        self.next_out = 0  # the next line to emit in order
        self.held: dict[int, bytes | None] = {}  # finished out of order (None: failed)
        self.buf: list[bytes] = []

    def answered(self, seq: int, body: bytes) -> None:
        """Request *seq* was answered with *body* (written with the next :meth:`emit`)."""
        if self.unordered:
            self.buf.append(body)
            self.buf.append(b"\n")
        elif seq == self.next_out:
            self.buf.append(body)
            self.buf.append(b"\n")
            self.next_out += 1
            if self.held:
                self._release_held()
        else:
            self.held[seq] = body

    def failed(self, seq: int) -> None:
        """Request *seq* failed: nothing is written for it."""
        if self.unordered:
            return
        if seq == self.next_out:
            self.next_out += 1
            self._release_held()
        else:
            self.held[seq] = None

    def _release_held(self) -> None:
        held, buf = self.held, self.buf
        while self.next_out in held:
            body = held.pop(self.next_out)
            if body is not None:
                buf.append(body)
                buf.append(b"\n")
            self.next_out += 1

    def emit(self) -> None:
        if self.buf:
            data = b"".join(self.buf)
            self.buf.clear()
            self.out(data)
