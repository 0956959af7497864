"""eda-bus serve --engine nats://... and eda-bus migrate, with real processes.

A real ``nats-server -js`` on 127.0.0.1 per test (started as in
tests/test_bus_nats.py), the eda-bus front in front of it, and eda-pub/eda-sub
unchanged.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import Proc, Procs, run, wait_until
from tests.natsnodes import nats_server
from tests.test_bus import BIND, _feed, replay, start_bus, stored_events, stored_stats
from tests.test_bus_nats import Server, cluster


@pytest.fixture
def server(procs: Procs, tmp_path: Path) -> Server:
    """This test's own nats-server -js (the default stream's subjects are eda.>)."""
    nats_server()
    return Server(procs, tmp_path / "jetstream")


_streams = itertools.count(1)


def start_front(
    procs: Procs, url: str, stream: str, *args: str, bind: str = BIND
) -> tuple[Proc, str]:
    """An eda-bus front on the JetStream stream *stream*; its endpoint once it listens."""
    bus = procs.eda("eda-bus", "serve", "--engine", url, "--stream", stream, "--bind", bind,
                    "--no-mdns", *args)  # fmt: skip
    m = bus.wait_stderr(r"serving NATS stream \S+ at \S+ on (tcp://\S+)", 30)
    return bus, m[1]


def new_stream() -> str:
    return f"CLI{next(_streams)}"


def test_confirmed_publish_and_replay_through_a_nats_front_keep_ids(
    procs: Procs,
    server: Server,
) -> None:
    bus, ep = start_front(procs, server.url, new_stream(), "--max-event-bytes", "1000")
    one = run("eda-pub", "--bus", ep, "--confirm", "orders.created", '{"id":1}', "--json")
    assert one.returncode == 0, one.stderr
    many = run("eda-pub", "--bus", ep, "--confirm", "orders.paid", input="a\nb\nc\n")
    assert many.returncode == 0, many.stderr
    events = [json.loads(line) for line in replay(ep, "orders.>", 4)]
    assert [e["data"] for e in events] == [{"id": 1}, "a", "b", "c"]
    assert [e["edabusseq"] for e in events] == [1, 2, 3, 4]
    assert [e["type"] for e in events] == ["orders.created"] + ["orders.paid"] * 3
    pubid = events[1]["id"].rsplit("-", 1)[0]
    assert [e["id"] for e in events[1:]] == [f"{pubid}-{i}" for i in (1, 2, 3)]
    assert stored_stats(ep)["events"] == 4
    # --max-event-bytes reaches the engine: a larger event is refused, one line
    big = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "5", "orders.big", "x" * 2000)
    assert big.returncode == 1 and "more than the maximum of 1000" in big.stderr, big.stderr
    assert stored_stats(ep)["events"] == 4
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0


def test_events_beyond_the_nats_max_payload_are_stored_or_refused_never_falsely_confirmed(
    procs: Procs,
    server: Server,
) -> None:
    bus, ep = start_front(procs, server.url, new_stream(), "--max-event-bytes", "4000000")
    assert "warning: events larger than the NATS server's max payload (1048576" in bus.stderr
    two = "".join(f"{i}" + "x" * 700_000 + "\n" for i in (1, 2))
    done = run("eda-pub", "--bus", ep, "--confirm", "t.big", input=two)
    assert done.returncode == 0, done.stderr
    # one batch of two such events (together beyond 1 MiB), as any bus client may send
    from eda.core.bus.client import BusPublisher

    pub = BusPublisher(ep)
    try:
        pub.send("t.big", b"\n".join(b"%d" % i + b"y" * 700_000 for i in (3, 4)), 2)
        pub.finish()  # confirmed...
    finally:
        pub.close()
    # ... and so stored
    assert [e[:2] for e in replay(ep, "t.big", 4, "--raw")] == ["1x", "2x", "3y", "4y"]
    big = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "5", "t.big",
              input="x" * 2_000_000 + "\n")  # fmt: skip
    assert big.returncode == 1, big.stderr
    assert "more than the NATS server's max payload of 1048576" in big.stderr
    assert len(big.stderr.strip().splitlines()) == 1
    assert stored_stats(ep)["events"] == 4
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0


def test_usage_errors_of_serve_and_migrate_are_one_line(tmp_path: Path) -> None:
    for args, what in [
        (("serve",), "give --data DIR"),
        (("serve", "--engine", "http://h:1"), "bad NATS server"),
        (("serve", "--engine", "nats://h:1", "--data", str(tmp_path)), "--data is for"),
        (("migrate", "--from", str(tmp_path), "--to", "nats://h:1"), "no embedded store"),
    ]:
        done = run("eda-bus", *args, "--no-mdns", timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("eda-bus: error: ") and what in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_durable_consumer_resumes_across_a_kill_9_of_the_front(
    procs: Procs,
    server: Server,
) -> None:
    stream = new_stream()
    bus, ep = start_front(procs, server.url, stream)
    done = run("eda-pub", "--bus", ep, "--confirm", "jobs.a",
               input="".join(f"{i}\n" for i in range(1, 3001)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "1000")
    assert first.stdout.splitlines() == [str(i) for i in range(1, 1001)], first.stderr
    bus.kill()  # the front dies; the consumer's position is in JetStream
    bus, ep = start_front(procs, server.url, stream, bind=ep)
    done = run("eda-pub", "--bus", ep, "--confirm", "jobs.a",
               input="".join(f"{i}\n" for i in range(3001, 3501)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    second = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-W", "2")
    assert second.stdout.splitlines() == [str(i) for i in range(1001, 3501)], second.stderr
    rows = [
        json.loads(x)
        for x in run("eda-bus", "stats", "--bus", ep, "--json").stdout.split("\n")
        if x
    ]
    billing = next(r for r in rows if r.get("name") == "billing")
    assert billing["kind"] == "consumer" and billing["lag"] == 0


def test_kill_9_of_the_front_mid_confirmed_stream_stores_every_event_exactly_once(
    procs: Procs,
    server: Server,
) -> None:
    stream = new_stream()
    bus, ep = start_front(procs, server.url, stream)
    n = 50_000
    pub = procs.eda("eda-pub", "--bus", ep, "--confirm", "--timeout", "30", "nums",
                    stdin=subprocess.PIPE)  # fmt: skip
    _feed(pub, range(1, 25_001))
    wait_until(lambda: stored_events(ep) > 0, 15, "events stored")
    bus.kill()  # kill -9 while the stream goes on
    _feed(pub, range(25_001, 40_001))
    bus2, ep2 = start_front(procs, server.url, stream, bind=ep)
    assert ep2 == ep
    _feed(pub, range(40_001, n + 1))
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    assert pub.wait(60) == 0, pub.stderr
    assert int(stored_stats(ep)["events"]) == n  # type: ignore[call-overload]
    got = replay(ep, "nums", n, "--raw")
    assert sorted(int(x) for x in got) == list(range(1, n + 1))
    extra = run("eda-sub", "--bus", ep, "nums", "--from-seq", str(n + 1), "-W", "1", "--raw")
    assert extra.returncode == 4 and extra.stdout == ""
    bus2.signal(signal.SIGTERM)
    assert bus2.wait(10) == 0


def test_migrate_copies_an_embedded_store_resumably_keeping_ids_and_sequences(
    procs: Procs,
    server: Server,
    tmp_path: Path,
) -> None:
    data = tmp_path / "bus"
    bus, ep = start_bus(procs, data)
    for topic in ("a.x", "b.y", "a.x"):
        done = run("eda-pub", "--bus", ep, "--confirm", topic,
                   input="".join(f"{topic}-{i}\n" for i in range(1, 1001)))  # fmt: skip
        assert done.returncode == 0, done.stderr
    want = replay(ep, ">", 3000)
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0
    stream = new_stream()

    def migrate(*args: str) -> dict[str, object]:
        done = run("eda-bus", "migrate", "--from", str(data), "--to", server.url,
                   "--stream", stream, *args, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    part = migrate("--limit", "1200")  # stopped part-way
    assert part["copied"] == 1200 and part["last_seq"] == 1200
    rest = migrate()  # resumed: only the rest
    assert rest["copied"] == 1800 and rest["last_seq"] == 3000
    assert migrate()["copied"] == 0  # nothing twice
    front, fep = start_front(procs, server.url, stream)
    assert replay(fep, ">", 3000) == want  # ids, order, bus sequences, times kept
    front.signal(signal.SIGTERM)
    assert front.wait(10) == 0


def test_migrate_into_a_stream_that_holds_events_copies_every_event_once(
    procs: Procs,
    server: Server,
    tmp_path: Path,
) -> None:
    data = tmp_path / "bus3"
    bus, ep = start_bus(procs, data)
    done = run("eda-pub", "--bus", ep, "--confirm", "t.src",
               input="".join(f"src-{i}\n" for i in range(1, 11)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0
    stream = new_stream()
    front, fep = start_front(procs, server.url, stream)
    done = run("eda-pub", "--bus", fep, "--confirm", "t.own", input="own-1\nown-2\n")
    assert done.returncode == 0, done.stderr
    front.signal(signal.SIGTERM)
    assert front.wait(10) == 0

    def migrate() -> dict[str, object]:
        done = run("eda-bus", "migrate", "--from", str(data), "--to", server.url,
                   "--stream", stream, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    first = migrate()
    assert (first["copied"], first["present"], first["last_seq"]) == (10, 0, 12), first
    again = migrate()
    assert (again["copied"], again["present"], again["last_seq"]) == (0, 10, 12), again
    front, fep = start_front(procs, server.url, stream, bind=fep)
    got = run("eda-sub", "--bus", fep, "t.*", "--from-start", "-C", "12", "--raw", "-W", "10")
    assert got.stdout.split() == ["own-1", "own-2"] + [f"src-{i}" for i in range(1, 11)]
    front.signal(signal.SIGTERM)
    assert front.wait(10) == 0


def test_groups_and_retain_work_through_a_nats_front(procs: Procs, server: Server) -> None:
    bus, ep = start_front(procs, server.url, new_stream())
    a = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "--raw", "-v")
    b = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "--raw", "-v")
    a.wait_stderr("subscribed", 15)
    b.wait_stderr("subscribed", 15)
    n = 5_000
    done = run("eda-pub", "--bus", ep, "--confirm", "work.items",
               input="".join(f"{i}\n" for i in range(1, n + 1)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_until(lambda: a.newlines() + b.newlines() >= n, 20, "all events handed out")
    assert sorted(int(x) for x in a.lines() + b.lines()) == list(range(1, n + 1))
    a.kill()
    b.kill()
    # retain through the front removes the oldest; bus sequences go on after them
    removed = run("eda-bus", "retain", "--bus", ep, "--max-bytes", "1")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == n
    done = run("eda-pub", "--bus", ep, "--confirm", "work.items", "late")
    assert done.returncode == 0, done.stderr
    stats = stored_stats(ep)
    assert (stats["events"], stats["first_seq"], stats["last_seq"]) == (1, n + 1, n + 1)
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0


def group_held(endpoint: str, group: str) -> int | None:
    """What *group*'s members hold (asked from this process: a poll)."""
    from eda.core.bus.client import request

    rows = request(endpoint, {"op": "stats"})["stats"]["consumers"]
    return next((r["held"] for r in rows if r["name"] == group), None)


