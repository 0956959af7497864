"""The NATS JetStream engine (core/bus/nats/) against a real ``nats-server -js``.

The engine-level behaviour checks run against both engines (SQLite and NATS)
where the semantics are the same; NATS-only checks (a plain NATS view of the
stream, JetStream's own duplicate detection, group redelivery by JetStream,
names NATS refuses) follow.  One nats-server per module, on 127.0.0.1 inside
the suite's private network namespace, with its store in a tmp directory;
each test gets its own stream and subject prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from eda.core import codec
from eda.core.bus import EventTooLargeError, SQLiteEngine, StoreError
from eda.core.bus import nats as nats_engine
from eda.core.bus.nats import NatsEngine, migrate
from eda.core.errors import UsageError
from tests import bus_engines
from tests.bus_engines import Opener, Server, free_port
from tests.helpers import Procs, wait_until
from tests.natsnodes import start_nodes
from tests.test_bus_store import Clock, batch, events

# the contract tests that run on both engines are in tests/test_bus_store.py
server, nats_opener = bus_engines.server, bus_engines.nats_opener  # fixtures


async def _plain_read(url: str, subject: str) -> list[tuple[str, bytes, dict[str, str]]]:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject)  # an ephemeral consumer from the start
        out = []
        while (await sub.consumer_info()).num_pending:
            for msg in await sub.fetch(10, timeout=10):
                out.append((msg.subject, msg.data, dict(msg.headers or {})))
                await msg.ack()
        return out
    finally:
        await nc.close()


def test_a_plain_nats_consumer_sees_one_message_per_batch(
    server: Server, nats_opener: Opener
) -> None:
    with nats_opener() as s:
        s.append([batch(1, 3, "orders.created"), batch(1, 2, "users.new")])
        s.commit()
        prefix = s.prefix
    got = asyncio.run(_plain_read(server.url, f"{prefix}.orders.>"))
    assert [(subj, data) for subj, data, _ in got] == [
        (
            f"{prefix}.orders.created",
            b"p1:orders.created:1\np1:orders.created:2\np1:orders.created:3",
        )
    ]
    headers = got[0][2]
    assert (headers["Eda-Seq"], headers["Eda-Count"]) == ("1", "3")
    assert json.loads(headers["Eda-Meta"])["pubid"] == "p1"


def test_jetstream_drops_a_resend_from_a_second_front_by_msg_id(nats_opener: Opener) -> None:
    """Two engines on one stream: the second does not know what the first stored."""
    with nats_opener() as first:
        first.append([batch(1, 4)])
        first.commit()
        second = nats_opener()  # opened now: it read the stream, so it cuts the resend
        try:
            (r,) = second.append([batch(1, 4)])
            assert r.stored == () and r.duplicates == ((1, 4),)
            first.append([batch(5, 2)])
            first.commit()
            # second is behind: its publish is refused (expected last sequence), and it
            # resynchronises instead of storing anything twice
            second.append([batch(5, 2)])
            with pytest.raises(StoreError, match="another writer appended"):
                second.commit()
            (r,) = second.append([batch(5, 3)])  # after the resync: only 7 is new
            assert r.stored == ((7, 7, 1),)
            assert second.commit() == 7
            # now first is behind: new events of another publisher must not take bus
            # sequence 7 again (JetStream refuses the expected last sequence)
            first.append([batch(1, 2, pubid="p2")])
            with pytest.raises(StoreError, match="another writer appended"):
                first.commit()
            (r,) = first.append([batch(1, 2, pubid="p2")])
            assert r.stored == ((1, 8, 2),) and first.commit() == 9
        finally:
            second.close()
    with nats_opener() as again:
        got = events(again)
        assert [q for q, _ in got] == list(range(1, 10))
        assert [p for _, p in got] == [f"p1:t.a:{i}".encode() for i in range(1, 8)] + [
            b"p2:t.a:1", b"p2:t.a:2"]  # fmt: skip


def test_names_nats_refuses_are_refused_clearly(server: Server, nats_opener: Opener) -> None:
    with pytest.raises(UsageError, match=r"stream name 'a\.b'"):
        NatsEngine(server.url, stream="a.b")
    with nats_opener() as s:
        with pytest.raises(UsageError, match=r"holds subjects .* choose another"):
            NatsEngine(server.url, stream=s.stream, prefix="elsewhere")
        with pytest.raises(UsageError, match=r"group name 'my group'"):
            s.claim("my group", "m", ["t.>"], 1)
        with pytest.raises(UsageError):
            s.append([batch(1, 1, topic="bad..topic")])


def test_unreachable_server_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot reach NATS"):
        NatsEngine(f"nats://127.0.0.1:{free_port()}", timeout=1.0)


def test_group_messages_held_by_a_lost_engine_are_redelivered_after_ack_wait(
    nats_opener: Opener,
) -> None:
    with nats_opener(ack_wait=1.0) as s:
        s.append([batch(1, 3, "jobs.a")])
        s.commit()
        first = nats_opener(ack_wait=1.0)
        held = first.claim("workers", "a", ["jobs.>"], 10, start=1)
        assert [r.seq for r in held] == [1]
        first._run(first._nc.close())  # the engine is gone without releasing or acking
        first._closed = True
        first._bridge.stop()
        got = wait_until(
            lambda: s.claim("workers", "b", ["jobs.>"], 10), 15, "JetStream redelivery"
        )
        assert [(r.seq, r.size) for r in got] == [(1, 3)]


# -- a 3-node JetStream cluster on namespaced hosts -------------------------------------


class Cluster(NamedTuple):
    hosts: list[Any]
    urls: list[str]
    procs: Procs


@contextlib.contextmanager
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nats-server -js nodes clustered on three namespaced hosts.

    The test process talks to them through an address on the bridge (the
    bridge lives in the suite's private namespace).  Every process is killed
    and the namespaces removed afterwards.
    """
    from tests.hosts import Network, ip

    procs = Procs(tmp_path)
    net = Network(procs)
    try:
        hosts = [net.add_host(f"n{i}") for i in range(1, 4)]
        ip("addr", "add", f"10.231.{net.net}.1/24", "dev", net.bridge)
        yield Cluster(hosts, start_nodes(hosts, tmp_path), procs)
    finally:
        procs.kill_all()
        net.close()


