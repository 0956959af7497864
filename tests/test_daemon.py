"""The daemon base: guarded steps, timers, bounded drains, binding, shutdown.

These run the loop in the test's own thread with a stop predicate and a
deadline, so nothing waits on wall-clock sleeps.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable

import pytest
import zmq

from eda.core.daemon import BindError, Daemon, RateLimited, received
from eda.core.errors import UsageError


def serve_until(daemon: Daemon, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run *daemon* until *cond* holds; fail if it does not within *timeout*."""
    deadline = time.monotonic() + timeout
    daemon.serve(lambda: cond() or time.monotonic() > deadline)
    assert cond(), "condition not reached before the deadline"


@pytest.fixture
def daemon() -> object:
    warnings: list[str] = []
    d = Daemon(warn=warnings.append)
    d.warnings = warnings  # type: ignore[attr-defined]
    yield d
    d.close()


def test_a_handler_that_raises_is_counted_warned_once_and_the_loop_goes_on(
    daemon: Daemon,
) -> None:
    bad_in, bad_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    good_in, good_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    seen: list[bytes] = []

    def explode() -> None:
        bad_in.recv(100)  # consumed, then the handler breaks
        raise RuntimeError("handler bug")

    daemon.watch(bad_in, "bad input", explode)
    daemon.watch(good_in, "good input", lambda: seen.append(good_in.recv(100)))
    for i in range(5):
        bad_out.send(b"x")
        good_out.send(b"%d" % i)
    serve_until(daemon, lambda: daemon.failures == 5 and len(seen) == 5)
    assert seen == [b"0", b"1", b"2", b"3", b"4"]
    warnings = daemon.warnings  # type: ignore[attr-defined]
    assert len(warnings) == 1, warnings  # rate-limited: one line, not five
    assert "bad input failed: RuntimeError: handler bug" in warnings[0]
    for s in (bad_in, bad_out, good_in, good_out):
        s.close()


def test_periodic_and_one_shot_timers_fire_and_a_failing_timer_keeps_firing(
    daemon: Daemon,
) -> None:
    ticks: list[float] = []
    once: list[float] = []
    broken: list[float] = []
    cancelled: list[float] = []

    def breaks() -> None:
        broken.append(time.monotonic())
        raise ValueError("timer bug")

    order: list[str] = []
    started = time.monotonic()
    daemon.every(0.01, "tick", lambda: ticks.append(time.monotonic()))
    daemon.every(3600, "hourly", lambda: order.append("hourly"))
    daemon.after(0.05, "once", lambda: (once.append(time.monotonic()), order.append("once")))
    daemon.every(0.01, "broken", breaks)
    daemon.every(0.01, "cancelled", lambda: cancelled.append(0.0), first=0.2).cancel()
    serve_until(daemon, lambda: len(ticks) >= 5 and len(broken) >= 5 and len(once) == 1)
    serve_until(daemon, lambda: len(ticks) >= 10)  # the one-shot stays fired once
    assert len(once) == 1 and once[0] - started >= 0.05
    # a periodic timer first fires at once (first=0), not after its interval: the
    # hourly one ran before the 50 ms one-shot, however late the loop got going
    assert order == ["hourly", "once"]
    assert all(b >= a for a, b in itertools.pairwise(ticks))
    assert cancelled == []
    assert daemon.failures == len(broken)


def test_stop_from_a_handler_ends_serve(daemon: Daemon) -> None:
    calls: list[int] = []

    def step() -> None:
        calls.append(1)
        daemon.stop()

    daemon.every(0.01, "stopper", step)
    daemon.serve()  # returns: the handler asked it to
    assert calls == [1]


def test_keyboard_interrupt_is_never_swallowed(daemon: Daemon) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    daemon.after(0.0, "signal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        daemon.serve()


def test_drains_are_bounded(daemon: Daemon) -> None:
    pull = daemon.socket(zmq.PULL)
    endpoint = daemon.bind(pull, "tcp://127.0.0.1:*")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    for i in range(10):
        push.send(b"%d" % i)
    batches: list[int] = []
    daemon.watch(pull, "pull", lambda: batches.append(len(list(received(pull, 3)))))
    serve_until(daemon, lambda: sum(batches) == 10)
    assert max(batches) <= 3 and len(batches) >= 4
    push.close()


def test_a_port_in_use_is_a_runtime_error_and_a_bad_endpoint_a_usage_error(
    daemon: Daemon,
) -> None:
    first = daemon.socket(zmq.ROUTER)
    endpoint = daemon.bind(first, "tcp://127.0.0.1:*")
    second = daemon.socket(zmq.ROUTER)
    with pytest.raises(BindError, match="cannot bind") as taken:
        daemon.bind(second, endpoint)
    assert taken.value.exit_code == 1
    with pytest.raises(UsageError) as bad:
        daemon.bind(second, "tcp://127.0.0.1:notaport")
    assert bad.value.exit_code == 2


def test_close_closes_the_daemons_sockets_but_not_the_shared_context() -> None:
    ctx = zmq.Context.instance()
    daemon = Daemon()
    sock = daemon.socket(zmq.ROUTER, linger=0)
    daemon.bind(sock, "tcp://127.0.0.1:*")
    daemon.close()
    daemon.close()  # twice is fine
    assert sock.closed
    assert not ctx.closed
    other = ctx.socket(zmq.DEALER)  # the rest of the process still has its context
    other.close()


def test_forgetting_a_watched_descriptor_stops_its_handler(daemon: Daemon) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    calls: list[int] = []
    daemon.watch(a, "forgotten", lambda: calls.append(1))
    daemon.forget(a)
    daemon.forget(a)  # twice is fine
    b.send(b"x")
    fired: list[int] = []
    daemon.after(0.05, "later", lambda: fired.append(1))
    serve_until(daemon, lambda: fired == [1])
    assert calls == []
    a.close()
    b.close()


def test_rate_limited_says_once_then_counts_what_it_held() -> None:
    said: list[str] = []
    limited = RateLimited(said.append, every=60.0)
    for i in range(3):
        limited("kind", f"problem {i}")
    limited("other", "another kind is said at once")
    assert said == ["warning: problem 0", "warning: another kind is said at once"]
    limited.last["kind"] -= 61.0  # the interval has passed
    limited("kind", "problem 3")
    assert said[-1] == "warning: problem 3 (and 2 more since the last warning)"


def test_a_timer_due_now_does_not_make_the_loop_wait(daemon: Daemon) -> None:
    """``after(0)`` (group commit, replies, the outbox pump) runs on the next turn:
    the poll does not wait (it used to wait a millisecond more than the due time)."""
    now = daemon.after(0, "now", lambda: None)
    assert daemon._wait_ms() == 0
    now.cancel()
    later = daemon.after(0.0105, "later", lambda: None)
    assert 1 <= daemon._wait_ms() <= 11  # rounded up to the due time, not past it
    later.cancel()