class Holder:
    """A live group member that takes *credit* events, then neither acknowledges
    them nor grants more credit (it only heartbeats)."""

    def __init__(self, endpoint: str, group: str, credit: int) -> None:
        from eda.core.bus.client import BusSubscriber

        self.sub = BusSubscriber(endpoint, ["work.>"], group=group, credit=credit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sub.subscribe()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sub.poll(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sub.close()


def test_a_purge_of_what_a_group_member_holds_never_freezes_the_front(
    procs: Procs, server: Server
) -> None:
    # a purge of messages the group's consumer holds unacknowledged and has not
    # delivered yet: nats-server 2.9 never answers a no-wait pull on it then
    bus, ep = start_front(procs, server.url, new_stream())
    holder = Holder(ep, "workers", credit=3)
    try:
        for events in ("1\n2\n3\n", "4\n5\n6\n"):  # the holder takes the first 3 only
            done = run("eda-pub", "--bus", ep, "--confirm", "work.items", input=events)
            assert done.returncode == 0, done.stderr
        wait_until(lambda: group_held(ep, "workers") == 3, 10, "the member holding 3 events")
        removed = run("eda-bus", "retain", "--bus", ep, "--max-bytes", "1")
        assert removed.returncode == 0, removed.stderr
        assert json.loads(removed.stdout)["removed"] == 6
        b = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "--raw", "-v")
        b.wait_stderr("subscribed", 15)
        for i in range(7, 10):  # each one claimed by the group: the front must go on answering
            done = run("eda-pub", "--bus", ep, "--confirm", "work.items", str(i))
            assert done.returncode == 0, done.stderr
            assert stored_stats(ep)["last_seq"] == i
        assert b.wait_lines(3, 10) == ["7", "8", "9"]
    finally:
        holder.close()
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0


def test_the_front_survives_its_nats_server_going_away_and_coming_back(
    procs: Procs, server: Server, tmp_path: Path
) -> None:
    bus, ep = start_front(procs, server.url, new_stream())
    assert run("eda-pub", "--bus", ep, "--confirm", "t.x", "1").returncode == 0
    server.proc.kill()
    down = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "3", "t.x", "2")
    assert down.returncode == 4, down.stderr  # never a false confirmation
    assert "did not confirm 1 event(s)" in down.stderr
    argv = [nats_server(), "-js", "-a", "127.0.0.1", "-p", str(server.port),
            "-sd", str(tmp_path / "jetstream")]  # fmt: skip
    procs.start(argv).wait_stderr("Server is ready", 20)
    # what the front waited for died with the server: it answers within the
    # publisher's default patience, and stats within its own
    up = run("eda-pub", "--bus", ep, "--confirm", "t.x", "3")
    assert up.returncode == 0, up.stderr
    assert stored_stats(ep)["last_seq"] in (2, 3)
    assert bus.popen.poll() is None
    got = run("eda-sub", "--bus", ep, "t.x", "--from-start", "-W", "2", "--raw").stdout.split()
    # "2" was not confirmed: it may or may not have been stored, at most once
    assert got in (["1", "3"], ["1", "2", "3"]), got


