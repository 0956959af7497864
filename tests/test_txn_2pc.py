"""eda-txn two-phase commit: outcomes, crashes at every point, in-doubt and resolve, bad input.

The daemons run in forked children of the test process (no interpreter to
start: a crash scenario costs a fork), each in its own session, so a crash
point's SIGKILL ends exactly one of them, and a restart is another fork on
the same port with the same journal.  The CLI is run as a process where the
command itself is under test (commit's exit status, status, resolve).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from eda.core.daemon import Daemon
from eda.core.errors import NotFoundError
from eda.core.reqrep import Client, Unavailable
from eda.core.txn import crash
from eda.core.txn.actions import PersistentAgent, ShellActions
from eda.core.txn.coordinator import Coordinator
from eda.core.txn.coordinator import journal_path as coordinator_journal
from eda.core.txn.directory import Directory
from eda.core.txn.journal import read
from eda.core.txn.participant import Participant, replay
from eda.core.txn.participant import journal_path as participant_journal
from eda.core.txn.transaction import Txn
from tests import helpers
from tests.helpers import run, wait_until

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")

FAST = {"inquire_after": 0.2, "inquire_timeout": 0.3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session(sid: int) -> list[int]:
    """The processes of session *sid*."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
                found.append(int(entry))
    return found


class Forked:
    """A daemon made by *make* in a forked child, in its own session."""

    def __init__(self, make: Callable[[], Daemon], env: dict[str, str], errors: Path) -> None:
        self.errors = errors
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 0
            try:
                os.close(read_end)
                os.setsid()
                os.environ.pop("EDA_CRASH_AT", None)
                os.environ.update(env)
                crash._seen.clear()
                daemon = make()
                os.write(write_end, b"ready\n")
                daemon.serve()
            except BaseException:
                with open(errors, "a") as f:
                    f.write(traceback.format_exc())
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        self.pid = pid
        with os.fdopen(read_end, "rb") as f:
            ready = f.readline()
        assert ready == b"ready\n", (
            f"daemon did not start: {errors.read_text() if errors.exists() else ''}"
        )
        self.status: int | None = None

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is None

    def kill(self) -> None:
        """Power off: the daemon and every process of its session (running actions too)."""
        if self.alive():
            for pid in session(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _, self.status = os.waitpid(self.pid, 0)

    def crashed(self) -> bool:
        return not self.alive() and os.WIFSIGNALED(self.status or 0)


def shell_actions(work: Path, name: str) -> ShellActions:
    """Record every action in NAME.log; prepare votes no when the data says {"no": NAME}."""
    log = work / f"{name}.log"
    return ShellActions(
        name,
        {
            "prepare": f'grep -q \'"no": "{name}"\' && exit 1; echo prepare $EDA_TXN_ID >> {log}',
            "commit": f"echo commit $EDA_TXN_ID $EDA_ATTEMPT >> {log}",
            "abort": f"echo abort $EDA_TXN_ID >> {log}",
        },
        timeout=5,
    )


class Cluster:
    """A coordinator and participants, each a forked daemon on a port of its own."""

    def __init__(self, work: Path, names: list[str], vote_timeout: float = 0.6) -> None:
        self.work = work
        self.log = work / "txn"
        self.names = names
        self.vote_timeout = vote_timeout
        self.ports = {n: free_port() for n in ["coordinator", *names]}
        self.procs: dict[str, Forked] = {}
        self.actions: dict[str, Callable[[], Any]] = {n: self._shell(n) for n in names}

    def _shell(self, name: str) -> Callable[[], Any]:
        return lambda: shell_actions(self.work, name)

    def endpoint(self, name: str) -> str:
        if name not in self.ports:
            self.ports[name] = free_port()
        return f"tcp://127.0.0.1:{self.ports[name]}"

    @staticmethod
    def coordinator_name(name: str) -> str:
        """'coordinator' is c1; 'coordinator-c2' is c2."""
        return name.partition("-")[2] or "c1"

    def start(self, name: str, crash_at: str = "") -> Forked:
        env = {"EDA_CRASH_AT": crash_at} if crash_at else {}
        errors = self.work / f"{name}.errors"

        def warn(message: str) -> None:
            with open(self.work / f"{name}.warnings", "a") as f:
                f.write(message + "\n")

        make: Callable[[], Daemon]
        endpoint = self.endpoint(name)  # chosen here: the child must not pick its own
        if name.startswith("coordinator"):
            peers = {n: self.endpoint(n) for n in self.names}
            make = lambda: Coordinator(  # noqa: E731
                self.coordinator_name(name), self.log, directory=Directory(peers), bind=endpoint,
                vote_timeout=self.vote_timeout, retry_max=0.3, warn=warn,
            )  # fmt: skip
        else:
            make = lambda: Participant(  # noqa: E731
                name, self.actions[name](), self.log, bind=endpoint, warn=warn, **FAST
            )
        self.procs[name] = Forked(make, env, errors)
        return self.procs[name]

    def start_all(self, crash_at: dict[str, str] | None = None) -> None:
        for name in [*self.names, "coordinator"]:
            self.start(name, (crash_at or {}).get(name, ""))

    def restart_dead(self) -> None:
        for name, proc in list(self.procs.items()):
            if not proc.alive():
                self.start(name)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()

    def commit(
        self,
        data: dict[str, Any],
        names: list[str] | None = None,
        wait: float = 5.0,
        via: str = "coordinator",
    ) -> dict[str, Any]:
        client = Client([self.endpoint(via)], timeout=wait)
        try:
            return client.request(
                {"op": "commit", "participants": names or self.names, "data": data}
            )
        finally:
            client.close()

    def states(self, txn: str) -> dict[str, str]:
        return {
            n: replay(list(read(participant_journal(self.log, n))))
            .get(txn, {})
            .get("state", "none")
            for n in self.names
        }

    def coordinator_records(self) -> list[dict[str, Any]]:
        return list(read(coordinator_journal(self.log, "c1")))

    def effects(self, name: str) -> list[str]:
        path = self.work / f"{name}.log"
        return path.read_text().split("\n")[:-1] if path.exists() else []


@pytest.fixture
def cluster(tmp_path: Path, procs: Any) -> Iterator[Cluster]:
    made: list[Cluster] = []

    def make(names: list[str], **kw: Any) -> Cluster:
        c = Cluster(tmp_path, names, **kw)
        made.append(c)
        return c

    yield make  # type: ignore[misc]
    for c in made:
        c.close()


def first_txn(c: Cluster, name: str) -> str | None:
    """The id of the first transaction participant *name* saw, if any."""
    txns = [r["txn"] for r in read(participant_journal(c.log, name)) if "txn" in r]
    return str(txns[0]) if txns else None


def only_txn(c: Cluster, name: str) -> str:
    txn = wait_until(lambda: first_txn(c, name), 5, f"{name} to see a transaction")
    return str(txn)


# -- outcomes -----------------------------------------------------------------------------------
def test_commit_when_all_vote_yes_and_abort_when_one_says_no(cluster: Any) -> None:
    c = cluster(["stock", "pay"])
    c.start_all()
    done = c.commit({"order": 7})
    assert done["outcome"] == "committed" and done["votes"] == {"stock": "yes", "pay": "yes"}
    txn = done["txn"]
    assert txn.startswith("c1.")
    wait_until(lambda: c.states(txn) == {"stock": "committed", "pay": "committed"}, 5)
    assert f"commit {txn} 1" in c.effects("stock") and f"commit {txn} 1" in c.effects("pay")
    decided = [r for r in c.coordinator_records() if r.get("txn") == txn]
    assert decided[0]["state"] == "committed"  # the decision, logged before anyone heard it
    wait_until(
        lambda: any(
            r.get("state") == "done" for r in c.coordinator_records() if r.get("txn") == txn
        ),
        5,
    )

    no = c.commit({"order": 8, "no": "pay"})
    assert no["outcome"] == "aborted" and no["votes"]["pay"] == "no"
    assert "pay voted no" in no["reason"]
    wait_until(lambda: c.states(no["txn"]) == {"stock": "aborted", "pay": "aborted"}, 5)
    assert f"abort {no['txn']}" in c.effects("stock")  # it had prepared: undone
    assert not any(line.startswith(f"commit {no['txn']}") for n in c.names for line in c.effects(n))


def test_no_vote_in_time_aborts_and_a_missing_participant_aborts(
    cluster: Any, tmp_path: Path
) -> None:
    c = cluster(["stock", "slow"], vote_timeout=0.5)
    c.actions["slow"] = lambda: ShellActions("slow", {"prepare": "sleep 3"}, timeout=5)
    c.start_all()
    late = c.commit({"order": 1})
    # aborted by the vote timeout, not after the 3 s prepare: the reason says which
    assert late["outcome"] == "aborted" and "no vote from slow within 0.5s" in late["reason"]
    ghost = c.commit({"order": 2}, names=["stock", "ghost"])
    assert ghost["outcome"] == "aborted" and ghost["reason"] == "participant ghost not found"


def test_a_participant_answering_garbage_votes_no(cluster: Any, tmp_path: Path) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text(
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    req = json.loads(line)\n"
        "    if req['op'] == 'prepare' and req['data'].get('garbage'):\n"
        "        print('\\x1b[2J<html>not json', flush=True)\n"
        "    elif req['op'] == 'prepare' and req['data'].get('wrong'):\n"
        "        print(json.dumps({'vote': 'yes', 'txn': 'c1.0000'}), flush=True)\n"
        "    elif req['op'] == 'prepare' and req['data'].get('silent'):\n"
        "        pass\n"
        "    elif req['op'] == 'prepare':\n"
        "        print(json.dumps({'vote': 'yes'}), flush=True)\n"
        "    else:\n"
        "        print(json.dumps({'ok': True}), flush=True)\n"
    )
    import sys

    c = cluster(["stock", "pay"], vote_timeout=2.0)
    c.actions["pay"] = lambda: PersistentAgent("pay", [sys.executable, str(agent)], timeout=0.5)
    c.start_all()
    assert c.commit({"n": 1})["outcome"] == "committed"
    for bad in ({"garbage": 1}, {"wrong": 1}, {"silent": 1}):
        reply = c.commit(bad)
        assert reply["outcome"] == "aborted" and reply["votes"]["pay"] == "no", reply
    assert "garbage" in c.commit({"garbage": 1})["reason"]
    assert c.commit({"n": 2})["outcome"] == "committed"  # the restarted agent serves again


# -- the crash matrix -------------------------------------------------------------------------
COORDINATOR_POINTS = [
    "after-prepare-sent",
    "before-decision",
    "after-decision",
    "after-commit-sent",
    "after-abort-sent",  # pay votes no in this one
    "before-done",
]
PARTICIPANT_POINTS = ["before-vote-logged", "after-vote-logged", "before-apply", "before-ack"]
MATRIX = [("coordinator", p) for p in COORDINATOR_POINTS] + [
    (name, p) for name in ("stock", "pay") for p in PARTICIPANT_POINTS
]


@pytest.mark.parametrize(("victim", "point"), MATRIX, ids=[f"{v}:{p}" for v, p in MATRIX])
def test_crash_at_every_point_then_all_participants_agree(
    cluster: Any, victim: str, point: str
) -> None:
    c = cluster(["stock", "pay"], vote_timeout=0.6)
    role = "coordinator" if victim == "coordinator" else "participant"
    c.start_all({victim: f"{role}:{point}"})
    try:
        data = {"order": 7, "no": "pay"} if point == "after-abort-sent" else {"order": 7}
        answered: dict[str, Any] | None = c.commit(data, wait=1.5)
    except Unavailable:
        answered = None  # the coordinator died before answering: the outcome is unknown to us
    wait_until(lambda: c.procs[victim].crashed(), 5, f"{victim} to crash at {point}")
    c.restart_dead()
    txn = first_txn(c, "pay") or first_txn(c, "stock")
    if txn is None:  # killed before its prepare left the process: nothing happened anywhere
        assert point == "after-prepare-sent" and answered is None
        assert not c.coordinator_records()
        return

    def agreed() -> set[str] | None:
        states = set(c.states(txn).values()) - {"none"}
        return states if len(states) == 1 and states <= {"committed", "aborted"} else None

    final = wait_until(agreed, 10, f"participants to agree on {txn}: {c.states(txn)}").pop()
    if answered is not None:  # what the client was told is what happened
        assert answered["outcome"] == final
    decision = [
        r["state"]
        for r in c.coordinator_records()
        if r.get("txn") == txn and r.get("state") in ("committed", "aborted")
    ]
    assert decision in ([final], []), decision  # presumed abort: an abort may be unlogged
    assert decision or final == "aborted"
    if final == "committed":  # every participant's commit ran (perhaps twice: idempotent)
        assert all(any(line.startswith(f"commit {txn}") for line in c.effects(n)) for n in c.names)
    else:
        assert not any(line.startswith(f"commit {txn}") for n in c.names for line in c.effects(n))
    expected = {
        "after-decision": "committed", "after-commit-sent": "committed", "before-done": "committed",
        "before-decision": "aborted", "after-prepare-sent": "aborted", "after-abort-sent": "aborted",
        "before-vote-logged": "aborted", "after-vote-logged": "aborted",
        "before-apply": "committed", "before-ack": "committed",
    }  # fmt: skip
    assert final == expected[point]


def test_several_coordinators_each_own_their_transactions(cluster: Any) -> None:
    c = cluster(["stock", "pay"])
    c.start_all()
    c.start("coordinator-c2", "coordinator:after-decision")
    with pytest.raises(Unavailable):
        c.commit({"order": 2}, via="coordinator-c2", wait=1.0)
    wait_until(c.procs["coordinator-c2"].crashed, 5)
    theirs = only_txn(c, "pay")
    assert theirs.startswith("c2.")
    ours = c.commit({"order": 1})  # c1 serves on, the same participants
    assert ours["outcome"] == "committed" and ours["txn"].startswith("c1.")
    client = Client([c.endpoint("coordinator")], timeout=2)
    with pytest.raises(NotFoundError, match="belongs to another coordinator"):
        client.request({"op": "outcome", "txn": theirs})  # c1 never presumes about c2's
    client.close()
    assert c.states(theirs) == {"stock": "prepared", "pay": "prepared"}  # in doubt: c2 is down
    c.start("coordinator-c2")  # c2 comes back and finishes its own decided transaction
    wait_until(lambda: c.states(theirs) == {"stock": "committed", "pay": "committed"}, 10)
    assert [
        r["txn"] for r in read(coordinator_journal(c.log, "c2")) if r.get("state") == "committed"
    ] == [theirs]


# -- in doubt, resolve, heuristic hazard --------------------------------------------------------
def test_in_doubt_then_resolve_then_a_conflicting_outcome_is_a_heuristic_hazard(
    cluster: Any,
) -> None:
    c = cluster(["stock", "pay"])
    c.start_all({"coordinator": "coordinator:after-decision"})
    with pytest.raises(Unavailable):
        c.commit({"order": 7}, wait=1.0)
    wait_until(c.procs["coordinator"].crashed, 5)
    txn = only_txn(c, "pay")
    # the decision (commit) is durable, but nobody can ask: both participants stay in doubt
    wait_until(lambda: "in-doubt" in run("eda-txn", "status", txn, "--log", str(c.log)).stdout, 10)
    shown = json.loads(run("eda-txn", "status", txn, "--log", str(c.log)).stdout)
    assert shown["state"] == "in-doubt" and shown["participants"] == {
        "stock": "prepared",
        "pay": "prepared",
    }
    assert any("does not answer" in note for note in shown["notes"])
    # an operator aborts it at stock; pay stays in doubt
    resolved = run(
        "eda-txn",
        "resolve",
        txn,
        "--abort",
        "--participant",
        "stock",
        "--log",
        str(c.log),
        "--no-mdns",
    )
    assert resolved.returncode == 0, resolved.stderr
    assert json.loads(resolved.stdout) == {
        "txn": txn,
        "participant": "stock",
        "state": "heuristic-abort",
    }
    assert f"abort {txn}" in c.effects("stock")
    again = run(
        "eda-txn",
        "resolve",
        txn,
        "--abort",
        "--participant",
        "stock",
        "--log",
        str(c.log),
        "--no-mdns",
    )
    assert again.returncode == 1 and "not in doubt" in again.stderr
    # the coordinator comes back and commits: stock reports the hazard, it is not hidden
    c.restart_dead()
    wait_until(lambda: c.states(txn) == {"stock": "hazard", "pay": "committed"}, 10, "hazard")
    status = run("eda-txn", "status", txn, "--log", str(c.log))
    assert status.returncode == 0
    row = json.loads(status.stdout)
    assert row["state"] == "hazard" and row["hazards"] == ["stock"], row
    assert "heuristic hazard" in (c.work / "stock.warnings").read_text()
    wait_until(lambda: any(r.get("hazard") == "stock" for r in c.coordinator_records()), 5)
    missing = run("eda-txn", "status", "c1.0123456789", "--log", str(c.log))
    assert missing.returncode == 3 and "no transaction or saga" in missing.stderr


def test_resolve_consistent_with_the_outcome_is_no_hazard(cluster: Any) -> None:
    c = cluster(["stock", "pay"])
    c.start_all({"coordinator": "coordinator:before-decision"})
    with pytest.raises(Unavailable):
        c.commit({"order": 7}, wait=1.0)
    txn = only_txn(c, "pay")
    resolved = run("eda-txn", "resolve", txn, "--abort", "--log", str(c.log), "--no-mdns")
    assert resolved.returncode == 0, resolved.stderr
    assert {json.loads(line)["participant"] for line in resolved.stdout.splitlines()} == {
        "stock",
        "pay",
    }
    c.restart_dead()  # presumed abort: the same outcome as the operator's
    wait_until(lambda: c.states(txn) == {"stock": "aborted", "pay": "aborted"}, 10)
    assert (
        json.loads(run("eda-txn", "status", txn, "--log", str(c.log)).stdout)["state"] == "aborted"
    )


# -- hostile input ----------------------------------------------------------------------------
HOSTILE: list[list[bytes]] = [
    [b""], [b"\xff\xfe\x00"], [b"[" * 60000], [b"null"], [b"[]"], [b'{"op": 1}'],
    [b'{"op": "commit"}'], [b'{"op": "commit", "participants": "stock"}'],
    [b'{"op": "commit", "participants": [], "data": {}}'],
    [b'{"op": "commit", "participants": ["a", "a"], "data": {}}'],
    [b'{"op": "commit", "participants": ["../x"], "data": {}}'],
    [b'{"op": "commit", "participants": ["stock"], "data": [1]}'],
    [b'{"op": "commit", "participants": ["stock"], "timeout": -1}'],
    [b'{"op": "commit", "participants": ["stock"], "timeout": 1e999}'],
    [b'{"op": "outcome", "txn": "x"}'], [b'{"op": "outcome", "txn": "other.0123abcd"}'],
    [b'{"op": "prepare", "txn": "c1.00aa", "data": {}, "coordinator": "c1", "reply_to": "x"}'],
    [b'{"op": "prepare", "txn": "c1.00aa", "data": {}, "coordinator": "\\u001b[2J"}'],
    [b'{"op": "decide", "txn": "c1.00aa", "outcome": "maybe"}'],
    [b'{"op": "decide", "txn": "c1.00bb", "outcome": "commit"}'],
    [b'{"op": "resolve", "txn": "c1.00cc", "outcome": "commit"}'],
    [b'{"op": "commit", "rid": [1]}'], [b"a", b"b", b"c"], [os.urandom(5000)],
]  # fmt: skip


def test_hostile_frames_are_refused_and_the_daemons_keep_serving(cluster: Any) -> None:
    c = cluster(["stock", "pay"])
    c.start_all()
    ctx = zmq.Context.instance()
    for target in ("coordinator", "stock"):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(c.endpoint(target))
        for frames in HOSTILE:
            sock.send_multipart(frames)
        sock.send_multipart([b"{}"] * 300)  # a batch over the limit: the first 256 answered
        expected = sum(len(frames) for frames in HOSTILE) + 256  # one reply per request (frame)
        replies = []
        while len(replies) < expected and sock.poll(2000):
            replies.append(json.loads(sock.recv()))
        assert not sock.poll(300)  # and nothing more
        sock.close()
        assert len(replies) == expected and all(r["ok"] is False for r in replies), replies
        assert any(r.get("code") == 3 for r in replies)  # e.g. a transaction never prepared
    # a client that connects and never reads, with a burst of requests
    idle = ctx.socket(zmq.DEALER)
    idle.setsockopt(zmq.LINGER, 0)
    idle.connect(c.endpoint("coordinator"))
    for _ in range(2000):
        idle.send(b'{"op": "outcome", "txn": "c1.00aa"}')
    assert c.commit({"after": "attack"})["outcome"] == "committed"
    idle.close()
    assert all(p.alive() for p in c.procs.values())
    assert c.states("c1.00aa") == {"stock": "none", "pay": "none"}  # nothing hostile was recorded
    assert c.coordinator_records() and all(
        r.get("txn", "").startswith("c1.") for r in c.coordinator_records()
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(
                [
                    "op",
                    "txn",
                    "data",
                    "coordinator",
                    "reply_to",
                    "outcome",
                    "rid",
                    "participants",
                    "timeout",
                ]
            ),
            st.one_of(
                st.sampled_from(
                    [
                        "prepare",
                        "decide",
                        "resolve",
                        "commit",
                        "outcome",
                        "c1.00aa",
                        "commit",
                        "abort",
                        "tcp://127.0.0.1:1",
                    ]
                ),
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(),
                st.text(max_size=20),
                st.lists(st.text(max_size=5), max_size=3),
                st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
            ),
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_any_request_gets_one_reply_and_never_breaks_the_participant(
    tmp_path: Path, frame: bytes
) -> None:
    part = Participant(
        "stock", ShellActions("stock", {}), tmp_path / "txn", bind="tcp://127.0.0.1:*"
    )
    try:
        before = dict(part.txns)
        reply = part.service.answer([frame])
        assert isinstance(reply.get("ok"), bool)
        json.dumps(reply)
        if reply["ok"] is False:
            assert part.txns == before and isinstance(reply["error"], str)
    finally:
        part.close()


# -- the journal ------------------------------------------------------------------------------
def test_a_torn_journal_tail_is_cut_and_the_good_records_recovered(
    cluster: Any, tmp_path: Path
) -> None:
    c = cluster(["stock", "pay"])
    c.start_all({"coordinator": "coordinator:after-decision"})
    with pytest.raises(Unavailable):
        c.commit({"order": 7}, wait=1.0)
    txn = only_txn(c, "pay")
    path = coordinator_journal(c.log, "c1")
    good = path.read_bytes()
    path.write_bytes(good + b'{"txn": "c1.00ff", "state": "commi')  # a write cut by the crash
    c.restart_dead()
    wait_until(lambda: c.states(txn) == {"stock": "committed", "pay": "committed"}, 10)
    assert path.read_bytes().startswith(good) and b"c1.00ff" not in path.read_bytes()
    assert "cut a torn tail of" in (c.work / "coordinator.warnings").read_text()
    # damage before good records is refused, never silently dropped
    part = participant_journal(c.log, "pay")
    part.write_bytes(b"garbage\n" + part.read_bytes())
    c.procs["pay"].kill()
    with pytest.raises(AssertionError, match="daemon did not start"):
        c.start("pay")
    assert "CorruptJournal: bad record at line 1" in (c.work / "pay.errors").read_text()


# -- the coordinator's logic as a state machine -------------------------------------------------
class FakeJournalDir:
    """Where the machine keeps its journal: tmpfs when there is one (fsync is the slow part)."""

    path = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


class CoordinatorMachine(RuleBasedStateMachine):
    """Votes, timeouts, acks and crashes in any order; the coordinator's promises hold.

    - it tells a participant "commit" only once the commit record is on disk,
      and only after every participant voted yes;
    - it never tells anyone "commit" and anyone "abort" for one transaction,
      across crashes;
    - its answer to ``outcome`` never contradicts what it told participants;
    - after enough acks, nothing stays undone.
    """

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(dir=FakeJournalDir.path))
        self.sent: list[tuple[str, str, dict[str, Any]]] = []  # (txn, participant, msg)
        self.told: dict[str, set[str]] = {}  # txn -> outcomes sent
        self.votes_pending: list[tuple[str, str, Callable[..., None]]] = []
        self.acks_pending: list[tuple[str, str, Callable[..., None]]] = []
        self.yes: dict[str, set[str]] = {}
        self.coord = self._make()

    def _make(self) -> Coordinator:
        machine = self

        class Fake(Coordinator):
            def ask(self, txn: Txn, name: str, frame: bytes, callback: Callable[..., None]) -> None:
                msg = json.loads(frame)
                if msg["op"] == "prepare":
                    machine.votes_pending.append((txn.id, name, callback))
                else:
                    if msg["outcome"] == "commit":  # durable before anyone hears it
                        on_disk = [
                            r
                            for r in read(coordinator_journal(machine.dir, "c1"))
                            if r.get("txn") == txn.id
                        ]
                        assert any(r.get("state") == "committed" for r in on_disk)
                        assert machine.yes.get(txn.id, set()) >= set(txn.participants)
                    machine.told.setdefault(txn.id, set()).add(msg["outcome"])
                    machine.acks_pending.append((txn.id, name, callback))

        peers = {n: f"tcp://127.0.0.1:{9 + i}" for i, n in enumerate("abc")}
        return Fake("c1", self.dir, directory=Directory(peers), vote_timeout=60)

    @rule(names=st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True))
    def begin(self, names: list[str]) -> None:
        self.coord.begin(names, '{"n": 1}', 60, lambda result: None)

    @precondition(lambda self: self.votes_pending)
    @rule(pick=st.integers(0, 100), vote=st.sampled_from(["yes", "yes", "no", "garbage"]))
    def vote(self, pick: int, vote: str) -> None:
        txn, name, callback = self.votes_pending.pop(pick % len(self.votes_pending))
        if vote == "yes":
            self.yes.setdefault(txn, set()).add(name)
        reply = {"ok": True, "vote": vote} if vote != "garbage" else {"ok": True, "vote": "\x00"}
        callback(reply)

    @rule()
    def turn(self) -> None:  # the end of a poll-loop turn: the group commit runs
        self.coord._run_timers()

    @precondition(lambda self: self.coord.active)
    @rule(pick=st.integers(0, 100))
    def timeout(self, pick: int) -> None:
        txns = list(self.coord.active.values())
        self.coord.expire(txns[pick % len(txns)])

    @precondition(lambda self: self.acks_pending)
    @rule(pick=st.integers(0, 100), ok=st.booleans())
    def ack(self, pick: int, ok: bool) -> None:
        _, _, callback = self.acks_pending.pop(pick % len(self.acks_pending))
        callback({"ok": True, "done": True} if ok else {"ok": False, "error": "busy", "code": 1})

    @rule()
    def retry(self) -> None:
        for txn in self.coord.active.values():
            txn.next_try = 0
        self.coord.retry()

    @rule()
    def crash(self) -> None:
        """SIGKILL: what was not synced is lost; a new coordinator reads the journal."""
        os.close(self.coord.journal._fd)
        self.coord.journal._fd = -1
        self.coord.journal._pending.clear()
        self.coord.journal.close = lambda: None  # type: ignore[method-assign]
        Daemon.close(self.coord)
        self.votes_pending.clear()
        self.acks_pending.clear()
        self.coord = self._make()

    @invariant()
    def never_both(self) -> None:
        for txn, outcomes in self.told.items():
            assert len(outcomes) == 1, (txn, outcomes)

    @invariant()
    def outcome_matches_what_was_told(self) -> None:
        for txn, outcomes in self.told.items():
            answer = self.coord.outcome({"txn": txn})["outcome"]
            assert answer in (*outcomes, "pending"), (txn, answer, outcomes)

    def teardown(self) -> None:
        # deliver everything: every decided transaction finishes
        for _ in range(4):
            self.turn()
            self.retry()
            while self.acks_pending:
                self.ack(0, True)
            while self.votes_pending:
                self.vote(0, "yes")
        self.turn()
        self.retry()
        while self.acks_pending:
            self.ack(0, True)
        assert not [t for t in self.coord.active.values() if t.state != "voting"]
        self.coord.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


