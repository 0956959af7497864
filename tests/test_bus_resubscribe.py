"""A bus subscriber that the bus forgot (cut off, dropped as silent, a restart) subscribes again."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Procs, run, wait_until
from tests.test_bus import start_bus


def test_a_live_subscription_forgotten_before_its_first_event_resumes_where_it_began(
    procs: Procs, tmp_path: Path
) -> None:
    """Events stored between a live subscription and its subscribing again (here before
    it received any) are delivered: it resumes where the bus said it began, not "now"."""
    from eda.core import codec
    from eda.core.bus.client import BusSubscriber

    _, ep = start_bus(procs, tmp_path / "bus")
    done = run("eda-pub", "--bus", ep, "--confirm", "t.x", "before")
    assert done.returncode == 0, done.stderr
    sub = BusSubscriber(ep, ["t.>"])
    try:
        sub.subscribe()
        got: list[bytes] = []

        def receive() -> None:
            sub.poll(0.05)
            got.extend(e for d in sub.receive() for e in codec.split_body(d.batch))

        wait_until(lambda: receive() or sub._answered, 10, "the subscription answered")
        sub._request({"op": "bye"})  # the bus forgets it (as a cut or a drop would)
        done = run("eda-pub", "--bus", ep, "--confirm", "t.x", "a", "b", "c")
        assert done.returncode == 0, done.stderr
        # told the subscription is unknown at its next heartbeat, it subscribes again
        wait_until(lambda: receive() or len(got) >= 3, 15, "the events stored meanwhile")
        assert got == [b"a", b"b", b"c"] and sub.resubscribed >= 1
    finally:
        sub.close()
