"""eda-bus on a 3-node JetStream cluster: how long confirmations stop when the stream leader dies.

Three ``nats-server -js`` on 127.0.0.1 (bench_bus_nats.start_nodes), ``eda-bus serve
--engine nats://A,nats://B,nats://C --replicas 3`` in front of them, and in this
process a confirmed publisher (eda's own ``BusPublisher``, what ``eda-pub --bus
--confirm`` uses) sending a paced stream: RATE events/s in batches of BATCH.  After
BEFORE_KILL seconds of confirmed streaming the stream's leader (``stream_info``) is
killed with SIGKILL; the stream goes on for AFTER_KILL seconds more, then every
event must be confirmed and stored exactly once (read back from the survivors).

* **eda** (the figure): the longest time without any confirmation from the kill
  on, i.e. what eda-pub's ``--timeout`` (30 s by default: "give up after SECONDS
  without a confirmation") must outlast.  Target: <= 5 s.
* **anchor**: JetStream's own failover, the time from the kill until the stream
  reports a new leader (``stream_info`` asked of the survivors every 50 ms).

The election is most of the stall and nothing eda does shortens it: a follower
stands for election when it has heard nothing from its leader for a random 4
to 9 s (nats-server's Raft election timeout, a constant, no option), so a
kill -9 costs 4 to 10 s whatever the cluster's configuration; a planned stop
in lame duck mode (``nats-server --signal ldm``) hands leadership over at once.
The note says how far eda's stall is beyond the election.

The publisher's patience here is PATIENCE s, so a stall longer than eda-pub's
default is measured, not cut short; the whole row is bounded by DEADLINE.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import threading
import time
from pathlib import Path
from typing import Any

from bench_bus_nats import NODES, js_call, prerequisites, start_nodes
from bench_pubsub import fresh
from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    free_port,
    row,
    scratch,
    tail,
    wait_for_text,
)

RATE = 4000  # events/s, paced
BATCH = 40  # events per batch (one send every 10 ms)
BEFORE_KILL = 5.0  # s of confirmed streaming before the kill
AFTER_KILL = 20.0  # s of streaming after it
PATIENCE = 60.0  # s the publisher waits without a confirmation (eda-pub's default: 30)
DEADLINE = 180.0  # s for the whole row, cluster start-up included
TARGET = 5.0  # s without confirmations at most
PUB_TIMEOUT = 30.0  # eda-pub's default --timeout, for the note

NAME = f"NATS failover: no confirmation for (kill -9 of the R{NODES} stream leader)"
ANCHOR = "JetStream re-election"


def run(quick: bool) -> list[Row]:
    missing = prerequisites()
    if missing:
        return [result_row(None, None, missing)]
    with scratch("eda-bench-bus-failover-") as tmp, Procs(tmp) as procs:
        try:
            nodes = start_nodes(procs, fresh(tmp / "cluster"))
            js_call([u for u, _ in nodes], "create", "WARMUP", "warmup.>")  # a meta leader
            js_call([u for u, _ in nodes], "delete", "WARMUP")
            stall, election, note = failover(tmp, procs, nodes)
        except BenchError as exc:
            return [result_row(None, None, str(exc))]
    return [result_row(stall, election, note)]


def result_row(stall: float | None, election: float | None, note: str) -> Row:
    ok = None if stall is None else stall <= TARGET
    return row(NAME, stall, ANCHOR, election, "s", higher_is_better=False,
               target=f"<= {TARGET:g} s", ok=ok if stall is not None else False,
               note=note)  # fmt: skip


class _Timed:
    """A confirmed publisher that notes when each confirmation arrives."""

    def __init__(self, endpoint: str) -> None:
        from eda.core.bus.client import BusPublisher

        outer = self

        class Publisher(BusPublisher):
            def _settle(self, tag: int, *, stored: bool = True) -> None:
                if stored and tag in self.pending:
                    outer.times.append(time.monotonic())
                super()._settle(tag, stored=stored)

        self.times: list[float] = []
        self.pub = Publisher(endpoint, timeout=PATIENCE)


def stream_leader(urls: list[str], stream: str = "EDA") -> str | None:
    import nats

    async def call() -> str | None:
        nc = await nats.connect(servers=urls, allow_reconnect=False, connect_timeout=2)
        try:
            info = await nc.jetstream(timeout=1).stream_info(stream)
            return info.cluster.leader if info.cluster else None
        finally:
            await nc.close()

    try:
        return asyncio.run(call())
    except Exception:
        return None  # no leader now, or the node asked is gone


def watch_election(urls: list[str], dead: str, since: float, out: list[float]) -> None:
    """Append to *out* the seconds from *since* until the stream names a live leader.

    ``stream_info`` is asked of the survivors every 50 ms, each request waiting up to
    1 s for its answer on its own: one the cluster cannot answer yet (no node answers
    for a leader it has not elected) must not hold up the next ones, or the anchor
    would only be sampled once a second and overstate the election by up to 1 s.
    """
    import nats

    async def watch() -> None:
        nc = await nats.connect(servers=urls, connect_timeout=2)
        js = nc.jetstream(timeout=1)
        elected = asyncio.Event()

        async def ask() -> None:
            with contextlib.suppress(Exception):  # no answer yet, or "no leader"
                info = await js.stream_info("EDA")
                leader = info.cluster.leader if info.cluster else None
                if leader and leader != dead and not elected.is_set():
                    out.append(time.monotonic() - since)
                    elected.set()

        asking: set[asyncio.Task[None]] = set()
        try:
            while not elected.is_set() and time.monotonic() - since < PATIENCE:
                task = asyncio.ensure_future(ask())
                asking.add(task)
                task.add_done_callback(asking.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(elected.wait(), 0.05)
        finally:
            for task in list(asking):
                task.cancel()
            await nc.close()

    with contextlib.suppress(Exception):  # the survivors unreachable: no anchor
        asyncio.run(watch())


def failover(
    tmp: Path, procs: Procs, nodes: list[tuple[str, Any]]
) -> tuple[float, float | None, str]:
    from eda.core.bus.client import ConfirmTimeout
    from eda.core.bus.nats import NatsEngine

    urls = [u for u, _ in nodes]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bus_err = tmp / "bus.err"
    bus = procs.start(
        [eda_cmd("eda-bus"), "serve", "--engine", ",".join(urls), "--replicas", str(NODES),
         "--bind", endpoint, "--no-mdns"],
        stderr=bus_err, env=eda_env(tmp),
    )  # fmt: skip
    wait_for_text(bus_err, "serving NATS stream EDA", 120.0, bus)
    timed = _Timed(endpoint)
    pub = timed.pub
    total = int(RATE * (BEFORE_KILL + AFTER_KILL)) // BATCH * BATCH
    sent = 0
    start = time.monotonic()
    deadline = start + DEADLINE
    killed_at: float | None = None
    dead = ""
    election: list[float] = []
    watcher: threading.Thread | None = None
    try:
        while sent < total:
            due = start + sent / RATE
            while (now := time.monotonic()) < due:
                pub.sock.poll(max(1, int((due - now) * 1000)))
                pub.service()
            if now > deadline:
                raise BenchError(f"not done in {DEADLINE:g} s: {sent} of {total} events sent")
            body = b"\n".join(b"%d" % (sent + i + 1) for i in range(BATCH))
            pub.send("failover.x", body, BATCH)  # waits while its window is full
            sent += BATCH
            if killed_at is None and time.monotonic() - start >= BEFORE_KILL:
                if not timed.times:
                    raise BenchError(f"no confirmation in {BEFORE_KILL:g} s: {tail(bus_err)}")
                dead = stream_leader(urls) or ""
                victim = next((p for i, (_, p) in enumerate(nodes) if f"n{i + 1}" == dead), None)
                if victim is None:
                    raise BenchError(f"stream EDA has no leader to kill (asked: {dead!r})")
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                alive = [u for u, p in nodes if p is not victim]
                watcher = threading.Thread(
                    target=watch_election, args=(alive, dead, killed_at, election), daemon=True
                )
                watcher.start()
        pub.finish(PATIENCE)
    except ConfirmTimeout as exc:
        raise BenchError(f"confirmations stopped for {PATIENCE:g} s: {exc}"[:300]) from None
    finally:
        pub.close()
    if watcher is not None:
        watcher.join(PATIENCE)
    assert killed_at is not None
    if bus.poll() is not None:
        raise BenchError(f"eda-bus exited {bus.returncode}: {tail(bus_err)}")
    times = [killed_at, *(t for t in timed.times if t >= killed_at)]
    before = [t for t in timed.times if t < killed_at]
    if before:
        times[0] = before[-1]  # the stall runs from the last confirmation before the kill
    stall = max(b - a for a, b in itertools.pairwise(times))
    alive = [u for u, p in nodes if p.poll() is None]
    with NatsEngine(alive, timeout=5.0) as store:
        got = [r.pubseq + i for r in store.read(1) if r.pubid == pub.pubid for i in range(r.size)]
    if sorted(got) != list(range(1, total + 1)):  # resent batches may land after later ones
        extra = len(got) - len(set(got))
        raise BenchError(f"stored {len(set(got))} of {total} events, {extra} twice")
    moved = sum(1 for a, b in itertools.pairwise(got) if b < a)
    verdict = "above" if stall > PUB_TIMEOUT else "below"
    beyond = f"{stall - election[0]:+.2f} s beyond the election; " if election else ""
    note = (
        f"{RATE} events/s confirmed, leader {dead} killed after {BEFORE_KILL:g} s; all "
        f"{total:,} events stored once ({moved} stored after later ones); {pub.resent} "
        f"batches resent; stall {beyond}{verdict} eda-pub's default --timeout of "
        f"{PUB_TIMEOUT:g} s"
    )
    with contextlib.suppress(BenchError):
        js_call(alive, "delete", "EDA")
    return stall, election[0] if election else None, note
