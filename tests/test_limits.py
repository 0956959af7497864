"""core/limits.py: the queued-bytes bound shared by the daemons."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core.limits import PeerBytes, QueuedBytes

_steps = st.lists(
    st.tuples(
        st.sampled_from(["add", "release", "forget"]),
        st.integers(0, 3),  # peer
        st.integers(1, 50),  # units
        st.integers(0, 5000),  # bytes
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_queued_bytes_add_up_and_stay_within_their_bounds(
    steps: list[tuple[str, int, int, int]],
) -> None:
    q = QueuedBytes(per_peer=8000, total=20000)
    for op, peer, units, size in steps:
        if op == "add":
            if not q.room(peer, size):
                assert q.held(peer) > 0
                continue
            q.add(peer, units, size)
        elif op == "release":
            before = q.held(peer)
            q.release(peer, units)
            assert 0 <= q.held(peer) <= before
        else:
            q.forget(peer)
            assert q.held(peer) == 0
        assert q.total == sum(q.held(p) for p in range(4))
        # a peer exceeds its bound by at most the one item it may always be sent
        assert all(q.held(p) <= 8000 + 5000 for p in range(4))
        assert q.total <= 20000 + 4 * 5000


def test_releasing_what_was_sent_frees_it_in_order_and_in_proportion() -> None:
    q = QueuedBytes(per_peer=1000, total=1000)
    q.add("a", 10, 500)
    q.add("a", 10, 400)
    assert not q.room("a", 200) and q.room("b", 10_000)  # a peer holding nothing gets one
    q.release("a", 15)  # the first ten and half the next
    assert q.held("a") == 200 and q.total == 200
    q.release("a", 100)  # more than was sent: all of it, no less than nothing
    assert q.held("a") == 0 and q.total == 0


def test_the_total_holding_a_peer_back_is_told_and_the_oldest_untaken_item_dated() -> None:
    q = QueuedBytes(per_peer=1000, total=1500)
    q.add("a", 1, 900)
    assert not q.room("a", 200) and not q.crowded  # its own bound
    q.add("b", 1, 500)
    assert q.room("c", 100)  # a peer holding nothing may always be sent one
    q.add("c", 1, 100)
    assert not q.room("c", 100) and q.crowded  # within its own bound: the total
    first = q.untaken_since("a")
    q.add("a", 1, 50)
    assert first is not None and q.untaken_since("a") == first
    q.release("a", 1)
    assert (q.untaken_since("a") or 0) >= first and q.untaken_since("d") is None
    q.release("a", 1)
    assert q.untaken_since("a") is None


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_peer_bytes_add_up_and_fits_keeps_both_bounds(
    steps: list[tuple[str, int, int, int]],
) -> None:
    held = PeerBytes(per_peer=8000, total=20000)
    for op, peer, _units, size in steps:
        if op == "add":
            if held.fits(peer, size):
                held.add(peer, size)
        elif op == "release":
            held.remove(peer, min(size, held.held(peer)))
        else:
            held.forget(peer)
            assert held.held(peer) == 0
        assert held.total == sum(held.held(p) for p in range(4))
        assert all(held.held(p) <= 8000 for p in range(4)) and held.total <= 20000
        assert all(held.full(p) == (held.held(p) >= 8000) for p in range(4))


def test_the_bus_and_the_outbox_count_bytes_the_same_way() -> None:
    from eda.core.outbox import Outbox

    outbox, queued = Outbox(peer_bytes=100, total_bytes=150), QueuedBytes(100, 150)
    assert isinstance(outbox.held, PeerBytes) and isinstance(queued.bytes, PeerBytes)
    queued.add("a", 1, 60)
    outbox.held.add("a", 60)
    assert queued.total == outbox.bytes == 60
    assert queued.room("b", 100) and not queued.room("a", 50)  # 110 > 100 for a
    assert not outbox.held.fits("a", 50) and outbox.held.fits("b", 90)