def test_acknowledgements_lost_with_the_nats_server_never_stall_the_front(
    procs: Procs, server: Server, tmp_path: Path
) -> None:
    bus, ep = start_front(procs, server.url, new_stream())
    assert run("eda-pub", "--bus", ep, "--confirm", "t.x", "1").returncode == 0
    server.proc.signal(signal.SIGSTOP)  # takes what the front sends, never acknowledges it
    down = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "3", "t.x", "2")
    assert down.returncode == 4, down.stderr  # never a false confirmation
    server.proc.kill()  # and what it took dies with it
    argv = [nats_server(), "-js", "-a", "127.0.0.1", "-p", str(server.port),
            "-sd", str(tmp_path / "jetstream")]  # fmt: skip
    procs.start(argv).wait_stderr("Server is ready", 20)
    # with the publisher's and stats' default patience
    up = run("eda-pub", "--bus", ep, "--confirm", "t.x", "3")
    assert up.returncode == 0, up.stderr
    assert stored_stats(ep)["last_seq"] in (2, 3)
    got = run("eda-sub", "--bus", ep, "t.x", "--from-start", "-W", "2", "--raw").stdout.split()
    assert got in (["1", "3"], ["1", "2", "3"]), got
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0


@pytest.mark.long
def test_an_unreachable_nats_server_is_a_one_line_error(tmp_path: Path) -> None:
    from tests.helpers import closed_port

    done = run("eda-bus", "serve", "--engine", f"nats://127.0.0.1:{closed_port()}",
               "--no-mdns", timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("eda-bus: error: cannot reach NATS at nats://127.0.0.1:")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.long
def test_a_front_on_a_3_node_cluster_loses_nothing_when_the_front_and_a_node_are_killed(
    procs: Procs, tmp_path: Path
) -> None:
    """R3 stream on three namespaced hosts; kill -9 of the front, then of a node, mid-stream."""
    (tmp_path / "cluster").mkdir()
    with cluster(tmp_path / "cluster") as (hosts, urls, _):
        engine = ",".join(urls)

        def front() -> tuple[Proc, str] | None:
            bus = procs.eda("eda-bus", "serve", "--engine", engine, "--replicas", "3",
                            "--bind", BIND, "--no-mdns")  # fmt: skip
            pattern = r"serving NATS stream \S+ at \S+ on (tcp://\S+)"
            wait_until(lambda: re.search(pattern, bus.stderr) or bus.popen.poll() is not None, 30)
            m = re.search(pattern, bus.stderr)
            return (bus, m[1]) if m else None  # no JetStream meta leader yet: start again

        bus, ep = wait_until(front, 60, "a front on an R3 stream")
        n = 30_000
        pub = procs.eda("eda-pub", "--bus", ep, "--confirm", "--timeout", "40", "nums",
                        stdin=subprocess.PIPE)  # fmt: skip
        _feed(pub, range(1, 10_001))
        wait_until(lambda: stored_events(ep) > 0, 15, "events stored")
        bus.kill()  # kill -9 of the front while the stream goes on
        _feed(pub, range(10_001, 20_001))
        bus = procs.eda("eda-bus", "serve", "--engine", engine, "--replicas", "3", "--bind", ep,
                        "--no-mdns")  # fmt: skip
        bus.wait_stderr(r"serving NATS stream", 30)
        hosts[0].kill()  # then kill -9 of one NATS node, the stream still going on
        _feed(pub, range(20_001, n + 1))
        assert pub.popen.stdin is not None
        pub.popen.stdin.close()
        assert pub.wait(60) == 0, pub.stderr
        got = replay(ep, "nums", n, "--raw")
        assert sorted(int(x) for x in got) == list(range(1, n + 1))  # each exactly once
        extra = run("eda-sub", "--bus", ep, "nums", "--from-seq", str(n + 1), "-W", "1", "--raw")
        assert extra.returncode == 4 and extra.stdout == ""
        bus.signal(signal.SIGTERM)
        assert bus.wait(10) == 0


def test_a_durable_consumer_waits_out_a_store_that_fails_its_subscription(
    procs: Procs, server: Server
) -> None:
    """The front's JetStream call for a subscription fails (here: nats-server frozen, no
    answer in time; in the nemesis: 503 while the stream elects a leader): the front
    refuses it for now (retry) and eda-sub --durable subscribes again, never exits."""
    bus, ep = start_front(procs, server.url, new_stream())
    assert run("eda-pub", "--bus", ep, "--confirm", "t.x", "1").returncode == 0
    server.proc.signal(signal.SIGSTOP)
    sub = procs.eda("eda-sub", "--bus", ep, "t.x", "--durable", "d1", "--raw", "-C", "2")
    wait_until(lambda: "request failed" in bus.stderr or sub.popen.poll() is not None, 60,
               "the front's subscription request failed")  # fmt: skip
    server.proc.signal(signal.SIGCONT)
    assert run("eda-pub", "--bus", ep, "--confirm", "t.x", "2").returncode == 0
    assert sub.wait(60) == 0, sub.stderr  # was: "the bus refused: NATS stream ...", exit 1
    assert sub.lines() == ["1", "2"]