TestCoordinatorMachine = CoordinatorMachine.TestCase
TestCoordinatorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- the bank ---------------------------------------------------------------------------------
ACCOUNT = r"""
acct={dir}/{name}; mkdir -p $acct/holds $acct/committed
total() {{ cat $acct/committed/* 2>/dev/null | awk '{{s+=$1}} END {{print s+0}}'; }}
held() {{ cat $acct/holds/* 2>/dev/null | awk '$1<0 {{s+=$1}} END {{print s+0}}'; }}
"""
PREPARE = r"""
read -r line
from=$(echo "$line" | sed 's/.*"from": "\([a-z0-9]*\)".*/\1/')
amount=$(echo "$line" | sed 's/.*"amount": \([0-9]*\).*/\1/')
[ -e $acct/holds/$EDA_TXN_ID ] && exit 0
if [ "$from" = {name} ]; then
  [ $(( $(total) + $(held) - amount )) -ge 0 ] || {{ echo "insufficient funds"; exit 1; }}
  echo -$amount > $acct/holds/$EDA_TXN_ID.tmp
else
  echo $amount > $acct/holds/$EDA_TXN_ID.tmp
fi
mv $acct/holds/$EDA_TXN_ID.tmp $acct/holds/$EDA_TXN_ID
"""
COMMIT = (
    "[ ! -e $acct/holds/$EDA_TXN_ID ] || mv $acct/holds/$EDA_TXN_ID $acct/committed/$EDA_TXN_ID"
)
ABORT = "rm -f $acct/holds/$EDA_TXN_ID"


