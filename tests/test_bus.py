"""eda-bus with real processes: confirmed publishing, replay, live, durable and group consumers.

One suite, run against both engines (the ``bus`` fixture): the embedded store
(``eda-bus serve --data DIR``) and a NATS JetStream stream behind a stateless
front (``eda-bus serve --engine nats://...``, a single-node ``nats-server -js``
started in the test's own network namespace).  eda-pub and eda-sub are the
same, flags, output and exit codes alike.  On NATS, "the bus is killed" means
the front (the events live in nats-server).  Where a behaviour differs, the
test says so with ``engine.differs(...)`` and the reason; the README lists the
same differences.  Tests that involve no bus at all (no bus answering, usage
errors) run once.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Proc, Procs, run, together, wait_until
from tests.natsnodes import nats_server

BIND = "tcp://127.0.0.1:0"
SERVING = r"serving .+ on (tcp://\S+) \(seq"


def start_bus(procs: Procs, data: Path, *args: str, bind: str = BIND) -> tuple[Proc, str]:
    """A bus serving *data*; its endpoint once it listens."""
    bus = procs.eda("eda-bus", "serve", "--data", str(data), "--bind", bind, "--no-mdns", *args)
    m = bus.wait_stderr(SERVING, 15)
    return bus, m[1]


_streams = itertools.count(1)


class Bus:
    """How a test serves the bus on one engine: ``embedded`` or ``nats``."""

    def __init__(self, engine: str, procs: Procs, tmp_path: Path) -> None:
        self.engine = engine
        self.procs = procs
        self.data = tmp_path / "bus"
        self.store = tmp_path / "jetstream"
        if engine == "nats":
            nats_server()
            from tests.test_bus_nats import Server

            self.server = Server(procs, self.store)
            self.stream = f"BUS{next(_streams)}"

    @property
    def nats(self) -> bool:
        return self.engine == "nats"

    def serve_args(self) -> list[str]:
        """What ``eda-bus serve`` needs to serve this engine's store."""
        if self.nats:
            return ["--engine", self.server.url, "--stream", self.stream]
        return ["--data", str(self.data)]

    def start(self, *args: str, bind: str = BIND) -> tuple[Proc, str]:
        """A bus (a front, on NATS) on this test's store; its endpoint once it listens."""
        bus = self.procs.eda("eda-bus", "serve", *self.serve_args(), "--bind", bind,
                             "--no-mdns", *args)  # fmt: skip
        m = bus.wait_stderr(SERVING, 30)
        return bus, m[1]

    def restart_nats_server(self) -> None:
        """kill -9 of nats-server, then the same server again on the same store and port."""
        self.server.proc.kill()
        argv = [nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.server.port),
                "-sd", str(self.store)]  # fmt: skip
        self.server.proc = self.procs.start(argv)
        self.server.proc.wait_stderr("Server is ready", 20)

    def differs(self, reason: str) -> bool:
        """True on NATS, where this test checks another behaviour, for *reason* (documented)."""
        assert reason
        return self.nats


@pytest.fixture(params=["embedded", "nats"])
def engine(request: pytest.FixtureRequest, procs: Procs, tmp_path: Path) -> Bus:
    """The engine under test: the embedded store, or a NATS JetStream stream behind a front."""
    return Bus(request.param, procs, tmp_path)


