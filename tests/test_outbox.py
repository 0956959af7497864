"""core/outbox.py: how much a peer's pipe takes at once, in messages and in bytes.

The peer is an inproc DEALER that reads nothing until told: an inproc pipe has
no I/O thread draining it, so what it takes is exactly the sender's mark plus
the reader's (1 here), whatever the machine's load.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from eda.core import outbox as ob
from eda.core.lb import protocol as p
from eda.core.lb.commands import DEPTH
from tests.helpers import wait_until


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes], bytes]]:
    """(a bounded ROUTER, its peer that reads nothing yet, the peer's identity)."""
    ctx = zmq.Context.instance()
    router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    peer: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    for sock in (router, peer):
        sock.setsockopt(zmq.LINGER, 0)
    ob.Outbox.adopt(router)
    peer.setsockopt(zmq.RCVHWM, 1)
    name = f"inproc://outbox-{id(router)}"
    router.bind(name)
    peer.connect(name)
    peer.send_multipart(p.request(b"r0", 0, b"hello"))
    assert router.poll(5000), "the peer's request"
    ident = router.recv_multipart()[0]
    yield router, peer, ident
    peer.close()
    router.close()


def read_all(peer: zmq.Socket[bytes], count: int) -> list[list[bytes]]:
    got = []
    for _ in range(count):
        assert peer.poll(5000), f"{len(got)}/{count} replies"
        got.append(peer.recv_multipart())
    return got


def test_a_burst_of_replies_as_large_as_a_process_answers_goes_out_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    # the replies to one read of a persistent process's output (up to DEPTH lines): a
    # 64-message pipe took a quarter of them, the rest waited in the outbox and went out
    # half a pipe at a time, each a wake-up of the worker (its POLLOUT) and of ZeroMQ's
    # I/O thread, and each a smaller batch for the caller: a worker woke twice as often
    # per request, and so did the caller and the command
    router, peer, ident = pair
    box = ob.Outbox()
    replies = [p.reply(b"r%d" % i, p.OK, b"line %d" % i) for i in range(DEPTH)]
    for frames in replies:
        assert box.send(router, ident, frames)
    assert not box.waiting and not box.kept and box.bytes == 0  # all in the pipe
    assert read_all(peer, DEPTH) == replies


def test_large_replies_to_a_peer_that_does_not_read_stop_at_the_pipes_byte_bound(pair) -> None:  # type: ignore[no-untyped-def]
    # the deep pipe is bounded in bytes too: replies over LARGE bytes are counted while
    # ZeroMQ holds them, up to LARGE_BYTES; the next ones wait in the outbox (bounded
    # per peer itself), and go once the peer has read
    router, peer, ident = pair
    box = ob.Outbox()
    size = 1 << 20
    fit = ob.LARGE_BYTES // size
    replies = [p.reply(b"r%d" % i, p.OK, bytes([65 + i % 26]) * size) for i in range(fit + 4)]
    for frames in replies:
        assert box.send(router, ident, frames)
    assert box.in_pipe[(router, ident)] == fit * size <= ob.LARGE_BYTES
    assert len(box.waiting[(router, ident)]) == 4 and box.bytes >= 4 * size
    box.flush()  # (True: something was kept since the last flush)
    assert not box.flush() and len(box.waiting[(router, ident)]) == 4  # it does not read
    got = read_all(peer, fit)
    assert box.flush() and not box.waiting  # read: room again, the rest goes
    got += read_all(peer, 4)
    assert got == replies

    def let_go() -> bool:  # all written: ZeroMQ reports it on the trackers, a moment later
        box.flush()
        return (router, ident) not in box.tracked and box.bytes == 0

    wait_until(let_go, 10, "the tracked replies let go once written")


def test_the_pipe_to_a_peer_is_bounded_in_bytes_as_documented() -> None:
    assert ob.HWM >= DEPTH  # one process's answers fit at once
    assert ob.HWM * ob.LARGE + ob.LARGE_BYTES == ob.PIPE_BYTES <= 64 << 20