def open_when_ready(urls: list[str]) -> NatsEngine:
    def opened() -> NatsEngine | None:
        try:
            return NatsEngine(urls, replicas=3, timeout=2.0)
        except StoreError:
            return None  # no JetStream meta leader yet

    return wait_until(opened, 30, "a JetStream cluster that creates an R3 stream")  # type: ignore[no-any-return]


@pytest.mark.long
def test_cluster_keeps_every_confirmed_event_exactly_once_when_a_node_is_killed(
    tmp_path: Path,
) -> None:
    """R3 stream on three hosts; kill -9 of the stream leader mid-stream; the writer goes on.

    The writer behaves as a confirmed publisher: it resends everything after
    its last confirmation when a commit fails.
    """
    with cluster(tmp_path) as (hosts, urls, _):
        store = open_when_ready(urls)
        try:
            total, size, confirmed, failures, killed = 100_000, 200, 0, 0, False
            deadline = time.monotonic() + 40
            while confirmed < total:
                assert time.monotonic() < deadline, (
                    f"stuck at {confirmed} confirmed after {failures} failed commits"
                )
                pending = [batch(confirmed + 1 + k * size, size) for k in range(5)]
                try:
                    store.append(pending)
                    if confirmed >= total // 4 and not killed:  # while appends are in flight:
                        leader = store._run(store._js.stream_info(store.stream)).cluster.leader
                        hosts[int(leader[1:]) - 1].kill()  # kill -9 of the stream's leader
                        killed = True
                    store.commit()
                except StoreError:
                    failures += 1
                    continue  # resend everything after the last confirmation
                confirmed += 5 * size
            assert killed
            pubseqs = [r.pubseq + i for r in store.read(1) for i in range(r.size)]
            assert pubseqs == list(range(1, total + 1))  # each confirmed event exactly once
            seqs = [r.seq + i for r in store.read(1) for i in range(r.size)]
            assert seqs == list(range(1, total + 1))
        finally:
            store.close()
        alive = [u for h, u in zip(hosts, urls, strict=True) if h.started[0].popen.poll() is None]
        with NatsEngine(alive, replicas=3, timeout=2.0) as again:  # a fresh reader agrees
            assert again.durable_seq == total
            payloads = [p for r in again.read(1) for p in r.payloads()]
            assert payloads == [f"p1:t.a:{i}".encode() for i in range(1, total + 1)]