def account(work: Path, name: str) -> ShellActions:
    head = ACCOUNT.format(dir=work / "bank", name=name)
    return ShellActions(
        name,
        {
            "prepare": head + PREPARE.format(name=name),
            "commit": head + COMMIT,
            "abort": head + ABORT,
        },
        timeout=5,
    )


def balances(work: Path, names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        committed = work / "bank" / name / "committed"
        out[name] = (
            sum(int(p.read_text()) for p in committed.iterdir()) if committed.exists() else 0
        )
    return out


@pytest.mark.long
def test_bank_invariant_under_concurrent_transfers_and_random_kills(
    cluster: Any, tmp_path: Path
) -> None:
    names = ["a1", "a2", "a3", "a4"]
    c = cluster(names, vote_timeout=1.0)
    for name in names:
        c.actions[name] = lambda n=name: account(tmp_path, n)
        (tmp_path / "bank" / name / "committed").mkdir(parents=True)
        (tmp_path / "bank" / name / "committed" / "initial").write_text("100\n")
    c.start_all()
    rng = random.Random(7)
    stop = threading.Event()
    outcomes: dict[str, int] = {"committed": 0, "aborted": 0, "unknown": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            src, dst = r.sample(names, 2)
            data = {"from": src, "to": dst, "amount": r.randint(1, 60)}
            try:
                outcome = c.commit(data, names=[src, dst], wait=2.0)["outcome"]
            except Unavailable:
                outcome = "unknown"
                time.sleep(0.05)
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 0.6))
            victim = rng.choice(["coordinator", *names])
            c.procs[victim].kill()  # power cut, at any point
            time.sleep(rng.uniform(0.0, 0.3))
            c.restart_dead()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    c.restart_dead()

    def unsettled() -> list[str]:
        left = []
        for name in names:
            txns = replay(list(read(participant_journal(c.log, name))))
            left += [
                f"{name}:{t}:{r.get('state')}"
                for t, r in txns.items()
                if r.get("state") not in ("committed", "aborted")
            ]
        return left

    try:
        wait_until(lambda: not unsettled(), 90, "every transfer settled")
    except AssertionError:
        raise AssertionError(f"unsettled: {unsettled()[:10]}") from None
    money = balances(tmp_path, names)
    assert sum(money.values()) == 400, money
    assert all(v >= 0 for v in money.values()), money
    assert outcomes["committed"] >= 10, outcomes  # real work happened under the kills
    # every transfer the client saw committed moved money at both ends
    for name in names:
        committed = {p.name for p in (tmp_path / "bank" / name / "committed").iterdir()}
        states = replay(list(read(participant_journal(c.log, name))))
        assert committed - {"initial"} == {
            t for t, r in states.items() if r["state"] == "committed"
        }


