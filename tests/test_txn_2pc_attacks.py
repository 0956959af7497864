"""eda-txn 2PC under attack: slow lookups, dead and failing peers, floods, bad data, clock jumps.

In-process: the coordinator and participants serve from threads of the
test process (their sockets are made and used in their own thread), with
actions as Python functions, so a scenario costs milliseconds, not
processes.  The command line is run where the command is under test.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core.daemon import Daemon
from eda.core.errors import EdaError
from eda.core.registry.access import Access
from eda.core.reqrep import Client, Unavailable
from eda.core.txn import coordinator as coordinator_module
from eda.core.txn.actions import Call, Result
from eda.core.txn.coordinator import Coordinator
from eda.core.txn.directory import Directory
from eda.core.txn.participant import Participant
from eda.core.txn.protocol import MAX_DATA, MAX_RESOLVE, NAME_RE, Filter
from eda.core.txn.status import twopc
from tests import helpers
from tests.helpers import run, wait_until

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")


class Actions:
    """Actions as Python: *fail* says which phases fail; every call is counted."""

    def __init__(self, fail: Callable[[Call], bool] = lambda _c: False) -> None:
        self.fail = fail
        self.calls: list[Call] = []
        self.times: list[float] = []  # when each call ran (time.monotonic)

    def run(self, call: Call) -> Result:
        self.calls.append(call)
        self.times.append(time.monotonic())
        return Result(False, "refused") if self.fail(call) else Result(True)

    def run_many(self, calls: list[Call]) -> list[Result]:
        return [self.run(c) for c in calls]

    def close(self) -> None:
        pass

    def count(self, phase: str) -> int:
        return sum(1 for c in self.calls if c.phase == phase)


class Running:
    """A daemon made by *make* and serving in a thread of its own until :meth:`stop`."""

    def __init__(self, make: Callable[[], Daemon]) -> None:
        self.daemon: Any = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        made = threading.Event()

        def main() -> None:
            try:
                self.daemon = make()
            except BaseException as exc:
                self.error = exc
                made.set()
                raise
            made.set()
            try:
                self.daemon.serve(until=self._stop.is_set)
            finally:
                self.daemon.close()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert made.wait(10) and self.error is None, self.error

    @property
    def endpoint(self) -> str:
        return str(self.daemon.endpoint)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


@pytest.fixture
def running() -> Iterator[Callable[[Callable[[], Daemon]], Running]]:
    made: list[Running] = []

    def start(make: Callable[[], Daemon]) -> Running:
        r = Running(make)
        made.append(r)
        return r

    yield start
    for r in reversed(made):
        r.stop()


FAST = {"inquire_after": 0.3, "inquire_timeout": 0.3}


def participant(running: Any, tmp_path: Path, name: str, actions: Actions) -> Running:
    return running(lambda: Participant(name, actions, tmp_path, **FAST))  # type: ignore[arg-type]


class Asker:
    """Requests to a coordinator over one socket, many in flight, replies by rid."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.rid = 0
        self.replies: dict[int, dict[str, Any]] = {}

    def send(self, msg: dict[str, Any]) -> int:
        self.rid += 1
        self.sock.send(json.dumps({**msg, "rid": self.rid}).encode())
        return self.rid

    def send_raw(self, frame: bytes) -> None:
        self.sock.send(frame)

    def wait(self, rid: int, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while rid not in self.replies:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply to request {rid} within {timeout}s"
            if self.sock.poll(int(left * 1000) + 1):
                for frame in self.sock.recv_multipart():
                    reply = json.loads(frame)
                    self.replies[reply.get("rid")] = reply
        return self.replies.pop(rid)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def asker() -> Iterator[Callable[[str], Asker]]:
    made: list[Asker] = []

    def make(endpoint: str) -> Asker:
        a = Asker(endpoint)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def commit(names: list[str], data: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"op": "commit", "participants": names, "data": data or {}, **kw}


# -- lookups off the loop -----------------------------------------------------------------------
def test_a_participant_being_looked_up_does_not_delay_other_transactions(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    """Five names nobody answers for, their lookups held until the end: a
    transaction to a participant already found completes meanwhile (it used to
    wait behind every lookup)."""
    stock = participant(running, tmp_path, "stock", Actions())
    looked: list[str] = []
    released = threading.Event()

    def find(name: str) -> list[str]:
        looked.append(name)
        if name == "stock":
            return [stock.endpoint]
        released.wait(60)  # mDNS asking a LAN where nobody answers, for as long as it takes
        return []

    coord = running(lambda: Coordinator("c1", tmp_path, directory=Directory(find=find)))
    a = asker(coord.endpoint)
    assert a.wait(a.send(commit(["stock"])))["outcome"] == "committed"  # stock now known
    ghosts = [a.send(commit([f"ghost-{i}"], timeout=60)) for i in range(5)]
    wait_until(lambda: any(n.startswith("ghost-") for n in looked), 10, "a ghost lookup")
    try:
        fast = a.wait(a.send(commit(["stock"])), 30)  # while that lookup still hangs
        assert fast["outcome"] == "committed"
        assert coord.daemon.looking  # the ghosts were still being looked up
    finally:
        released.set()
    for rid in ghosts:  # the lookups still end, in the background: not found, aborted
        reply = a.wait(rid, 30)
        assert reply["outcome"] == "aborted" and "not found" in reply["reason"], reply
    assert coord.daemon.voting == 0 and not coord.daemon.looking


def test_a_lookup_slower_than_the_vote_timeout_aborts_and_the_flood_of_names_is_bounded(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    release = threading.Event()

    def find(name: str) -> list[str]:
        release.wait(10)
        return []

    directory = Directory(find=find)
    directory.lookups.max_pending = 3
    coord = running(lambda: Coordinator("c1", tmp_path, directory=directory))
    a = asker(coord.endpoint)
    rids = [a.send(commit([f"n{i}"], timeout=0.3)) for i in range(10)]
    replies = [a.wait(rid) for rid in rids]
    assert all(r["outcome"] == "aborted" for r in replies)
    waited = [r for r in replies if "still looked for after 0.3s" in r["reason"]]
    refused = [r for r in replies if r["reason"].endswith("not found")]
    assert len(waited) == 3 and len(refused) == 7, replies  # at most 3 names queued
    release.set()


def test_a_registry_that_stops_answering_does_not_make_known_participants_unknown(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    """The registry answers once, then stalls (SIGSTOP): every lookup after the first
    fails.  The participants found keep being used while they are looked up again,
    and a name never found is refused for the true reason: no answer, not "not found"."""
    stock = participant(running, tmp_path, "stock", Actions())
    pay = participant(running, tmp_path, "pay", Actions())
    where = {"stock": stock.endpoint, "pay": pay.endpoint}
    looked: list[str] = []

    def find(name: str) -> list[str]:
        looked.append(name)
        if looked.count(name) > 1 or name not in where:
            raise Unavailable("no registry answered (tried tcp://127.0.0.1:7700)")
        return [where[name]]

    # answers kept 0.2 s instead of 30 s: many refreshes in a second
    directory = Directory(find=find, ttl=0.2, miss_ttl=0.05)
    coord = running(lambda: Coordinator("c1", tmp_path, directory=directory))
    a = asker(coord.endpoint)
    assert a.wait(a.send(commit(["stock", "pay"])))["outcome"] == "committed"
    outcomes = []
    while looked.count("stock") < 4 or looked.count("pay") < 4:  # refreshed (and failed) thrice
        reply = a.wait(a.send(commit(["stock", "pay"])))
        outcomes.append((reply["outcome"], reply["reason"]))
    assert set(outcomes) == {("committed", "")}, outcomes
    ghost = a.wait(a.send(commit(["stock", "ghost"])))
    assert ghost["outcome"] == "aborted"
    assert "not found" not in ghost["reason"] and "no registry answered" in ghost["reason"], ghost


def test_an_endpoint_declared_stale_is_still_used_when_the_lookup_gets_no_answer() -> None:
    answers: list[Any] = [["tcp://127.0.0.1:7001"], Unavailable("no registry answered"), []]

    def find(_name: str) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    directory = Directory(find=find, ttl=30, miss_ttl=0)
    assert directory.endpoints("stock") == ["tcp://127.0.0.1:7001"]
    directory.stale("stock")  # it stopped answering: look it up again before using it
    assert directory.endpoints("stock") == ["tcp://127.0.0.1:7001"]  # no answer: still it
    assert "no registry answered" in directory.missing("stock")
    assert directory.endpoints("stock") == []  # the registry answers: it is gone
    assert directory.missing("stock") == "participant stock not found"


def test_a_real_registry_stopped_keeps_known_participants_in_use(
    procs: Any, running: Any, asker: Any, tmp_path: Path
) -> None:
    """The same with a real eda-registry, SIGSTOPped after the first commit (the
    coordinator's Directory driven in-process, answers kept 0.3 s instead of 30 s)."""
    stock = participant(running, tmp_path, "stock", Actions())
    pay = participant(running, tmp_path, "pay", Actions())
    registry = procs.eda("eda-registry", "serve", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*")
    endpoint = registry.wait_stderr(r"listening on (tcp://\S+)").group(1)
    for name, part in (("stock", stock), ("pay", pay)):
        procs.eda(
            "eda-registry", "register", "-v", f"txn-{name}", "--port",
            part.endpoint.rpartition(":")[2], "--host", "127.0.0.1", "--registry", endpoint,
            "--no-mdns",
        ).wait_stderr("registered")  # fmt: skip
    directory = Directory(
        access=Access(registries=(endpoint,), mdns=False, timeout=0.3), ttl=0.3, miss_ttl=0.1
    )
    looked: list[str] = []
    find = directory.lookups.find
    directory.lookups.find = lambda name: looked.append(name) or find(name)
    coord = running(lambda: Coordinator("c1", tmp_path, directory=directory))
    a = asker(coord.endpoint)
    assert a.wait(a.send(commit(["stock", "pay"])))["outcome"] == "committed"
    os.kill(registry.popen.pid, signal.SIGSTOP)
    try:
        outcomes = []
        failed = directory.lookups.failed
        while not ("stock" in failed and "pay" in failed and looked.count("stock") >= 4):
            reply = a.wait(a.send(commit(["stock", "pay"])), 10)
            outcomes.append((reply["outcome"], reply["reason"]))
        assert set(outcomes) == {("committed", "")}, outcomes
        ghost = a.wait(a.send(commit(["ghost"])), 10)
        assert ghost["outcome"] == "aborted" and "could not be looked up" in ghost["reason"], ghost
        assert "no registry answered" in ghost["reason"]
    finally:
        os.kill(registry.popen.pid, signal.SIGCONT)


# -- dead, vanishing and failing peers ----------------------------------------------------------
class FakeParticipant:
    """A ROUTER that votes yes to every prepare and then never answers again."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.decides = 0
        self.answer_prepares = True
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            replies = []
            for frame in frames:
                msg = json.loads(frame)
                if msg["op"] == "prepare" and self.answer_prepares:
                    replies.append(json.dumps({"rid": msg["rid"], "ok": True, "vote": "yes"}))
                elif msg["op"] == "decide":
                    self.decides += 1
            if replies:
                self.sock.send_multipart([identity, *(r.encode() for r in replies)])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def fake() -> Iterator[FakeParticipant]:
    f = FakeParticipant()
    yield f
    f.close()


def test_a_participant_that_votes_yes_then_vanishes_does_not_hang_the_coordinator(
    running: Any, asker: Any, fake: FakeParticipant, tmp_path: Path
) -> None:
    """The commit is answered at once; phase two goes on in the background, with
    backoff, and status shows the transaction committing, not done."""
    stock = participant(running, tmp_path, "stock", Actions())
    peers = {"gone": fake.endpoint, "stock": stock.endpoint}
    coord = running(lambda: Coordinator("c1", tmp_path, directory=Directory(peers), retry_max=0.2))
    a = asker(coord.endpoint)
    reply = a.wait(a.send(commit(["gone", "stock"])))  # "gone" never acknowledges: not waited for
    assert reply["outcome"] == "committed"
    wait_until(lambda: fake.decides >= 4, 5, "phase two to be retried")
    rows, _ = twopc(tmp_path)
    assert [(r["txn"], r["state"]) for r in rows] == [(reply["txn"], "committing")]
    assert rows[0]["participants"] == {"gone": "unknown", "stock": "committed"}
    assert coord.daemon.stats({})["active"] == 1
    again = a.wait(a.send(commit(["stock"])))  # and the coordinator serves on meanwhile
    assert again["outcome"] == "committed"


def test_a_client_that_vanishes_mid_commit_does_not_stop_the_transaction(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    gate = threading.Event()
    actions = Actions(fail=lambda c: c.phase == "prepare" and not gate.wait(5))
    stock = participant(running, tmp_path, "stock", actions)
    coord = running(
        lambda: Coordinator("c1", tmp_path, directory=Directory({"stock": stock.endpoint}))
    )
    gone = asker(coord.endpoint)
    gone.send(commit(["stock"]))
    wait_until(lambda: actions.count("prepare") == 1, 5, "the prepare to start")
    gone.close()  # the client dies while the participant prepares
    gate.set()
    wait_until(lambda: [r["state"] for r in twopc(tmp_path)[0]] == ["committed"], 5)
    a = asker(coord.endpoint)
    assert a.wait(a.send(commit(["stock"])))["outcome"] == "committed"


def test_a_commit_action_failing_forever_is_retried_with_backoff_and_never_done(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    """The coordinator asks again every 20 ms; the participant runs the failing
    commit on its own backoff only (it used to run it at every ask), shows it
    in status with the error, and neither side marks the transaction done."""
    actions = Actions(fail=lambda c: c.phase == "commit")
    stock = participant(running, tmp_path, "stock", actions)
    coord = running(
        lambda: Coordinator(
            "c1", tmp_path, directory=Directory({"stock": stock.endpoint}), retry_max=0.02
        )
    )
    a = asker(coord.endpoint)
    reply = a.wait(a.send(commit(["stock"])))
    assert reply["outcome"] == "committed"
    wait_until(lambda: actions.count("commit") >= 4, 30, "four commit attempts")
    commits = [(c, t) for c, t in zip(actions.calls, actions.times, strict=True) if c.phase == "commit"]
    attempts = len(commits)
    assert [c.attempt for c, _ in commits] == list(range(1, attempts + 1))
    # the participant's own backoff (0.1 s, 0.2 s, 0.4 s...) spaces the attempts, not the
    # coordinator's asks every 20 ms: lower bounds, which a loaded machine only widens
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(commits[:4])]
    assert all(gap >= 0.09 * 2**k for k, gap in enumerate(gaps)), gaps
    rows, _ = twopc(tmp_path)
    assert rows[0]["state"] == "committing" and rows[0]["participants"] == {"stock": "committing"}
    assert any("commit failing: refused" in n for n in rows[0]["notes"]), rows[0]
    assert coord.daemon.stats({})["active"] == 1
    actions.fail = lambda _c: False  # repaired: the next try succeeds, and both finish
    wait_until(lambda: twopc(tmp_path)[0][0]["state"] == "committed", 10)
    wait_until(lambda: coord.daemon.stats({})["active"] == 0, 5)


# -- forged, duplicate and unknown ids ----------------------------------------------------------
def test_two_ids_made_in_the_same_millisecond_with_the_same_randomness_stay_distinct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that went back can repeat an id; a new transaction never takes an active one's."""
    ids = iter(["c1.0000000000a000001", "c1.0000000000a000001", "c1.0000000000a000002"])
    monkeypatch.setattr(coordinator_module, "new_txn_id", lambda _name: next(ids))
    coord = Coordinator("c1", tmp_path, directory=Directory({"a": "tcp://127.0.0.1:9"}))
    try:
        first = coord.begin(["a"], "{}", 5, lambda _r: None)
        second = coord.begin(["a"], "{}", 5, lambda _r: None)
        assert first.id != second.id and set(coord.active) == {first.id, second.id}
    finally:
        coord.close()


def test_a_decide_for_an_unknown_transaction(running: Any, tmp_path: Path) -> None:
    """commit: refused (never prepared here); abort: the abort action runs once (a
    prepare cut short by a crash may have run), a repeat changes nothing."""
    actions = Actions()
    stock = participant(running, tmp_path, "stock", actions)
    client = Client([stock.endpoint], timeout=5)
    try:
        with pytest.raises(Exception, match="never prepared"):
            client.request({"op": "decide", "txn": "evil.0123456789abcdef0", "outcome": "commit"})
        for _ in range(2):
            reply = client.request(
                {"op": "decide", "txn": "evil.00000000000000001", "outcome": "abort"}
            )
            assert reply["done"] is True
        assert actions.count("abort") == 1 and actions.count("commit") == 0
        again = client.request(  # a prepare with a forged id of the same txn: no, nothing run
            {"op": "prepare", "txn": "evil.00000000000000001", "coordinator": "evil",
             "reply_to": "tcp://127.0.0.1:9", "data": {}}
        )  # fmt: skip
        assert again["vote"] == "no" and actions.count("prepare") == 0
        with pytest.raises(Exception, match="does not belong to coordinator evil"):
            client.request(  # another coordinator's id: its inquiries would go astray
                {"op": "prepare", "txn": "c1.00000000000000005", "coordinator": "evil",
                 "reply_to": "tcp://127.0.0.1:9", "data": {}}
            )  # fmt: skip
        assert actions.count("prepare") == 0
    finally:
        client.close()


# -- floods and bad data ------------------------------------------------------------------------
def test_a_flood_of_commits_is_bounded_and_answered(
    running: Any, asker: Any, fake: FakeParticipant, tmp_path: Path
) -> None:
    fake.answer_prepares = False  # every transaction waits for votes that never come
    coord = running(
        lambda: Coordinator(
            "c1", tmp_path, directory=Directory({"mute": fake.endpoint}), max_active=20,
            vote_timeout=30,
        )
    )  # fmt: skip
    a = asker(coord.endpoint)
    rids = [a.send(commit(["mute"])) for _ in range(60)]
    busy = [a.wait(rid) for rid in rids[20:]]  # answered at once, not after 30 s
    assert all(r["ok"] is False and "busy" in r["error"] for r in busy), busy[:2]
    assert coord.daemon.stats({})["active"] == 20


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"x": "\u00e9" * 20000}, "over 32768"),  # 20,000 characters, 40,000 bytes
        ({"x": "\u4e00" * 30000}, "over 32768"),  # a frame of 90 kB: used to drop the connection
        ("LONE", "lone surrogate"),
    ],
    ids=["two-byte", "three-byte", "surrogate"],
)
def test_data_too_big_or_not_utf8_is_refused_with_a_reply(
    running: Any, asker: Any, tmp_path: Path, data: Any, why: str
) -> None:
    coord = running(
        lambda: Coordinator("c1", tmp_path, directory=Directory({"a": "tcp://127.0.0.1:9"}))
    )
    a = asker(coord.endpoint)
    if data == "LONE":
        a.send_raw(b'{"op":"commit","rid":7,"participants":["a"],"data":{"x":"\\ud800"}}')
        a.rid = 7
        reply = a.wait(7)
    else:
        reply = a.wait(a.send(commit(["a"], data)))
    assert reply["ok"] is False and why in reply["error"], reply
    assert coord.daemon.voting == 0 and not coord.daemon.active


def test_nul_and_unicode_in_data_reach_the_actions_intact(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    actions = Actions()
    stock = participant(running, tmp_path, "stock", actions)
    coord = running(
        lambda: Coordinator("c1", tmp_path, directory=Directory({"stock": stock.endpoint}))
    )
    a = asker(coord.endpoint)
    data = {"note": "a\u0000b\n\u2028\U0001f600", "big": "x" * (MAX_DATA - 100)}
    assert a.wait(a.send(commit(["stock"], data)))["outcome"] == "committed"
    wait_until(lambda: len(actions.calls) == 2, 5, "the commit action")
    assert [(c.phase, c.data) for c in actions.calls] == [("prepare", data), ("commit", data)]


def test_a_clock_jump_neither_aborts_early_nor_breaks_ids(
    running: Any, asker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wall-clock jumps (a day back, a day ahead) between transactions: deadlines
    run on the monotonic clock, ids stay unique, outcomes stay right."""
    actions = Actions()
    stock = participant(running, tmp_path, "stock", actions)
    coord = running(
        lambda: Coordinator(
            "c1", tmp_path, directory=Directory({"stock": stock.endpoint}), vote_timeout=2
        )
    )
    a = asker(coord.endpoint)
    real = time.time
    txns = []
    for jump in (0, -86400, 86400, -86400):
        monkeypatch.setattr(time, "time", lambda j=jump: real() + j)
        reply = a.wait(a.send(commit(["stock"])))
        assert reply["outcome"] == "committed", reply
        txns.append(reply["txn"])
    assert len(set(txns)) == 4
    wait_until(lambda: coord.daemon.stats({})["active"] == 0, 5)


# -- the command line ---------------------------------------------------------------------------
def test_cli_commit_refuses_bad_data_and_an_unreachable_coordinator_fast_and_status_exits_3(
    tmp_path: Path,
) -> None:
    dead = "tcp://127.0.0.1:9"
    base = ("commit", "--no-mdns", "--coordinator", dead, "-p", "stock")
    gone = run("eda-txn", *base, "--data", "{}")
    # refused at once by the TCP probe (the 30 s of --wait would say "no answer ... within")
    assert gone.returncode == 4 and "cannot reach the coordinator" in gone.stderr, gone
    assert "nothing was committed" in gone.stderr and "no answer" not in gone.stderr
    big = run("eda-txn", *base, "--data", json.dumps({"x": "y" * 40000}))
    assert big.returncode == 2 and "over 32768" in big.stderr, big.stderr
    assert len(big.stderr.strip().splitlines()) <= 3  # a usage line, not a traceback
    raw = run("eda-txn", *base, "--data", "-", input=b'{"x": "\xff\xfe"}')
    assert raw.returncode == 2 and "not UTF-8" in raw.stderr, raw.stderr
    unknown = run("eda-txn", "status", "--log", str(tmp_path), "c1.00000000000000001")
    assert unknown.returncode == 3 and "no transaction or saga" in unknown.stderr
    txn = "c1.00000000000000002"  # in doubt at a participant that is not running
    (tmp_path / "participant-stock.jsonl").write_text(
        json.dumps({"participant": "stock", "endpoint": dead}) + "\n"
        + json.dumps({"txn": txn, "state": "prepared", "coordinator": "c1"}) + "\n"
    )  # fmt: skip
    stuck = run("eda-txn", "resolve", "--no-mdns", "--log", str(tmp_path), txn, "--abort")
    # refused by the TCP probe, not a request to nobody waited out
    assert stuck.returncode == 1 and "nothing listens at tcp://127.0.0.1:9" in stuck.stderr


def test_prepares_with_made_up_reply_to_endpoints_cannot_use_up_sockets(
    tmp_path: Path,
) -> None:
    """Each in-doubt transaction asks the endpoint its prepare named: a flood of
    made-up endpoints keeps at most MAX_PEERS sockets open (least recently used closed)."""
    part = Participant("stock", Actions(), tmp_path, inquire_after=0.01, max_live=10_000)
    part.in_doubt.peers.max_peers = 8
    try:
        for i in range(40):
            part.prepare(
                {"txn": f"evil.{i:017x}", "coordinator": "evil", "data": {},
                 "reply_to": f"tcp://127.0.0.1:{20000 + i}"}
            )  # fmt: skip
        time.sleep(0.02)
        part._tick()  # every one in doubt: each asks its coordinator
        assert len(part.in_doubt.asking) == 40
        assert len(part.in_doubt.peers.by_endpoint) == 8 and len(part._sockets) <= 8 + 2
    finally:
        part.close()


def test_a_flood_of_prepares_is_refused_beyond_max_live_without_running_the_action(
    running: Any, tmp_path: Path
) -> None:
    actions = Actions()
    stock = running(lambda: Participant("stock", actions, tmp_path, max_live=5, **FAST))  # type: ignore[arg-type]
    client = Client([stock.endpoint], timeout=5)
    try:
        prepare = {
            "op": "prepare",
            "coordinator": "c1",
            "reply_to": "tcp://127.0.0.1:9",
            "data": {},
        }
        for i in range(5):
            assert client.request({**prepare, "txn": f"c1.{i:017x}"})["vote"] == "yes"
        with pytest.raises(Exception, match="busy: 5 transactions unfinished"):
            client.request({**prepare, "txn": "c1.00000000000000099"})
        assert actions.count("prepare") == 5
        assert client.request({"op": "decide", "txn": "c1.00000000000000000", "outcome": "abort"})[
            "done"
        ]  # one finished: room for one more
        assert client.request({**prepare, "txn": "c1.00000000000000099"})["vote"] == "yes"
    finally:
        client.close()


def test_forged_prepares_naming_a_made_up_coordinator_are_bounded_and_resolved_at_once(
    running: Any, tmp_path: Path
) -> None:
    """Well-formed prepares naming coordinator 'ghost' (nobody answers at its endpoint):
    at most max_per_coordinator of them run the prepare action; real coordinators are
    served on, across a restart too; they stay in doubt (a coordinator that does not
    answer may be down: nothing proves it never decided), and one `resolve` with a
    filter aborts them all."""
    actions = Actions()

    def make() -> Participant:
        return Participant(
            "stock", actions, tmp_path, max_live=100, max_per_coordinator=20,  # type: ignore[arg-type]
            inquire_after=0.1, inquire_timeout=0.1,
        )  # fmt: skip

    def prepare(txn: str) -> dict[str, Any]:
        coordinator = txn.partition(".")[0]
        return {"op": "prepare", "txn": txn, "coordinator": coordinator,
                "reply_to": "tcp://127.0.0.1:9", "data": {}}  # fmt: skip

    stock = running(make)
    client = Client([stock.endpoint], timeout=5)
    try:
        votes = []
        for i in range(50):
            try:
                votes.append(client.request(prepare(f"ghost.{i:017x}"))["vote"])
            except Exception as exc:
                votes.append(str(exc))
        assert votes[:20] == ["yes"] * 20
        assert all("busy: 20 transactions of coordinator ghost" in v for v in votes[20:]), votes
        assert actions.count("prepare") == 20
        assert client.request(prepare("c1.00000000000000001"))["vote"] == "yes"  # served on
    finally:
        client.close()
    stock.stop()
    stock = running(make)  # a restart: the bound holds, real coordinators are still served
    client = Client([stock.endpoint], timeout=5)
    try:
        with pytest.raises(Exception, match="busy: 20 transactions of coordinator ghost"):
            client.request(prepare("ghost.000000000000000ff"))
        assert client.request(prepare("c2.00000000000000001"))["vote"] == "yes"
    finally:
        client.close()
    part = stock.daemon
    # nobody answers for ghost: each asked, none presumed aborted on that account
    wait_until(lambda: all(part.txns[f"ghost.{i:017x}"].get("in_doubt") for i in range(20)), 10)
    assert {r["state"] for t, r in list(part.txns.items()) if t.startswith("ghost.")} == {
        "prepared"
    }
    resolved = run("eda-txn", "resolve", "--abort", "--coordinator", "ghost", "--log",
                   str(tmp_path), "--no-mdns", "--json")  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr
    rows = [json.loads(line) for line in resolved.stdout.splitlines()]
    assert sorted(r["txn"] for r in rows) == [f"ghost.{i:017x}" for i in range(20)]
    assert {(r["participant"], r["state"]) for r in rows} == {("stock", "heuristic-abort")}
    assert actions.count("abort") == 20
    assert part.txns["c1.00000000000000001"]["state"] == "prepared"  # not selected: untouched
    again = run("eda-txn", "resolve", "--abort", "--coordinator", "ghost", "--log",
                str(tmp_path), "--no-mdns")  # fmt: skip
    assert again.returncode == 3, again.stderr
    client = Client([stock.endpoint], timeout=5)
    try:  # settled here: ghost's share is free again
        assert client.request(prepare("ghost.000000000000000ff"))["vote"] == "yes"
    finally:
        client.close()
    usage = run("eda-txn", "resolve", "--abort", "--log", str(tmp_path), "--no-mdns")
    assert usage.returncode == 2 and "--coordinator" in usage.stderr


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["coordinator", "older_than", "unanswered", "limit", "txn", "x"]),
        JSONISH,
        max_size=5,
    )
)
def test_a_resolve_filter_from_a_peer_is_valid_or_refused(req: dict[str, Any]) -> None:
    """Whatever a resolve request carries, the filter is in range or refused as one error."""
    try:
        where = Filter.from_request(req)
    except EdaError:
        return
    assert where.coordinator is None or NAME_RE.fullmatch(where.coordinator)
    assert where.older_than is None or 0 <= where.older_than <= 10 * 365 * 86400
    assert isinstance(where.unanswered, bool) and 1 <= where.limit <= MAX_RESOLVE
    assert where.coordinator is not None or where.older_than is not None or where.unanswered


def test_bad_resolve_filters_are_refused_and_change_nothing(running: Any, tmp_path: Path) -> None:
    actions = Actions()
    stock = participant(running, tmp_path, "stock", actions)
    client = Client([stock.endpoint], timeout=5)
    try:
        msg = {"op": "prepare", "txn": "c1.00000000000000001", "coordinator": "c1",
               "reply_to": "tcp://127.0.0.1:9", "data": {}}  # fmt: skip
        assert client.request(msg)["vote"] == "yes"
        for bad in ({}, {"coordinator": "a b"}, {"older_than": -1}, {"older_than": True},
                    {"older_than": float("inf")}, {"unanswered": "yes"},
                    {"coordinator": "c1", "limit": 0}, {"coordinator": "c1", "limit": 10**6}):  # fmt: skip
            with pytest.raises(EdaError):
                client.request({"op": "resolve", "outcome": "abort", **bad})
        assert actions.count("abort") == 0
        assert client.request({"op": "stats"})["states"] == {"prepared": 1}
    finally:
        client.close()


def test_a_participant_presumes_abort_only_on_the_word_of_the_coordinator_named(
    running: Any, tmp_path: Path
) -> None:
    """In doubt, a participant aborts on its own only when the coordinator that made
    the id says it never decided it -- even when another coordinator sits at the
    endpoint the prepare gave (found again by name).  Another coordinator's word, a
    dead endpoint or a name discovery does not find leave it in doubt."""
    c1 = running(lambda: Coordinator("c1", tmp_path / "c1", directory=Directory({})))
    c2 = running(lambda: Coordinator("c2", tmp_path / "c2", directory=Directory({})))
    actions = Actions()

    def find(name: str) -> list[str]:
        return [c1.endpoint] if name == "c1" else []

    stock = running(
        lambda: Participant("stock", actions, tmp_path, find_coordinator=find, **FAST)  # type: ignore[arg-type]
    )
    cases = {
        "c1.00000000000000001": c1.endpoint,  # its coordinator never knew it: presumed abort
        "c1.00000000000000002": c2.endpoint,  # c2 answers there; c1, found by name, presumes
        "ghost.00000000000000003": c2.endpoint,  # c2 answers "not mine"; no ghost is found
        "c3.00000000000000004": "tcp://127.0.0.1:9",  # nothing answers: c3 may be down
    }
    client = Client([stock.endpoint], timeout=5)
    try:
        for txn, reply_to in cases.items():
            msg = {"op": "prepare", "txn": txn, "coordinator": txn.partition(".")[0],
                   "reply_to": reply_to, "data": {}}  # fmt: skip
            assert client.request(msg)["vote"] == "yes"
    finally:
        client.close()
    part = stock.daemon

    def state(txn: str) -> Any:
        record = part._known(txn)
        return record and record.get("state")

    wait_until(lambda: state("c1.00000000000000001") == "aborted", 10, "presumed abort")
    wait_until(lambda: state("c1.00000000000000002") == "aborted", 10, "c1 found by name")
    for txn in ("ghost.00000000000000003", "c3.00000000000000004"):
        wait_until(lambda t=txn: part.txns[t].get("in_doubt"), 10, f"{txn} noted in doubt")
        assert state(txn) == "prepared"
    assert actions.count("abort") == 2


def test_a_reason_with_newlines_and_escapes_cannot_forge_output_lines(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    """A participant's reason (an agent's, a command's output) is escaped at the
    participant and again at the coordinator: one line, no terminal control."""
    forged = 'declined\n{"txn":"c1.x","outcome":"committed"}\r\x1b[2J\x00'
    stock = participant(running, tmp_path, "stock", Actions(fail=lambda c: c.phase == "prepare"))
    stock.daemon.actions.run = lambda call: Result(call.phase != "prepare", forged)
    coord = running(
        lambda: Coordinator("c1", tmp_path, directory=Directory({"stock": stock.endpoint}))
    )
    a = asker(coord.endpoint)
    reply = a.wait(a.send(commit(["stock"])))
    assert reply["outcome"] == "aborted"
    assert reply["reason"].isprintable(), reply["reason"]
    assert reply["reason"].startswith("stock voted no: declined\\n{")
    assert "\\x1b[2J" in reply["reason"]


def test_status_is_a_table_on_a_terminal_and_json_lines_when_piped(tmp_path: Path) -> None:
    import os
    import pty
    import subprocess

    from tests.helpers import command

    ok, failing = "c1.1a21fe53c674348e1", "c1.1a21fe540861f6694"
    (tmp_path / "coordinator-c1.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"txn": ok, "participants": {"stock": "tcp://h:1"}, "time": 1.0, "state": "committed"},
                {"txn": ok, "state": "done", "outcome": "committed"},
                {"txn": failing, "participants": {"stock": "tcp://h:1"}, "time": 2.0, "state": "committed"},
            ]
        )
    )  # fmt: skip
    (tmp_path / "participant-stock.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"txn": ok, "state": "committed", "time": 1.0},
                {"txn": failing, "state": "committing", "error": "commit exited 1", "time": 2.0},
            ]
        )
    )  # fmt: skip
    piped = run("eda-txn", "status", "--log", str(tmp_path))
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [(r["txn"], r["state"]) for r in rows] == [(ok, "committed"), (failing, "committing")]
    assert rows[1]["notes"] == ["stock: commit failing: commit exited 1"]
    one = run("eda-txn", "status", "--log", str(tmp_path), failing)
    assert one.returncode == 0 and json.loads(one.stdout)["txn"] == failing
    main, child = pty.openpty()
    proc = subprocess.Popen(
        command("eda-txn", "status", "--log", str(tmp_path)),
        stdout=child, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    os.close(child)
    out = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(20) == 0
    text = out.decode(errors="replace")
    assert "ID" in text and "STATE" in text and "committing" in text, text
    assert "commit failing: commit exited 1" in text and "{" not in text


def test_a_reply_to_zmq_cannot_connect_to_is_refused_and_cannot_break_the_inquiries(
    tmp_path: Path,
) -> None:
    """'tcp://a b:1' passes as an endpoint but zmq refuses to connect to it: it
    used to raise in every tick (leaking a socket each time) and stop the
    inquiries of the transactions after it."""
    from eda.core.errors import EdaError

    bad, good = "c1.00000000000000001", "c1.00000000000000002"
    (tmp_path / "participant-stock.jsonl").write_text(
        "".join(
            json.dumps({"txn": t, "state": "prepared", "coordinator": "c1", "reply_to": e,
                        "data": {}}) + "\n"
            for t, e in [(bad, "tcp://a b:1"), (good, "tcp://127.0.0.1:9")]
        )
    )  # fmt: skip
    part = Participant("stock", Actions(), tmp_path, inquire_after=0.01, inquire_timeout=0.01)
    try:
        with pytest.raises(EdaError, match="bad coordinator endpoint"):
            part.prepare(
                {"txn": "c1.00000000000000003", "coordinator": "c1", "data": {},
                 "reply_to": "tcp://a b:1"}
            )  # fmt: skip
        sockets = len(part._sockets)
        for _ in range(5):
            time.sleep(0.02)
            part._tick()
        assert good in part.in_doubt.asking and len(part._sockets) == sockets + 1  # the good one's peer
    finally:
        part.close()


def test_a_malformed_explicit_participant_endpoint_is_refused_at_the_edge(
    running: Any, asker: Any, tmp_path: Path
) -> None:
    """'tcp://a b:1' used to pass the loose text check and be refused by ZeroMQ
    at the first prepare (a no vote); parsed as an Endpoint, it is refused where
    it is given: a one-line usage error naming the option, and nothing starts."""
    from eda.core.errors import UsageError
    from eda.core.txn.directory import parse_peers

    with pytest.raises(UsageError, match=r"^bad peer odd endpoint 'tcp://a b:1'"):
        Directory({"odd": "tcp://a b:1"})
    with pytest.raises(UsageError, match=r"^bad --peer odd endpoint 'tcp://a b:1'"):
        parse_peers(["odd=tcp://a b:1"])
    assert parse_peers(["v6=tcp://[::1]:7741"])["v6"].zmq == "tcp://[::1]:7741"
    stock = participant(running, tmp_path, "stock", Actions())
    coord = running(lambda: Coordinator("c1", tmp_path, directory=Directory({"stock": stock.endpoint})))
    a = asker(coord.endpoint)
    assert a.wait(a.send(commit(["stock"])))["outcome"] == "committed"
    wait_until(lambda: coord.daemon.stats({})["active"] == 0, 5)
    for bad in ("odd=tcp://a b:1", "odd=tcp://h:0", "odd=tcp://*:1", "odd=h:99999"):
        done = run("eda-txn", "coordinator", "--no-mdns", "--log", str(tmp_path), "--peer", bad)
        assert done.returncode == 2, (bad, done)
        assert done.stderr.count("\n") == 1 and "--peer odd endpoint" in done.stderr, done.stderr


def test_a_persistent_agent_that_stops_reading_cannot_block_the_participant(
    tmp_path: Path,
) -> None:
    """Requests bigger than the pipe to an agent that never reads: the write used
    to block the daemon forever; now it fails after the action timeout."""
    from eda.core.txn.actions import PersistentAgent

    agent = PersistentAgent("stock", ["sleep", "30"], timeout=0.5)
    agent.start()
    results: list[Result] = []
    calls = [Call("prepare", f"c1.{i:017x}", {"x": "y" * 30000}, 1) for i in range(4)]
    worker = threading.Thread(target=lambda: results.extend(agent.run_many(calls)), daemon=True)
    try:
        worker.start()
        worker.join(30)  # a deadline: the agent's own sleep (30 s) would block it longer
        assert not worker.is_alive(), "run_many blocked on a full pipe"
        assert [r.ok for r in results] == [False] * 4
        assert "did not read its requests within 0.5s" in results[0].reason
    finally:
        if agent.proc is not None:  # the restarted agent does not read either: no grace
            agent.proc.kill()
        agent.close()