MINORITY = textwrap.dedent("""
    import json, sys
    from eda.core import codec
    from eda.core.bus import StoreError
    from eda.core.bus.nats import NatsEngine, migrate
    store = NatsEngine(["nats://127.0.0.1:4222"], replicas=3, timeout=2.0)
    print("ready", store.durable_seq, flush=True)
    sys.stdin.readline()
    body = b"\\n".join(b"m%d" % i for i in range(1, 11))
    try:
        store.append([codec.Batch("t.a", codec.TEXT, 10, 1, 0.0, "minority", "eda://m", body)])
        print("confirmed", store.commit(), flush=True)
    except StoreError as exc:
        print("refused", json.dumps(str(exc)), flush=True)
    store.close()
""")


@pytest.mark.long
def test_a_partitioned_node_never_confirms_and_the_majority_goes_on(tmp_path: Path) -> None:
    """Cut the stream leader's host off: its own writer gets no confirmation, the other
    two nodes elect a leader and keep confirming; after healing, nothing extra is stored."""
    with cluster(tmp_path) as (hosts, urls, procs):
        with open_when_ready(urls) as first:
            first.append([batch(1, 100)])
            assert first.commit() == 100
            leader = first._run(first._js.stream_info(first.stream)).cluster.leader
        cut = hosts[int(leader[1:]) - 1]
        others = [u for h, u in zip(hosts, urls, strict=True) if h is not cut]
        minority = procs.start(
            [sys.executable, "-c", MINORITY], prefix=cut.prefix, stdin=subprocess.PIPE
        )
        cut.started.append(minority)
        assert minority.wait_lines(1, 20) == ["ready 100"], minority.stderr
        with NatsEngine(others, replicas=3, timeout=2.0) as majority:
            cut.cut()
            assert minority.popen.stdin is not None
            minority.popen.stdin.write(b"go\n")
            minority.popen.stdin.flush()
            confirmed, deadline = 100, time.monotonic() + 30
            while confirmed < 1100:  # the majority side goes on (after a new election)
                assert time.monotonic() < deadline, f"majority stuck at {confirmed}"
                try:
                    majority.append([batch(confirmed + 1, 100)])
                    majority.commit()
                    confirmed += 100
                except StoreError:
                    continue
            out = minority.wait_lines(2, 20)[1]
            assert out.startswith("refused "), out  # never a false confirmation
            assert "did not acknowledge in time" in out or "did not store it" in out, out
            cut.reconnect()
        assert minority.wait(20) == 0

        def stored() -> list[tuple[str, int]] | None:
            try:
                with NatsEngine(others, replicas=3, timeout=2.0) as after:
                    return [(r.pubid, r.pubseq + i) for r in after.read(1) for i in range(r.size)]
            except StoreError:  # 503 "temporarily unavailable" while the healed node rejoins
                return None

        got = wait_until(stored, 30, "the healed cluster answering a read")
        assert got == [("p1", i) for i in range(1, 1101)]


def flat(store: Any) -> list[tuple[int, str, str, int, float, bytes]]:
    """Every event: bus sequence, topic, pubid, publisher sequence, stored time, payload."""
    return [(r.seq + i, r.topic, r.pubid, r.pubseq + i, r.stored, p)
            for r in store.read(1) for i, p in enumerate(r.payloads())]  # fmt: skip