# -- the command line ---------------------------------------------------------------------------
def test_cli_commit_exit_status_and_status_table_found_through_a_registry(
    procs: Any, tmp_path: Path
) -> None:
    log = str(tmp_path / "txn")
    registry = f"tcp://127.0.0.1:{free_port()}"
    reg = procs.eda("eda-registry", "serve", "--no-mdns", "--bind", registry)
    reg.wait_stderr("listening on", 15)
    coord = procs.eda("eda-txn", "coordinator", "--no-mdns", "--registry", registry, "--name", "c9",
                      "--log", log, "--bind", "tcp://127.0.0.1:*")  # fmt: skip
    pay = procs.eda("eda-txn", "participant", "pay", "--no-mdns", "--registry", registry, "--log", log,
                    "--bind", "tcp://127.0.0.1:*", "--prepare", 'grep -q \'"amount": [0-9],\'', "--commit", "true")  # fmt: skip
    coord.wait_stderr("announced by registry", 15)
    pay.wait_stderr("announced by registry", 15)
    base = ("commit", "--no-mdns", "--registry", registry, "-p", "pay")  # both found by name
    ok = run("eda-txn", *base, "--data", '{"amount": 5, "x": 1}')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["outcome"] == "committed"
    no = run(
        "eda-txn",
        *base,
        "--data",
        "-",
        "--format",
        "{outcome} {votes[pay]}",
        input='{"amount": 500, "x": 1}',
    )
    assert no.returncode == 5 and no.stdout == "aborted no\n", no
    bad = run("eda-txn", *base, "--data", "[1]")
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    rows = [json.loads(line) for line in run("eda-txn", "status", "--log", log).stdout.splitlines()]
    assert [r["state"] for r in rows] == ["committed", "aborted"]
    assert rows[0]["coordinator"] == "c9" and rows[0]["participants"] == {"pay": "committed"}
    # --data @FILE, as saga takes it (issue 16): the file's object is what pay's prepare reads
    (tmp_path / "order.json").write_text('{"amount": 7, "x": 1}')
    from_file = run("eda-txn", *base, "--data", f"@{tmp_path / 'order.json'}")
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["outcome"] == "committed"
    missing = run("eda-txn", *base, "--data", f"@{tmp_path / 'none.json'}")
    assert missing.returncode == 2 and "--data @" in missing.stderr and missing.stdout == ""


