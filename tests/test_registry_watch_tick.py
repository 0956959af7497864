"""eda-registry watch and the tick a registry announces (CONVENTIONS §7: peer input).

A watcher judges the change stream by the registry's tick (silent for
:data:`~eda.core.registry.watch.SILENT_TICKS` ticks: gone).  A registry may claim
any tick in its hello, so the watcher accepts none longer than
:data:`~eda.core.registry.protocol.MAX_TICK`, and waits for the stream's first
message no longer than one request of its own may take, whatever the tick.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from eda.core.errors import EdaError
from eda.core.registry import protocol
from eda.core.registry.client import Client
from eda.core.registry.watch import SILENT_TICKS, Watcher
from tests.test_registry_hostile import FakePeer

HANG = 30.0  # s past what the watcher may wait: it hangs


@pytest.fixture
def liar() -> Iterator[FakePeer]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    peer = FakePeer(ctx)
    try:
        yield peer
    finally:
        peer.router.close()
        peer.xpub.close()
        ctx.term()


def start_against(liar: FakePeer, tick: object, bound: float) -> tuple[BaseException, float]:
    """What a watcher's start raised, and after how long, against *liar*, whose hello
    announces *tick* and whose change stream never says a word."""
    client = Client([liar.endpoint], timeout=0.5, use_mdns=False)
    watcher = Watcher(client, "orders", lambda _line: None)
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            watcher.start()
        except BaseException as exc:  # (handed to the test)
            outcome.append(exc)

    began = time.monotonic()
    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        assert liar.router.poll(10_000), "the watcher never said hello"
        ident, body = liar.router.recv_multipart()
        rid = protocol.decode(body)["rid"]
        hello = {
            "rid": rid,
            "ok": True,
            "registry": "liar",
            "tick": tick,
            "pub_port": liar.pub_port,
        }
        liar.router.send_multipart([ident, protocol.encode(hello)])
        thread.join(bound + HANG)
        assert not thread.is_alive(), f"the watcher still waits after {bound + HANG:g}s"
        elapsed = time.monotonic() - began
    finally:
        thread.join(bound + HANG)
        watcher.close()
        client.close()
    assert len(outcome) == 1, outcome
    return outcome[0], elapsed


TICKS = {"60": 60, "an hour": 3600.0, "1e308": 1e308, "10**400": 10**400, "0": 0, "-1": -1,
         "text": "1", "true": True, "null": None}  # fmt: skip


@pytest.mark.parametrize("tick", TICKS.values(), ids=TICKS.keys())
def test_a_tick_out_of_range_is_a_malformed_hello(liar: FakePeer, tick: object) -> None:
    """Before: a registry claiming a 60 s tick kept the watcher waiting six minutes."""
    raised, _ = start_against(liar, tick, SILENT_TICKS * protocol.MAX_TICK)
    assert isinstance(raised, EdaError), raised
    assert str(raised) == (
        f"the registry sent a malformed hello (tick: not in (0, {protocol.MAX_TICK:g}s])"
    )


def test_the_first_wait_is_the_watchers_own_not_the_registrys(liar: FakePeer) -> None:
    """The longest tick a registry may have, and a change stream that never speaks: the
    watcher gives up by its own request deadline (1.5 s here), not after the six ticks
    (30 s) the registry's word would make it wait."""
    claimed = SILENT_TICKS * protocol.MAX_TICK
    raised, elapsed = start_against(liar, protocol.MAX_TICK, claimed)
    assert isinstance(raised, EdaError), raised
    assert str(raised) == "the registry's change stream did not answer"
    assert elapsed < claimed, elapsed