def test_migrate_copies_an_embedded_store_keeping_ids_order_and_sequences(
    tmp_path: Path, nats_opener: Opener
) -> None:
    clock = Clock()
    with SQLiteEngine(tmp_path / "bus.db", clock=clock) as src:
        src.append([batch(1, 10, "gone.old")])  # removed by retention before the move
        src.commit()
        clock.now += 1000
        for i in range(30):
            src.append([batch(1 + 5 * i, 5, f"t.{i % 3}", pubid=f"p{i % 2}")])
            src.commit()
            clock.now += 1
        ext = codec._extension_frame(b'{"region":"eu"}')
        src.append([batch(151, 2, "t.0", pubid="p0")._replace(extensions=ext)])
        src.commit()
        src.retain(max_age=500)
        assert src.first_seq == 11
        want = flat(src)
        with nats_opener() as dest:
            assert migrate(src, dest, limit=42).copied == 42  # interrupted after 42 events
        with nats_opener() as dest:
            assert migrate(src, dest) == (152 - 42, 42)  # resumed: only the rest
            assert migrate(src, dest) == (0, 152)  # nothing twice
        with nats_opener() as dest:
            assert dest.first_seq == 11 and dest.last_seq == 162
            assert flat(dest) == want
            assert [r.extensions for r in dest.read(161)] == [r.extensions for r in src.read(161)]
            assert json.loads(next(dest.read(161)).extensions) == {"region": "eu"}


def test_what_live_members_hold_is_kept_in_progress_beyond_ack_wait(nats_opener: Opener) -> None:
    with nats_opener(ack_wait=1.0) as s:
        s.append([batch(1, 3, "jobs.a")])
        s.commit()
        assert [r.seq for r in s.claim("workers", "a", ["jobs.>"], 10, start=1)] == [1]
        until = time.monotonic() + 3.0  # three ack waits while the bus serves the group
        while time.monotonic() < until:
            assert s.claim("workers", "b", ["jobs.>"], 10) == []  # not redelivered to b
            assert s.group_ack("workers", "a", 0) == 0
        assert s.held("workers") == {"a": [(1, 3)]}
        assert s.group_ack("workers", "a", 3) == 3


