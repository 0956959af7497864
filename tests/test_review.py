"""Findings of the new-user / hostile-peer review of issue 6."""

from __future__ import annotations

import signal

from .helpers import Procs, run


def test_no_gone_warning_for_a_running_subscriber_of_other_topics(procs: Procs) -> None:
    """A cached subscriber that is alive but wants other topics is not "gone"."""
    sub = procs.sub_ready("review.orders.>")
    first = run("eda-pub", "review.orders.created", "x")
    assert first.returncode == 0, first.stderr  # the subscriber is now in the cache
    other = run("eda-pub", "review.logs.app", "y")
    assert other.returncode == 0, other.stderr
    assert "although" not in other.stderr and "gone" not in other.stderr, other.stderr
    # the warning still comes when a subscriber that wanted the topic really is gone
    sub.signal(signal.SIGKILL)
    sub.wait()
    gone = run("eda-pub", "review.orders.created", "z")
    assert "no subscriber is listening, although 1 were seen before" in gone.stderr, gone.stderr