def test_status_shows_sagas_next_to_transactions(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saga logs' summaries (eda.core.txn.sagalog.saga_status) join the 2PC rows."""
    import types

    from eda.core.txn.status import everything

    c = cluster(["pay"])
    c.start_all()
    txn = c.commit({"order": 1})["txn"]
    wait_until(lambda: c.states(txn) == {"pay": "committed"}, 5)
    fake = types.ModuleType("eda.core.txn.sagalog")
    seen: list[Path] = []

    def saga_status(log_dir: Path) -> list[dict[str, Any]]:
        seen.append(Path(log_dir))
        return [{"kind": "saga", "id": "order-1", "name": "order", "status": "stuck", "error": "refund failed",
                 "started": "2000-01-01T00:00:00+00:00", "steps": {"charge": {"status": "compensation-failed"}}}]  # fmt: skip

    fake.saga_status = saga_status  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "eda.core.txn.sagalog", fake)
    rows, problems = everything(c.log)
    assert seen == [c.log] and not problems
    assert [r["kind"] for r in rows] == ["saga", "2pc"]  # oldest first
    saga = rows[0]
    assert (
        saga["txn"] == "order-1" and saga["state"] == "stuck" and saga["reason"] == "refund failed"
    )
    assert saga["steps"] == {"charge": "compensation-failed"} and saga["time"] == 946684800.0


def test_follow_ends_with_the_outcome_of_a_2pc_transaction(cluster: Any) -> None:
    """`eda-txn status ID --follow` on 2PC: each participant's state, then the outcome."""
    from eda.core.txn.status import follow

    c = cluster(["pay", "stock"])
    c.start_all()
    txn = c.commit({"order": 1})["txn"]
    wait_until(lambda: c.states(txn) == {"pay": "committed", "stock": "committed"}, 5)
    changes = list(follow(c.log, txn, interval=0.01))
    assert {(ch["step"], ch["status"]) for ch in changes if "step" in ch} == {
        ("pay", "committed"), ("stock", "committed")
    }  # fmt: skip
    assert changes[-1]["state"] == "committed" and changes[-1]["kind"] == "2pc"