def test_a_batch_beyond_the_servers_max_payload_is_stored_in_pieces(nats_opener: Opener) -> None:
    big = 700_000  # two of them pass the 1 MiB event limit but not the 1 MiB max payload
    with nats_opener() as s:
        pair = batch(1, 2, "t.big", width=big)
        try:
            s.append([pair])
        except StoreError:  # what the bus did before: refuse, and the publisher resends
            s.append([pair])
        assert s.commit() == 2
        assert [p for _, p in events(s)] == pair.body.split(b"\n")
        assert s.append([pair])[0].duplicates == ((1, 2),)  # a resend is a duplicate now
        s.append([batch(3, 3, "t.big", width=big // 2)])  # 1.05 MB: cut in two
        assert s.commit() == 5
    with nats_opener() as s:  # read back from the stream itself
        assert [(r.seq, r.size) for r in s.read(1)] == [(1, 1), (2, 1), (3, 2), (5, 1)]
        assert [r.ids() for r in s.read(1)][2] == ["p1-3", "p1-4"]
        assert len(s._heads) == 4


def test_an_event_beyond_the_servers_max_payload_is_refused_never_confirmed(
    nats_opener: Opener,
) -> None:
    with nats_opener(max_event_bytes=4_000_000) as s:
        s.append([batch(1, 1, "t.a")])
        with pytest.raises(EventTooLargeError, match="max payload of 1048576"):
            s.append([batch(2, 1, "t.a", width=2_000_000)])
        with pytest.raises(EventTooLargeError):  # a resend is refused again, not a duplicate
            s.append([batch(2, 1, "t.a", width=2_000_000)])
        assert s.commit() == 1 and s.last_seq == 1
        assert s.append([batch(2, 1, "t.a")])[0].stored == ((2, 2, 1),)
        assert s.commit() == 2


def stored_ids(store: Any) -> list[tuple[str, str, int, bytes]]:
    """Every event in order: topic, pubid, publisher sequence, payload."""
    return [(r.topic, r.pubid, r.pubseq + i, p)
            for r in store.read(1) for i, p in enumerate(r.payloads())]  # fmt: skip


def test_migrate_into_a_stream_that_holds_events_copies_each_event_once(
    tmp_path: Path, nats_opener: Opener
) -> None:
    with SQLiteEngine(tmp_path / "bus.db") as src:
        for i in range(5):
            src.append([batch(1 + 2 * i, 2, "t.a", pubid="src")])
            src.commit()
        want = stored_ids(src)
        assert len(want) == 10
        with nats_opener() as dest:  # the target already holds 2 events of its own
            dest.append([batch(1, 2, "t.a", pubid="other")])
            dest.commit()
            theirs = stored_ids(dest)
            assert migrate(src, dest, limit=3) == (3, 0)  # stopped part-way
        with nats_opener() as dest:
            assert migrate(src, dest) == (7, 3)  # resumed: the rest, by event identity
            assert migrate(src, dest) == (0, 10)  # again: nothing twice
        with nats_opener() as dest:
            assert stored_ids(dest) == theirs + want  # all there, exactly once, in order
            assert (dest.first_seq, dest.last_seq) == (1, 12)


class _Interrupted(Exception):
    pass


def test_migrate_interrupted_mid_copy_resumes_without_copying_twice(
    tmp_path: Path, nats_opener: Opener
) -> None:
    with SQLiteEngine(tmp_path / "bus.db") as src:
        for i in range(20):
            src.append([batch(1 + 3 * i, 3, f"t.{i % 2}", pubid="src")])
            src.commit()
        want = stored_ids(src)
        read = src.read

        def broken(start: int, *args: Any, **kw: Any) -> Iterator[Any]:
            for n, record in enumerate(read(start, *args, **kw)):
                if n == 13:
                    raise _Interrupted
                yield record

        with nats_opener() as dest:
            dest.append([batch(1, 4, "t.1", pubid="other")])
            dest.commit()
            theirs = stored_ids(dest)
            src.read = broken  # type: ignore[method-assign]
            with pytest.raises(_Interrupted):
                migrate(src, dest, chunk=5)
            src.read = read  # type: ignore[method-assign]
        with nats_opener() as dest:  # what was appended before the break was committed on close
            assert migrate(src, dest) == (60 - 39, 39)
            assert stored_ids(dest) == theirs + want


def test_claims_go_on_after_a_purge_removed_what_a_member_held(nats_opener: Opener) -> None:
    # nats-server 2.9 never answers a no-wait pull on such a consumer: a claim must
    # neither fail nor wait for its timeout (the engine's here is 5 s)
    with nats_opener() as s:
        s.append([batch(1, 3, "jobs.a")])
        s.append([batch(4, 3, "jobs.a")])
        s.commit()
        assert [r.seq for r in s.claim("workers", "a", ["jobs.>"], 3, start=1)] == [1]
        assert s.retain(max_age=0).events == 6  # what a holds, and what no one claimed yet
        s.append([batch(7, 3, "jobs.a")])
        s.commit()
        assert [r.seq for r in s.claim("workers", "b", ["jobs.>"], 10)] == [7]
        for member in "cde":
            assert s.claim("workers", member, ["jobs.>"], 10) == []
        assert s.group_ack("workers", "b", 9) == 3
        assert s.stats().consumers[0].lag == 3  # a's purged events, still held by a
        assert s.release("workers", "a") == 3


def test_serving_calls_answer_within_the_publishers_patience() -> None:
    import inspect

    from eda.core.bus.client import BusPublisher

    patience = inspect.signature(BusPublisher).parameters["timeout"].default
    # a round may wait for a commit and the resync after it: still well inside
    assert patience >= 3 * nats_engine.SERVE_DEADLINE