def stored_stats(endpoint: str) -> dict[str, object]:
    done = run("eda-bus", "stats", "--bus", endpoint, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return next(r for r in rows if r["kind"] == "bus")


def stored_events(endpoint: str) -> int:
    """The events the bus stores now, asked from this process: for polls, where a
    process per question (``eda-bus stats``) cost more than what it waited for."""
    from eda.core.bus.client import request

    return int(request(endpoint, {"op": "stats"})["stats"]["events"])


def replay(endpoint: str, pattern: str, n: int, *args: str) -> list[str]:
    done = run("eda-sub", "--bus", endpoint, pattern, "--from-start", "-C", str(n), "-W", "10",
               *args, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_confirmed_publish_then_replay_keeps_ids_and_adds_the_bus_sequence(
    procs: Procs, engine: Bus
) -> None:
    _, ep = engine.start()
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
    raw = replay(ep, "orders.paid", 3, "--raw")
    assert raw == ["a", "b", "c"]
    last = replay(ep, "orders.>", 1, "--format", "{id} {data}")
    assert last == [events[0]["id"] + ' {"id":1}']
    assert replay(ep, "orders.>", 2, "--format", "{edabusseq} {data}") == ['1 {"id":1}', "2 a"]
    # --last and --from-seq
    done = run("eda-sub", "--bus", ep, "orders.>", "--last", "2", "-C", "2", "--raw")
    assert done.stdout.splitlines() == ["b", "c"], done.stderr
    done = run("eda-sub", "--bus", ep, "orders.>", "--from-seq", "3", "-C", "2", "--raw")
    assert done.stdout.splitlines() == ["b", "c"], done.stderr


def test_no_bus_answering_is_a_timeout_naming_the_unconfirmed_events(
    procs: Procs, tmp_path: Path
) -> None:
    from tests.helpers import closed_port

    ep = f"tcp://127.0.0.1:{closed_port()}"
    done = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "1.5", "t.x", "a", "b")
    assert done.returncode == 4, done.stderr
    assert "did not confirm 2 event(s)" in done.stderr
    assert "t.x" in done.stderr and "(2 event(s))" in done.stderr


def _feed(proc: Proc, lines: range) -> None:
    assert proc.popen.stdin is not None
    proc.popen.stdin.write("".join(f"{i}\n" for i in lines).encode())
    proc.popen.stdin.flush()


def test_kill_9_of_the_bus_mid_confirmed_stream_stores_every_event_exactly_once(
    procs: Procs, engine: Bus
) -> None:
    bus, ep = engine.start()
    n = 200_000
    pub = procs.eda("eda-pub", "--bus", ep, "--confirm", "--timeout", "30", "-v", "nums",
                    stdin=subprocess.PIPE)  # fmt: skip
    _feed(pub, range(1, 100_001))
    wait_until(lambda: stored_events(ep) > 0, 15, "events stored")
    bus.kill()  # kill -9 while the stream goes on
    _feed(pub, range(100_001, 150_001))
    bus2, ep2 = engine.start(bind=ep)
    assert ep2 == ep
    _feed(pub, range(150_001, n + 1))
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    assert pub.wait(60) == 0, pub.stderr
    assert int(stored_stats(ep)["events"]) == n  # type: ignore[call-overload]
    got = replay(ep, "nums", n, "--raw")
    assert sorted(int(x) for x in got) == list(range(1, n + 1))
    # nothing beyond: a further event would be the (n+1)th
    extra = run("eda-sub", "--bus", ep, "nums", "--from-seq", str(n + 1), "-W", "1", "--raw")
    assert extra.returncode == 4 and extra.stdout == ""
    bus2.signal(signal.SIGTERM)
    assert bus2.wait(10) == 0


def test_replay_switches_to_live_without_gap_or_duplicate_while_publishing(
    procs: Procs, engine: Bus
) -> None:
    _, ep = engine.start()
    pub = procs.eda("eda-pub", "--bus", ep, "--confirm", "live.n", stdin=subprocess.PIPE)
    _feed(pub, range(1, 20_001))
    wait_until(lambda: stored_events(ep) >= 1, 15, "events stored")
    total = 60_000
    sub = procs.eda("eda-sub", "--bus", ep, "live.>", "--from-start", "-C", str(total))
    for start in range(20_001, total + 1, 5_000):  # publishing goes on during the replay
        _feed(pub, range(start, start + 5_000))
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    assert pub.wait(60) == 0, pub.stderr
    assert sub.wait(60) == 0, sub.stderr
    events = [json.loads(line) for line in sub.lines()]
    assert [e["data"] for e in events] == [str(i) for i in range(1, total + 1)]
    assert [e["edabusseq"] for e in events] == list(range(1, total + 1))


@pytest.mark.long
def test_durable_consumer_resumes_after_its_kill_9_and_after_a_bus_restart(
    procs: Procs, engine: Bus
) -> None:
    bus, ep = engine.start()
    done = run("eda-pub", "--bus", ep, "--confirm", "jobs.a", input="".join(
        f"{i}\n" for i in range(1, 3001)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # a first run takes 1000 events and leaves: they are acknowledged
    first = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-C", "1000")
    assert first.stdout.splitlines() == [str(i) for i in range(1, 1001)], first.stderr
    # a second run is killed (-9) after it wrote some
    second = procs.eda("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw")
    second.wait_lines(3000 - 1000, 20)
    second.kill()
    seen2 = [int(x) for x in second.lines()]
    assert seen2[0] == 1001
    # the bus is killed too, then more is published
    bus.kill()
    bus, ep = engine.start(bind=ep)
    done = run("eda-pub", "--bus", ep, "--confirm", "jobs.a", input="".join(
        f"{i}\n" for i in range(3001, 3501)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    third = run("eda-sub", "--bus", ep, "jobs.>", "--durable", "billing", "--raw", "-W", "2")
    seen3 = [int(x) for x in third.stdout.splitlines()]
    # at-least-once: everything after what was acknowledged, nothing acknowledged again
    assert seen3 and seen3[-1] == 3500 and seen3 == list(range(seen3[0], 3501))
    assert 1001 <= seen3[0] <= 3001
    assert set(range(1, 1001)) | set(seen2) | set(seen3) == set(range(1, 3501))


def test_group_members_share_events_exactly_once(procs: Procs, engine: Bus) -> None:
    _, ep = engine.start()
    a = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "--raw", "-v")
    b = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "--raw", "-v")
    a.wait_stderr("subscribed", 15)
    b.wait_stderr("subscribed", 15)
    n = 20_000
    done = run("eda-pub", "--bus", ep, "--confirm", "work.items", input="".join(
        f"{i} {'x' * 100}\n" for i in range(1, n + 1)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_until(lambda: a.newlines() + b.newlines() >= n, 20, "all events handed out")
    got_a = [int(x.split()[0]) for x in a.lines()]
    got_b = [int(x.split()[0]) for x in b.lines()]
    assert sorted(got_a + got_b) == list(range(1, n + 1))  # each to exactly one member
    assert got_a and got_b


@pytest.mark.long
def test_a_dead_group_members_unacknowledged_events_go_to_the_others(
    procs: Procs, engine: Bus, tmp_path: Path
) -> None:
    """A member takes its share and hangs in its command (alive, heartbeating, holding
    events it never acknowledges), then dies: what it held goes to the others. (Held
    while alive, so the test does not race the 5 s after which a silent member is gone.)"""
    _, ep = engine.start()
    taken = tmp_path / "a.out"
    a = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "-v",
                  "--exec", f"cat >> {taken}; exec sleep 600")  # fmt: skip
    a.wait_stderr("subscribed", 15)
    n = 500
    done = run("eda-pub", "--bus", ep, "--confirm", "work.items", input="".join(
        f"{i}\n" for i in range(1, n + 1)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # held by the bus for A, and A's command has them (it writes them as it reads)
    def reading() -> bool:
        return taken.exists() and taken.stat().st_size > 0

    held = wait_until(lambda: reading() and (_group(ep) or {}).get("held"), 30,
                      "events held by A, and A's command reading them")  # fmt: skip
    assert held > 0
    a.kill()  # the whole process group: eda-sub and its hanging command
    b = procs.eda("eda-sub", "--bus", ep, "work.>", "--group", "workers", "--raw")
    # GONE_AFTER (5 s) without a heartbeat: A's events go to B, each once
    wait_until(lambda: b.newlines() >= n, 30, "B got every event, A's too")
    assert sorted(int(x) for x in b.lines()) == list(range(1, n + 1))
    a_ran = [json.loads(line)["data"] for line in taken.read_text().splitlines()]
    assert a_ran and set(a_ran) <= {str(i) for i in range(1, n + 1)}


def _group(ep: str) -> dict[str, object] | None:
    """The group consumer's stats row (asked from this process: a poll)."""
    from eda.core.bus.client import request

    rows = request(ep, {"op": "stats"})["stats"]["consumers"]
    return next((r for r in rows if r["kind"] == "group"), None)


@pytest.mark.long
def test_a_bus_restarted_with_the_same_command_comes_back_where_its_clients_are(
    procs: Procs, engine: Bus
) -> None:
    # the README's command, no --bind: the port of the last run is remembered
    # (embedded: in --data; NATS: under $XDG_STATE_HOME, per stream)
    serve = ["eda-bus", "serve", *engine.serve_args(), "-v"]
    bus = procs.eda(*serve)
    ep = bus.wait_stderr(SERVING, 30)[1]
    bus.wait_stderr("announced bus", 15)
    n = 50_000
    sub = procs.eda("eda-sub", "--bus", "nums", "--from-start", "-C", str(n), "--raw")
    pub = procs.eda("eda-pub", "--bus", "--confirm", "nums", stdin=subprocess.PIPE)
    _feed(pub, range(1, 25_001))
    wait_until(lambda: stored_events(ep) > 0, 15, "events stored")
    # and the subscriber has found the bus (a subscriber still starting when the bus is
    # killed finds none, exit 3: with stores on tmpfs the events are stored before that)
    wait_until(lambda: sub.newlines() > 0, 30, "the subscriber's first events")
    bus.kill()  # kill -9 mid-stream, then the same command again
    _feed(pub, range(25_001, n + 1))
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    bus = procs.eda(*serve)
    assert bus.wait_stderr(SERVING, 30)[1] == ep
    assert pub.wait(60) == 0, pub.stderr
    assert int(stored_stats(ep)["events"]) == n  # type: ignore[call-overload]
    assert sub.wait(60) == 0, sub.stderr
    assert sorted(int(x) for x in sub.lines()) == list(range(1, n + 1))


@pytest.mark.long
def test_clients_find_a_bus_that_came_back_elsewhere_again(
    procs: Procs, tmp_path: Path
) -> None:
    data = tmp_path / "bus"
    bus = procs.eda("eda-bus", "serve", "--data", str(data), "-v")
    ep = bus.wait_stderr(SERVING, 30)[1]
    bus.wait_stderr("announced bus", 15)
    n = 20_000
    sub = procs.eda("eda-sub", "--bus", "nums", "--from-start", "-C", str(n), "--raw")
    pub = procs.eda("eda-pub", "--bus", "--confirm", "nums", stdin=subprocess.PIPE)
    _feed(pub, range(1, 10_001))
    wait_until(lambda: stored_events(ep) > 0, 15, "events stored")
    # the subscriber is connected (it has events) before the bus goes: a subscriber
    # still starting when it went finds no bus at all, and says so (exit 3)
    wait_until(lambda: sub.newlines() > 0, 30, "the subscriber's first events")
    bus.kill()
    (data / "port").unlink()  # forgotten: it comes back on another port
    _feed(pub, range(10_001, n + 1))
    assert pub.popen.stdin is not None
    pub.popen.stdin.close()
    bus = procs.eda("eda-bus", "serve", "--data", str(data), "-v")
    ep2 = bus.wait_stderr(SERVING, 30)[1]
    assert ep2 != ep
    assert pub.wait(60) == 0, pub.stderr  # it looked again (cache, then mDNS)
    assert int(stored_stats(ep2)["events"]) == n  # type: ignore[call-overload]
    got = replay(ep2, "nums", n, "--raw")
    assert sorted(int(x) for x in got) == list(range(1, n + 1))
    assert sub.wait(30) == 0, sub.stderr  # the running subscriber found it again too
    assert sorted(int(x) for x in sub.lines()) == list(range(1, n + 1))


def test_a_remembered_port_that_is_taken_or_garbage_gives_another_port(
    procs: Procs, tmp_path: Path
) -> None:
    _, ep = start_bus(procs, tmp_path / "a")
    taken = ep.rsplit(":", 1)[1]
    assert (tmp_path / "a" / "port").read_text().strip() == taken
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "port").write_text(taken)
    second, ep2 = start_bus(procs, tmp_path / "b")
    assert ep2 != ep
    assert f"port {taken} of the last run is taken: binding another" in second.stderr
    assert (tmp_path / "b" / "port").read_text().strip() == ep2.rsplit(":", 1)[1]
    second.kill()
    (tmp_path / "b" / "port").write_text("99999\n\x1b[2J")  # garbage: ignored
    third, ep3 = start_bus(procs, tmp_path / "b")
    assert "warning" not in third.stderr
    done = run("eda-pub", "--bus", ep3, "--confirm", "t.x", "hello")
    assert done.returncode == 0, done.stderr


def test_clients_find_the_bus_by_mdns(procs: Procs, engine: Bus) -> None:
    bus = procs.eda("eda-bus", "serve", *engine.serve_args(), "-v")
    bus.wait_stderr("announced bus", 15)
    done = run("eda-pub", "--bus", "--confirm", "found.it", "hello")
    assert done.returncode == 0, done.stderr
    got = run("eda-sub", "--bus", "found.>", "--from-start", "-C", "1", "--raw", "-W", "10")
    assert got.stdout == "hello\n", got.stderr
    env = {"EDA_BUS": "tcp://127.0.0.1:1"}  # EDA_BUS wins over mDNS
    nobody = run("eda-pub", "--bus", "--confirm", "--timeout", "1", "found.it", "x", env=env)
    assert nobody.returncode == 4, nobody.stderr


def test_a_live_subscriber_continues_across_a_bus_restart(procs: Procs, engine: Bus) -> None:
    bus, ep = engine.start()
    first = run("eda-pub", "--bus", ep, "--confirm", "r.n", input="1\n2\n3\n")
    assert first.returncode == 0, first.stderr
    sub = procs.eda("eda-sub", "--bus", ep, "r.n", "--from-start", "-C", "6", "--raw")
    sub.wait_lines(3, 15)
    bus.kill()
    bus, ep = engine.start(bind=ep)
    more = run("eda-pub", "--bus", ep, "--confirm", "r.n", input="4\n5\n6\n")
    assert more.returncode == 0, more.stderr
    assert sub.wait(20) == 0, sub.stderr
    assert sub.lines() == ["1", "2", "3", "4", "5", "6"]


def test_a_torn_last_write_is_repaired_on_start_with_a_message(procs: Procs, engine: Bus) -> None:
    bus, ep = engine.start()
    for start in (1, 1001, 2001):
        lines = "".join(f"{i}\n" for i in range(start, start + 1000))
        done = run("eda-pub", "--bus", ep, "--confirm", "torn.n", input=lines)
        assert done.returncode == 0, done.stderr
    if engine.differs(
        "the front keeps no store, so there is no file of eda's to tear: the events are in "
        "nats-server's own file store, which recovers itself; checked instead: kill -9 of "
        "nats-server and a restart keep every confirmed event, and the front goes on"
    ):
        engine.restart_nats_server()
        more = run("eda-pub", "--bus", ep, "--confirm", "--timeout", "30", "torn.n", "3001")
        assert more.returncode == 0, more.stderr
        assert int(stored_stats(ep)["events"]) == 3001  # type: ignore[call-overload]
        assert replay(ep, "torn.n", 3001, "--raw") == [str(i) for i in range(1, 3002)]
        assert bus.popen.poll() is None  # the same front, no user action
        return
    bus.kill()  # kill -9: the WAL stays as it is
    wal = engine.data / "bus.db-wal"
    image = bytearray(wal.read_bytes())
    del image[-1000:]  # the last write torn
    wal.write_bytes(bytes(image))
    bus, ep = engine.start(bind=ep)
    assert "torn" in bus.stderr
    stored = int(stored_stats(ep)["events"])  # type: ignore[call-overload]
    assert 2000 <= stored < 3000  # back to the last good commit, nothing before it lost
    got = replay(ep, "torn.n", stored, "--raw")
    assert got == [str(i) for i in range(1, stored + 1)]


def test_since_and_serve_retention(procs: Procs, engine: Bus) -> None:
    bus, ep = engine.start()
    done = run("eda-pub", "--bus", ep, "--confirm", "s.n",
               input="".join(f"{i:0200d}\n" for i in range(1, 2001)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    past = run("eda-sub", "--bus", ep, "s.n", "--since", "2020-01-01T00:00Z", "-C", "1", "--raw")
    assert past.stdout.strip() == f"{1:0200d}", past.stderr
    future = run("eda-sub", "--bus", ep, "s.n", "--since", "2999-01-01T00:00Z", "-W", "1")
    assert future.returncode == 4 and future.stdout == ""
    bad = run("eda-sub", "--bus", ep, "s.n", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr
    bus.signal(signal.SIGTERM)
    assert bus.wait(10) == 0
    # served again with a size limit: the oldest events go at once
    _, ep = engine.start("--max-bytes", "100kB", bind=ep)

    def retained() -> dict[str, object] | None:
        now = stored_stats(ep)
        return now if int(now["bytes"]) <= 100_000 else None  # type: ignore[call-overload]

    stats = wait_until(retained, 15, "retention by size")
    assert 0 < int(stats["events"]) < 2000
    assert int(stats["first_seq"]) == 2001 - int(stats["events"])
    # a subscriber asking for what retention removed is told how much it lost
    first = int(stats["first_seq"])  # type: ignore[call-overload]
    late = run("eda-sub", "--bus", ep, "s.n", "--from-seq", "1", "-C", "1", "--raw")
    assert late.returncode == 0 and late.stdout.strip() == f"{first:0200d}", late.stderr
    assert f"lost {first - 1} events" in late.stderr
    strict = run("eda-sub", "--bus", ep, "s.n", "--from-seq", "1", "--strict", "-W", "5")
    assert strict.returncode == 5, strict.stderr


def test_printed_events_round_trip_through_the_bus_with_ids_kept(procs: Procs, engine: Bus) -> None:
    _, ep = engine.start()
    done = run("eda-pub", "--bus", ep, "--confirm", "orig.x", "a", "b")
    assert done.returncode == 0, done.stderr
    printed = replay(ep, "orig.x", 2)
    again = run("eda-pub", "--bus", ep, "--confirm", "--envelope", "copy.x",
                input="\n".join(printed) + "\n")  # fmt: skip
    assert again.returncode == 0, again.stderr

    def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), keys
        return dict(pairs)

    copies = [json.loads(line, object_pairs_hook=no_duplicate_keys)
              for line in replay(ep, "copy.x", 2)]  # fmt: skip
    originals = [json.loads(line) for line in printed]
    assert [c["id"] for c in copies] == [o["id"] for o in originals]
    assert [c["data"] for c in copies] == ["a", "b"]
    assert [c["edabusseq"] for c in copies] == [3, 4]


def test_group_members_running_exec_share_the_work(
    procs: Procs, engine: Bus, tmp_path: Path
) -> None:
    _, ep = engine.start()
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    members = [
        procs.eda("eda-sub", "--bus", ep, "job.>", "--group", "w", "-v", "--exec", f"cat >> {out}")
        for out in outs
    ]
    for m in members:
        m.wait_stderr("subscribed", 15)
    n = 300
    done = run("eda-pub", "--bus", ep, "--confirm", "job.x",
               input="".join(f"{i}\n" for i in range(n)))  # fmt: skip
    assert done.returncode == 0, done.stderr

    def handled() -> list[list[str]]:
        return [[json.loads(x)["data"] for x in o.read_text().splitlines()] if o.exists() else []
                for o in outs]  # fmt: skip

    wait_until(lambda: sum(map(len, handled())) >= n, 30, "every job handled")
    a, b = handled()
    assert sorted(a + b, key=int) == [str(i) for i in range(n)]
    if engine.differs(
        "a group shares whole publisher batches on NATS (one JetStream message each, claimed "
        "by one member); these 300 events left eda-pub as one batch, so one member ran them "
        "all. Sharing across batches: test_group_members_share_events_exactly_once[nats]"
    ):
        assert sorted([len(a), len(b)]) == [0, n]
        return
    assert a and b  # both worked


_JOB = """cat > /dev/null
: > "$2/running/$1.$EDA_ID"
while [ ! -e "$2/go/$EDA_ID" ]; do sleep 0.02; done
mv "$2/running/$1.$EDA_ID" "$2/done/"
"""


@pytest.mark.parametrize("max_pending", [None, 2])
def test_group_members_share_slow_jobs_holding_at_most_max_pending(
    procs: Procs, engine: Bus, tmp_path: Path, max_pending: int | None
) -> None:
    """Ten slow jobs (each waits until the test lets it finish) for two members: both
    work, and the bus never sees a member hold more than --max-pending (default with
    --exec: 1) events unacknowledged.  Before --max-pending, the first member took all
    ten.  (Each job is its own batch: NATS never splits one.)"""
    from eda.core.bus.client import request

    _, ep = engine.start()
    for d in ("running", "go", "done"):
        (tmp_path / d).mkdir()
    job = tmp_path / "job.sh"
    job.write_text(_JOB)
    extra = [] if max_pending is None else ["--max-pending", str(max_pending)]
    most = max_pending or 1
    n = 10
    # stored first (a job waits on the test only, never on publishing), by ten publishers
    # at once: ten batches
    for done in together(*(lambda i=i: run("eda-pub", "--bus", ep, "--confirm", "job.x", str(i))
                           for i in range(n))):  # fmt: skip
        assert done.returncode == 0, done.stderr
    members = [procs.eda("eda-sub", "--bus", ep, "job.>", "--group", "w", "--from-start", "-v",
                         *extra, "--exec", f"sh {job} {name} {tmp_path}") for name in "ab"]  # fmt: skip
    for member in members:
        member.wait_stderr("subscribed", 15)

    def held() -> int:
        consumers = request(ep, {"op": "stats"})["stats"]["consumers"]
        return int(next(c["held"] for c in consumers if c["name"] == "w"))

    finished: list[str] = []
    while len(finished) < n:
        running = wait_until(lambda: [f.name for f in (tmp_path / "running").iterdir()], 30,
                             f"a job running ({len(finished)} done)")  # fmt: skip
        who = [name.split(".", 1)[0] for name in running]
        assert len(who) == len(set(who))  # one job at a time per member
        # every running job waits for the test: what the bus sees held is what members hold
        assert len(running) <= held() <= 2 * most
        for name in running:
            (tmp_path / "go" / name.split(".", 1)[1]).touch()
        let_go = [tmp_path / "done" / name for name in running]
        wait_until(lambda: all(f.exists() for f in let_go), 30, "the jobs let go finished")  # noqa: B023
        finished += running
    assert {name.split(".", 1)[0] for name in finished} == {"a", "b"}  # both worked
    assert len(set(finished)) == n
    wait_until(lambda: held() == 0, 30, "every job acknowledged")


@pytest.mark.long
def test_a_group_member_whose_job_outlasts_the_silence_limit_keeps_it(
    procs: Procs, engine: Bus, tmp_path: Path
) -> None:
    """A member silent for 5 s is dropped and its events go to the others; a member
    running a long --exec job is not silent (it heartbeats meanwhile), so the job runs
    once.  The 5 s are measured by the bus itself: a canary subscribes once the job
    runs and never says another word; once the bus dropped it, the job outlasted them."""
    import zmq

    bus, ep = engine.start("-v")
    for d in ("running", "go", "done"):
        (tmp_path / d).mkdir()
    job = tmp_path / "job.sh"
    job.write_text(_JOB)
    done = run("eda-pub", "--bus", ep, "--confirm", "job.x", "long")
    assert done.returncode == 0, done.stderr
    for name in "ab":
        m = procs.eda("eda-sub", "--bus", ep, "job.>", "--group", "w", "--from-start", "-v",
                      "--exec", f"sh {job} {name} {tmp_path}")  # fmt: skip
        m.wait_stderr("subscribed", 15)
    (running,) = wait_until(lambda: list((tmp_path / "running").iterdir()), 30, "the job")
    canary = zmq.Context.instance().socket(zmq.DEALER)
    canary.setsockopt(zmq.ROUTING_ID, b"canary")
    try:
        canary.connect(ep)
        canary.send_multipart([b"R", b'{"op":"sub","patterns":["none.>"],"credit":0,"rid":1}'])
        bus.wait_stderr(rf"subscription {b'canary'.hex()} silent for 5s: dropped", 30)
    finally:
        canary.close(linger=0)
    # silent since before the canary subscribed, the member would have been dropped first
    assert bus.stderr.count("silent for") == 1
    (tmp_path / "go" / running.name.split(".", 1)[1]).touch()
    wait_until(lambda: not list((tmp_path / "running").iterdir()), 30, "the job finished")
    assert [f.name for f in (tmp_path / "done").iterdir()] == [running.name]  # run once


def test_refusals_and_usage_errors_are_one_line(procs: Procs, engine: Bus, tmp_path: Path) -> None:
    _, ep = engine.start()
    bad = run("eda-sub", "--bus", ep, "a..b", "-W", "5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "eda-sub: error: invalid pattern 'a..b'" in bad.stderr
    both = run("eda-sub", "--bus", ep, "a.>", "--durable", "x", "--group", "y")
    assert both.returncode == 2 and "exclude" in both.stderr
    two = run("eda-sub", "--bus", ep, "a.>", "--from-start", "--last", "3")
    assert two.returncode == 2 and "choose one" in two.stderr
    nobus = run("eda-pub", "--bus", "--no-mdns", "--confirm", "a.b", "x",
                env={"EDA_BUS": "", "XDG_CACHE_HOME": str(tmp_path / "cache")})  # fmt: skip
    assert nobus.returncode == 3 and "no bus found" in nobus.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["eda-pub", "--bus", "--no-mdns", "--confirm", "a.b", "x"],
        ["eda-pub", "--bus", "--no-mdns", "a.b", "x"],
        ["eda-sub", "--bus", "--no-mdns", "a.>", "-C", "1"],
        ["eda-sub", "--no-mdns", "--durable", "d", "a.>", "-C", "1"],
        ["eda-bus", "stats", "--no-mdns"],
        ["eda-bus", "retain", "--no-mdns", "--max-age", "1d"],
    ],
)
def test_no_bus_found_exits_3_not_found(argv: list[str], tmp_path: Path) -> None:
    """The README's exit table: 3 is "not found"; a missing bus is one, for every client."""
    done = run(*argv, env={"EDA_BUS": "", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and "no bus found" in done.stderr, done.stderr


def test_bus_stats_and_retain_take_a_timeout(tmp_path: Path) -> None:
    """A bus that never answers (nothing listens): exit 4 after --timeout, named in the error."""
    for argv in (["stats"], ["retain", "--max-age", "1d"]):
        done = run("eda-bus", *argv, "--bus", "tcp://127.0.0.1:9", "--timeout", "0.3")
        assert done.returncode == 4, done.stderr
        assert "did not answer within 0.3s" in done.stderr and done.stderr.count("\n") == 1


def test_an_invalid_pattern_is_a_usage_error_before_looking_for_the_bus(tmp_path: Path) -> None:
    """As without --bus: exit 2 and the pattern named, even with no bus anywhere."""
    done = run("eda-sub", "--bus", "--no-mdns", "a..b",
               env={"EDA_BUS": "", "XDG_CACHE_HOME": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("eda-sub: error: invalid pattern 'a..b'"), done.stderr


@pytest.mark.parametrize("engine", ["nats"], indirect=True)
def test_fronts_on_one_stream_deliver_what_the_others_stored(procs: Procs, engine: Bus) -> None:
    """NATS only: the embedded store has one server, a JetStream stream may have many fronts."""
    _, ep1 = engine.start()
    _, ep2 = engine.start()
    live = procs.eda("eda-sub", "--bus", ep2, "two.>", "-C", "3", "--raw", "-v")
    live.wait_stderr("subscribed", 15)
    done = run("eda-pub", "--bus", ep1, "--confirm", "two.x", "a", "b", "c")
    assert done.returncode == 0, done.stderr
    assert live.wait(20) == 0, live.stderr  # live through the front that stored nothing
    assert live.lines() == ["a", "b", "c"]
    assert replay(ep2, "two.>", 3, "--raw") == ["a", "b", "c"]


@pytest.mark.parametrize("engine", ["nats"], indirect=True)
def test_more_replicas_than_a_single_nats_server_keeps_are_refused(
    procs: Procs, engine: Bus
) -> None:
    """NATS only: a server that is not clustered would record 3 replicas and keep one copy."""
    bus, _ = engine.start()
    bus.kill()
    url, stream = engine.server.url, engine.stream
    done = run("eda-bus", "serve", "--engine", url, "--stream", stream, "--replicas", "3",
               "--max-age", "1h", "--no-mdns", timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"eda-bus: error: cannot change NATS stream {stream} (replicas 1 -> 3, max_age 0.0 -> "
        "1h): the server is not clustered, so it keeps one copy (more need a JetStream "
        "cluster)\n"
    )
    again, ep = engine.start("--max-age", "1h")  # what it can do, it does
    assert f"NATS stream {stream} changed: max_age 0.0 -> 1h" in again.stderr
    assert run("eda-pub", "--bus", ep, "--confirm", "r.x", "1").returncode == 0


def test_a_bus_value_that_looks_like_an_endpoint_is_never_a_topic(
    procs: Procs, tmp_path: Path
) -> None:
    """``--bus HOST:PORT`` (no tcp://) once published to the topic 'HOST:PORT' on the bus
    found otherwise; it is a usage error in eda-pub and eda-sub alike."""
    _, ep = start_bus(procs, tmp_path / "bus")
    hostport = ep.removeprefix("tcp://")
    env = {"EDA_BUS": ep}  # where --bus without an endpoint would go
    for argv in (
        ("eda-pub", "--bus", hostport, "--confirm", "orders.created", "x"),
        ("eda-sub", "--bus", hostport, "orders.>", "--from-start", "-W", "2"),
        ("eda-pub", "--bus", "localhost:99999", "--confirm", "orders.created", "x"),
    ):
        done = run(*argv, env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "use tcp://HOST:PORT" in done.stderr, done.stderr
    assert int(stored_stats(ep)["events"]) == 0  # type: ignore[call-overload]
    # a topic after --bus still means the bus found otherwise; a tcp:// value is the bus
    done = run("eda-pub", "--bus", "orders.created", "--confirm", "y", env=env)
    assert done.returncode == 0, done.stderr
    done = run("eda-pub", "--bus", ep, "--confirm", "orders.created", "z")
    assert done.returncode == 0, done.stderr
    done = run("eda-sub", "--bus", "orders.>", "--from-start", "-C", "2", "--raw", env=env)
    assert (done.returncode, done.stdout) == (0, "y\nz\n"), done.stderr