# -- bounded memory and journals ----------------------------------------------------------------
class Recorded:
    """Actions that succeed and are counted."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def run(self, call: Any) -> Any:
        from eda.core.txn.actions import Result

        self.calls.append((call.phase, call.txn))
        return Result(True)

    def run_many(self, calls: list[Any]) -> list[Any]:
        return [self.run(c) for c in calls]

    def close(self) -> None:
        pass


def ask(part: Participant, **msg: Any) -> dict[str, Any]:
    reply = part.service.answer([json.dumps(msg).encode()])
    part.journal.sync()
    return reply


def test_finished_transactions_are_forgotten_in_order_and_the_journal_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eda.core.txn import participant as participant_module
    from eda.core.txn.protocol import new_txn_id

    actions = Recorded()
    part = Participant("stock", actions, tmp_path, kept=5)
    prepare = {"op": "prepare", "data": {}, "coordinator": "c1", "reply_to": "tcp://127.0.0.1:9"}
    ids = []
    for _ in range(30):
        txn = new_txn_id("c1")
        ids.append(txn)
        assert ask(part, **prepare, txn=txn)["vote"] == "yes"
        assert ask(part, op="decide", txn=txn, outcome="commit")["done"] is True
        time.sleep(0.002)  # ids of different milliseconds
    assert not part.txns and list(part.finished) == ids[-5:]  # memory stays bounded
    again = ask(part, op="decide", txn=ids[0], outcome="commit")  # a late repeat: long done here
    assert again["ok"] and again["forgotten"] is True
    never = ask(part, op="decide", txn=new_txn_id("c1"), outcome="commit")
    assert never["ok"] is False and never["code"] == 3  # newer than anything forgotten: never seen
    runs = len(actions.calls)
    assert (
        ask(part, **prepare, txn=ids[-1])["vote"] == "yes" and len(actions.calls) == runs
    )  # not rerun
    part.close()
    lines = len(participant_journal(tmp_path, "stock").read_text().splitlines())
    monkeypatch.setattr(participant_module, "COMPACT_MIN", 10)
    part = Participant("stock", Recorded(), tmp_path, kept=5)
    try:
        kept = participant_journal(tmp_path, "stock").read_text().splitlines()
        assert lines > 60 and len(kept) == 1 + 5 + 1  # the mark, five finished, a start record
        assert list(part.finished) == ids[-5:]
        assert ask(part, op="decide", txn=ids[0], outcome="commit")["forgotten"] is True
    finally:
        part.close()


def test_a_coordinator_journal_of_mostly_done_transactions_is_compacted_on_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eda.core.txn import coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module, "COMPACT_MIN", 10)
    monkeypatch.setattr(coordinator_module, "FINISHED_KEPT", 5)
    path = coordinator_journal(tmp_path, "c1")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(50):
        txn = f"c1.{i:017x}"
        records += [{"txn": txn, "state": "committed", "participants": {"a": "tcp://127.0.0.1:9"}},
                    {"txn": txn, "state": "done", "outcome": "committed"}]  # fmt: skip
    records.append(
        {"txn": "c1.1000", "state": "committed", "participants": {"a": "tcp://127.0.0.1:9"}}
    )
    records.append({"txn": f"c1.{3:017x}", "hazard": "a"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    coord = Coordinator("c1", tmp_path, directory=Directory({"a": "tcp://127.0.0.1:9"}))
    try:
        assert list(coord.active) == ["c1.1000"]  # still to finish
        kept = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(kept) == 5 * 2 + 1 + 1
        assert coord.outcome({"txn": f"c1.{49:017x}"})["outcome"] == "commit"  # remembered
    finally:
        coord.close()


def test_decisions_of_one_loop_turn_share_one_fsync(tmp_path: Path) -> None:
    """Group commit: every commit decided while handling one turn's messages is
    appended, then one fsync covers them all, then phase two starts."""
    sent: list[tuple[str, dict[str, Any]]] = []
    votes: list[Callable[..., None]] = []

    class Fake(Coordinator):
        def ask(self, txn: Txn, name: str, frame: bytes, callback: Callable[..., None]) -> None:
            msg = json.loads(frame)
            sent.append((name, msg))
            if msg["op"] == "prepare":
                votes.append(callback)

    peers = {"a": "tcp://127.0.0.1:9", "b": "tcp://127.0.0.1:10"}
    coord = Fake("c1", tmp_path, directory=Directory(peers))
    results: list[dict[str, Any]] = []
    try:
        for i in range(10):
            coord.begin(["a", "b"], json.dumps({"n": i}), 60, results.append)
        before = coord.journal.fsyncs
        for vote in votes:  # every vote arrives in the same turn
            vote({"ok": True, "vote": "yes"})
        assert not results and not [m for _, m in sent if m["op"] == "decide"]  # nothing told yet
        assert coord.journal.pending == 10
        coord._run_timers()  # the end of the turn
        assert coord.journal.fsyncs == before + 1
        assert [r["outcome"] for r in results] == ["committed"] * 10
        assert len([m for _, m in sent if m["op"] == "decide"]) == 20
    finally:
        coord.close()


def test_an_ack_waits_a_moment_to_share_the_next_votes_fsync(tmp_path: Path) -> None:
    part = Participant("stock", Recorded(), tmp_path, bind="tcp://127.0.0.1:*")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(part.endpoint)
    prepare = {"op": "prepare", "data": {}, "coordinator": "c1", "reply_to": "tcp://127.0.0.1:9"}

    def turn(*msgs: dict[str, Any]) -> list[dict[str, Any]]:
        for msg in msgs:
            sock.send(json.dumps(msg).encode())
        wait_until(lambda: part.service.sock.poll(0), 5)
        part.service.drain()
        replies = []
        while sock.poll(200):
            replies.append(json.loads(sock.recv()))
        return replies

    try:
        assert turn({**prepare, "txn": "c1.00a1", "rid": 1})[0]["vote"] == "yes"
        fsyncs = part.journal.fsyncs
        assert (
            turn({"op": "decide", "txn": "c1.00a1", "outcome": "commit", "rid": 2}) == []
        )  # lingers
        both = turn({**prepare, "txn": "c1.00a2", "rid": 3})
        assert [r["rid"] for r in both] == [2, 3] and both[0]["done"] is True
        # the ack shares the fsync of the prepare's "preparing" mark (made durable before the
        # action runs); the vote takes one more
        assert part.journal.fsyncs == fsyncs + 2
        assert turn({"op": "decide", "txn": "c1.00a2", "outcome": "abort", "rid": 4}) == []
        time.sleep(part.service.linger * 2)
        part._run_timers()  # nothing came: the ack goes out alone, durable first
        assert sock.poll(2000) and json.loads(sock.recv())["done"] is True
        assert part.journal.fsyncs == fsyncs + 3
    finally:
        sock.close()
        part.close()


def test_votes_of_a_batch_share_the_next_batchs_preparing_fsync(tmp_path: Path) -> None:
    """Group commit across batches: when the next batch of prepares is already there as
    one batch ends, its votes are not fsynced on their own: the next batch's "preparing"
    fsync (made before its actions run) covers them, and they are sent right after it,
    before those actions run.  Two batches of prepares: 3 fsyncs, not 4."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    prepare = {"op": "prepare", "data": {}, "coordinator": "c1", "reply_to": "tcp://127.0.0.1:9"}

    def batch(name: str, first_rid: int) -> list[bytes]:  # one message, two requests
        return [json.dumps({**prepare, "txn": f"c1.00{name}{i}", "rid": first_rid + i}).encode()
                for i in range(2)]  # fmt: skip

    def received() -> list[dict[str, Any]]:
        return [json.loads(f) for _ in iter(lambda: sock.poll(0), 0) for f in sock.recv_multipart()]

    votes_when_run: list[list[int]] = []  # rids answered when the second batch's actions ran

    class Arriving(Recorded):
        def run_many(self, calls: list[Any]) -> list[Any]:
            if calls[0].txn == "c1.00a0":  # the first batch runs: the second one arrives
                sock.send_multipart(batch("b", 10))
                wait_until(lambda: part.service.sock.poll(0), 5)
            else:
                wait_until(lambda: sock.poll(0), 5)
                votes_when_run.append(sorted(r["rid"] for r in received()))
            return super().run_many(calls)

    part = Participant("stock", Arriving(), tmp_path, bind="tcp://127.0.0.1:*")
    sock.connect(part.endpoint)
    try:
        fsyncs = part.journal.fsyncs
        sock.send_multipart(batch("a", 0))
        wait_until(lambda: part.service.sock.poll(0), 5)
        part.service.drain()  # the first batch: its votes wait for the second one
        assert received() == []
        part.service.drain()  # the second batch
        assert votes_when_run == [[0, 1]]  # sent after its preparing fsync, before its actions
        assert part.journal.fsyncs == fsyncs + 3
        wait_until(lambda: sock.poll(0), 5)
        got = received()
        assert sorted(r["rid"] for r in got) == [10, 11]
        assert all(r["vote"] == "yes" for r in got)
    finally:
        sock.close()
        part.close()


# -- a full disk --------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent

COORDINATOR_FULL = """
import json, os, subprocess, sys
from eda.core.daemon import Daemon
from eda.core.txn.coordinator import Coordinator, journal_path
from eda.core.txn.journal import read
from eda.core.txn.directory import Directory

d = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], check=True)
with open(d + "/filler", "wb") as f:  # two pages left for the journal
    f.write(b"f" * (56 << 10))
told, votes, results = {}, [], {}

class Fake(Coordinator):
    def ask(self, txn, name, frame, callback):
        msg = json.loads(frame)
        if msg["op"] == "prepare":
            votes.append(callback)
        else:
            told.setdefault(txn.id, set()).add(msg["outcome"])

peers = {"a": "tcp://127.0.0.1:9", "b": "tcp://127.0.0.1:10"}
make = lambda: Fake("c1", d, directory=Directory(peers), vote_timeout=60, warn=lambda m: None)
coord = make()

def turn(n):
    ids = [coord.begin(["a", "b"], "{}", 60, lambda r: results.__setitem__(r["txn"], r)).id
           for _ in range(n)]
    while votes:
        votes.pop()({"ok": True, "vote": "yes"})
    coord._run_timers()  # the group commit
    return ids

batches = []
while len(batches) < 100:
    batches.append(turn(10))
    if any(results.get(t, {}).get("outcome") != "committed" for t in batches[-1]):
        break
failed = batches[-1]
refused = coord.service.answer([json.dumps({"op": "commit", "participants": ["a"]}).encode()])
on_disk = {r["txn"]: r["state"] for r in read(journal_path(d, "c1")) if "state" in r}
raw = journal_path(d, "c1").read_bytes()
early = [t for b in batches[:-1] for t in b]
outcome = {t: coord.outcome({"txn": t})["outcome"] for t in early + failed}
told_failed = sorted({o for t in failed for o in told.get(t, ())})
os.unlink(d + "/filler")  # room again
after = turn(3)
# a power cut: what was not synced is lost; a new coordinator reads the journal
os.close(coord.journal._fd)
coord.journal._fd = -1
coord.journal._pending.clear()
coord.journal.close = lambda: None
Daemon.close(coord)
told.clear()
again = make()
again._run_timers()  # phase two again
print(json.dumps({
    "batches": len(batches),
    "early": {t: results[t]["outcome"] for t in early},
    "failed": {t: [results[t]["outcome"], results[t]["reason"]] for t in failed},
    "told_failed": told_failed,
    "refused": refused,
    "on_disk": on_disk,
    "whole_lines": raw.endswith(b"\\n") and all(json.loads(x) for x in raw.splitlines()),
    "outcome": outcome,
    "after": {t: results[t]["outcome"] for t in after},
    "recovered": {t: x.state for t, x in again.active.items()},
    "told_on_restart": {t: sorted(o) for t, o in told.items()},
    "outcome_after": {t: again.outcome({"txn": t})["outcome"] for t in failed},
}))
again.close()
"""


def test_a_coordinator_on_a_full_disk_aborts_what_it_could_not_log_and_recovers(
    tmp_path: Path,
) -> None:
    """The commit records the disk refused are taken back and those transactions
    aborted (their participants told so, an inquiry answered "abort", never
    "pending"); a new commit is refused with a clear error until the journal
    can be written; then commits go on, and a restart finishes what was decided."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", COORDINATOR_FULL, str(mnt)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["batches"] >= 2 and set(out["early"].values()) == {"committed"}
    for outcome, reason in out["failed"].values():
        assert outcome == "aborted" and "not committed" in reason and "No space left" in reason
    assert out["told_failed"] == ["abort"]  # never "commit"
    refused = out["refused"]
    assert refused["ok"] is False and "No space left on device" in refused["error"]
    assert "no transaction is started" in refused["error"]
    assert out["whole_lines"]  # no torn line
    assert all(out["on_disk"][t] == "committed" for t in out["early"])
    assert not any(out["on_disk"].get(t) == "committed" for t in out["failed"])
    assert {out["outcome"][t] for t in out["early"]} == {"commit"}
    assert {out["outcome"][t] for t in out["failed"]} == {"abort"}
    assert set(out["after"].values()) == {"committed"}  # room again: deciding again
    # the restart drives phase two of every decision again (nobody acknowledged)
    recovered = out["recovered"]
    assert all(recovered[t] == "committed" for t in [*out["early"], *out["after"]])
    assert all(out["told_on_restart"][t] == ["commit"] for t in out["early"])
    assert set(out["outcome_after"].values()) == {"abort"}


PARTICIPANT_FULL = '''
import json, os, subprocess, sys
from eda.core.txn.actions import Result
from eda.core.txn.journal import JournalError, read
from eda.core.txn.participant import Participant, journal_path
from eda.core.txn.status import twopc

d = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], check=True)

class Recorded:
    def __init__(self):
        self.calls = []
    def run(self, call):
        self.calls.append([call.phase, call.txn])
        return Result(True)
    def run_many(self, calls):
        return [self.run(c) for c in calls]
    def close(self):
        pass

def ask(part, **msg):
    """A request and the group commit of its batch: the reply is sent only if that worked."""
    reply = part.service.answer([json.dumps(msg).encode()])
    try:
        part._flush()
    except JournalError as exc:
        return {"not sent": str(exc)}
    return reply

prepare = {"op": "prepare", "coordinator": "c1", "reply_to": "tcp://127.0.0.1:9"}
actions = Recorded()
part = Participant("stock", actions, d, warn=lambda m: None)
t1, t2 = "c1.18f0000000a000001", "c1.18f0000000b000002"
first = ask(part, **prepare, txn=t1, data={})
fd = os.open(d + "/filler", os.O_WRONLY | os.O_CREAT)
try:  # the disk fills up...
    while os.write(fd, b"f" * 4096):
        pass
except OSError:
    os.close(fd)
os.truncate(d + "/filler", max(0, os.path.getsize(d + "/filler") - 4096))  # ...all but a page
vote = ask(part, **prepare, txn=t2, data={"pad": "p" * 9000})  # more than a page: cut short
ack = ask(part, op="decide", txn=t1, outcome="commit")
raw = journal_path(d, "stock").read_bytes()
rows, problems = twopc(d)
while_full = {"problems": problems, "states": {r["txn"]: r["state"] for r in rows}}
subprocess.run(["mount", "-o", "remount,size=1m", d], check=True)  # room again
part._run_timers()  # the journal timer: the buffered records go to disk
ack_again = ask(part, op="decide", txn=t1, outcome="commit")  # the coordinator retries
abort = ask(part, op="decide", txn=t2, outcome="abort")  # t2's vote never reached it
part.close()
again = Participant("stock", Recorded(), d, warn=lambda m: None)
rows, problems = twopc(d)
print(json.dumps({
    "first": first, "vote": vote, "ack": ack,
    "whole_lines": raw.endswith(b"\\n") and all(json.loads(x) for x in raw.splitlines()),
    "while_full": while_full, "ack_again": ack_again, "abort": abort,
    "repaired": again.journal.repaired,
    "finished": {t: r["state"] for t, r in again.finished.items()},
    "live": sorted(again.txns), "problems": problems,
    "states": {r["txn"]: r["participants"]["stock"] for r in rows},
    "actions": actions.calls,
}))
again.close()
'''


def test_a_participant_on_a_full_disk_sends_nothing_unlogged_and_goes_on_when_there_is_room(
    tmp_path: Path,
) -> None:
    """While its journal cannot be written, a participant's votes and acks are not
    sent; its journal stays whole (``status`` reads it); when the disk has room
    the buffered records are written, the in-doubt transaction resolves, and a
    restart finds everything."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", PARTICIPANT_FULL, str(mnt)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    t1, t2 = "c1.18f0000000a000001", "c1.18f0000000b000002"
    assert out["first"]["vote"] == "yes"
    assert "No space left on device" in out["vote"]["not sent"]  # no yes vote without its record
    assert "No space left on device" in out["ack"]["not sent"]
    assert out["whole_lines"]
    assert out["while_full"] == {"problems": [], "states": {t1: "in-doubt"}}
    assert out["ack_again"]["done"] is True and out["abort"]["done"] is True
    assert out["repaired"] == 0 and out["live"] == []
    assert out["finished"] == {t1: "committed", t2: "aborted"}
    assert out["problems"] == [] and out["states"] == {t1: "committed", t2: "aborted"}
    # t2's prepare never ran: its "preparing" mark, written before the action, could not
    # be; its abort runs all the same (an abort is safe after a prepare cut short)
    assert out["actions"] == [["prepare", t1], ["commit", t1], ["abort", t2]]


# -- journals bounded while running, restarts read stream-wise ------------------------------------
def test_journals_stay_bounded_while_the_daemons_run(
    tmp_path: Path, procs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many transactions through a running coordinator and participant: each
    journal is compacted as it goes (new segments, counted in bytes), and what
    it must remember is still there."""
    from eda.core.txn import coordinator as coordinator_module
    from eda.core.txn import participant as participant_module

    kept, count = 20, 300
    monkeypatch.setattr(coordinator_module, "FINISHED_KEPT", kept)
    monkeypatch.setattr(coordinator_module, "COMPACT_MIN", 50)
    monkeypatch.setattr(participant_module, "COMPACT_MIN", 50)
    log = tmp_path / "txn"
    stock, coord = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemons = [
        Forked(lambda: Participant("stock", Recorded(), log, bind=stock, kept=kept), {},
               tmp_path / "stock.errors"),
        Forked(lambda: Coordinator("c1", log, directory=Directory({"stock": stock}), bind=coord),
               {}, tmp_path / "coordinator.errors"),
    ]  # fmt: skip
    paths = [coordinator_journal(log, "c1"), participant_journal(log, "stock")]
    client = Client([coord], timeout=10)
    largest = [0, 0]
    txns = []
    try:
        for i in range(count):
            reply = client.request({"op": "commit", "participants": ["stock"], "data": {"n": i}})
            assert reply["outcome"] == "committed"
            txns.append(reply["txn"])
            largest = [max(m, p.stat().st_size) for m, p in zip(largest, paths, strict=True)]
        last = client.request({"op": "outcome", "txn": txns[-1]})
        wait_until(
            lambda: replay(list(read(paths[1]))).get(txns[-1], {}).get("state") == "committed",
            10, "the last commit at the participant",
        )  # fmt: skip
    finally:
        client.close()
        for daemon in daemons:
            daemon.kill()
    # compaction is due past 4x the coordinator's remembered transactions (and 50
    # records), 2x the participant's; a transaction or two may come first
    longest = [max(len(line) + 1 for line in p.read_bytes().splitlines()) for p in paths]
    coordinator_bound = (max(50, 4 * (kept + 1)) + 4) * longest[0]
    participant_bound = (max(50, 2 * (kept + 1)) + 4) * longest[1]
    assert largest[0] <= coordinator_bound, (largest, coordinator_bound)
    assert largest[1] <= participant_bound, (largest, participant_bound)
    assert coordinator_bound < count * longest[0] // 2  # far below what was written
    assert last["outcome"] == "commit"  # remembered
    remembered = {r.get("txn") for r in read(paths[0])}
    assert set(txns[-kept:]) <= remembered and len(remembered) <= 4 * (kept + 1) + 4
    participant_records = list(read(paths[1]))
    assert any(r.get("endpoint") == stock for r in participant_records)  # for eda-txn resolve
    assert replay(participant_records)[txns[-1]]["state"] == "committed"


def test_a_restart_reads_a_long_journal_stream_wise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator and a participant starting on journals of 6,000 transactions
    (as a journal written before compaction while running could be): memory at
    start holds what they remember, not the file; every unfinished one recovered."""
    import tracemalloc

    from eda.core.txn import coordinator as coordinator_module
    from eda.core.txn import participant as participant_module

    monkeypatch.setattr(coordinator_module, "FINISHED_KEPT", 100)
    monkeypatch.setattr(coordinator_module, "COMPACT_MIN", 1000)
    monkeypatch.setattr(participant_module, "COMPACT_MIN", 1000)
    endpoint = {"a": "tcp://127.0.0.1:9"}
    paths = [coordinator_journal(tmp_path, "c1"), participant_journal(tmp_path, "a")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with open(paths[0], "w") as c, open(paths[1], "w") as p:
        for i in range(6_000):
            txn = f"c1.{i:017x}"
            c.write(json.dumps({"txn": txn, "state": "committed", "participants": endpoint,
                                "time": 1764290000.0 + i}) + "\n")  # fmt: skip
            p.write(json.dumps({"txn": txn, "state": "prepared", "data": {"n": i},
                                "coordinator": "c1", "reply_to": endpoint["a"]}) + "\n")  # fmt: skip
            if i not in (7, 5_990):  # two still to finish
                c.write(json.dumps({"txn": txn, "state": "done", "outcome": "committed"}) + "\n")
                p.write(json.dumps({"txn": txn, "state": "committed", "time": 1.0}) + "\n")
    sizes = [path.stat().st_size for path in paths]
    assert min(sizes) > 900_000
    tracemalloc.start()
    try:
        coord = Coordinator("c1", tmp_path, directory=Directory(endpoint))
        coord_peak = tracemalloc.get_traced_memory()[1]
        coord.close()
        tracemalloc.reset_peak()
        part = Participant("a", Recorded(), tmp_path, kept=100)
        part_peak = tracemalloc.get_traced_memory()[1]
        part.close()
    finally:
        tracemalloc.stop()
    assert coord_peak < sizes[0] // 4, (coord_peak, sizes[0])
    assert part_peak < sizes[1] // 4, (part_peak, sizes[1])
    assert sorted(coord.active) == sorted(part.txns) == [f"c1.{7:017x}", f"c1.{5_990:017x}"]
    assert list(coord.finished)[-1] == f"c1.{5_999:017x}" and len(coord.finished) == 100
    assert len(part.finished) == 100
    # and both compacted on the way: a restart now reads a short file
    assert all(path.stat().st_size < size // 20 for path, size in zip(paths, sizes, strict=True))


def test_compaction_keeps_every_record_of_an_unfinished_transaction_whatever_its_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records a participant writes before or beside its vote (an in-doubt note,
    kinds this version does not know) all survive compaction. (A "preparing"
    transaction would be aborted at the start itself: see test_txn_recovery.)"""
    from eda.core.txn import participant as participant_module

    monkeypatch.setattr(participant_module, "COMPACT_MIN", 10)
    path = participant_journal(tmp_path, "stock")
    path.parent.mkdir(parents=True, exist_ok=True)
    live = "c1.18f0000000a0000ff"
    unfinished = [
        {"txn": live, "state": "prepared", "data": {"n": 1}, "coordinator": "c1"},
        {"txn": live, "in_doubt": "coordinator c1 does not answer", "time": 2.0},
        {"txn": live, "note": "a kind of record from a newer version"},
    ]
    records: list[dict[str, Any]] = []
    for i in range(40):
        txn = f"c1.{i:017x}"
        records += [{"txn": txn, "state": "prepared", "data": {}}, {"txn": txn, "state": "aborted"}]
        if i == 3:
            records += unfinished
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    part = Participant("stock", Recorded(), tmp_path, kept=5)
    try:
        kept = list(read(path))
        assert [r for r in kept if r.get("txn") == live] == unfinished  # each one, in order
        assert len(kept) == 1 + 5 + len(unfinished) + 1  # the mark, the remembered, a start
        for i in range(30):  # and again while running
            txn = f"c1.{100 + i:017x}"
            prepare = {"data": {}, "coordinator": "c1", "reply_to": "tcp://127.0.0.1:9"}
            assert ask(part, op="prepare", txn=txn, **prepare)["vote"] == "yes"
            assert ask(part, op="decide", txn=txn, outcome="abort")["done"] is True
            part._flush()
        kept = list(read(path))
        assert len(kept) < 40 and [r for r in kept if r.get("txn") == live] == unfinished
        assert any(r.get("endpoint") == part.endpoint for r in kept)
    finally:
        part.close()
