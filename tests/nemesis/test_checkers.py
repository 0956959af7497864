"""Each checker on hand-made histories: clean ones pass, each anomaly is caught and named."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tests.nemesis.checkers import (
    check_bus,
    check_lb,
    check_nats,
    check_pubsub,
    check_registry,
    check_txn,
    percentile,
)
from tests.nemesis.history import FAIL, INFO, OK, Op
from tests.nemesis.nemesis import schedule
from tests.nemesis.run import faulted


def op(t: float, process: str, subject: str, kind: str, value: Any, outcome: str = OK) -> Op:
    return Op(t, t + 0.1, process, subject, kind, value, outcome)


def kinds(result: Any) -> list[str]:
    return sorted(a.kind for a in result.anomalies)


# -- bus ----------------------------------------------------------------------------------
def bus_history(
    log: list[list[Any]], durable: list[str], group: list[str], next_seq: int = 4
) -> list[Op]:
    return [
        op(1, "p1", "bus", "publish", {"values": ["a", "b"], "rc": 0}),
        op(2, "p1", "bus", "publish", {"values": ["c"], "rc": 4}, INFO),
        op(3, "p2", "bus", "publish", {"values": ["d"], "rc": 4}, INFO),
        op(9, "check", "bus", "stats", {"d1": {"next": next_seq}, "g1": {"lag": 0}}),
        op(10, "check", "bus", "read", log),
        op(11, "durable", "bus", "delivered", {"consumer": "durable", "events": [
            [d, 0] for d in durable]}),
        op(11, "member1", "bus", "delivered", {"consumer": "group", "events": [
            [d, 0] for d in group]}),
    ]  # fmt: skip


def test_bus_clean_history_has_no_anomaly() -> None:
    # c was not confirmed but stored once (allowed); d not confirmed, not stored (allowed)
    result = check_bus(
        bus_history([["a", 1], ["b", 2], ["c", 3]], ["a", "b", "c"], ["a", "b", "c"])
    )
    assert result.anomalies == []
    assert (result.ops, result.ok) == (3, 1)


def test_bus_names_each_anomaly_with_its_operations() -> None:
    log = [["a", 1], ["c", 2], ["c", 3], ["zz", 4]]  # b lost, c twice, zz never published
    result = check_bus(bus_history(log, ["a"], ["a", "zz"], next_seq=5))
    assert kinds(result) == [
        "acked-undelivered", "acked-undelivered", "duplicate", "group-undelivered",
        "lost-confirmed", "phantom", "phantom",  # zz: in the log, and delivered
    ]  # fmt: skip
    lost = next(a for a in result.anomalies if a.kind == "lost-confirmed")
    assert "'b'" in lost.detail and lost.ops == ["p1 publish@1.00s", "check read@10.00s"]


def test_bus_without_a_final_read_is_an_anomaly() -> None:
    history = [o for o in bus_history([], [], []) if o.kind != "read"]
    assert kinds(check_bus(history)) == ["no-final-read"]
    failed = [o if o.kind != "read" else op(10, "c", "bus", "read", [], FAIL) for o in history]
    assert kinds(check_bus(failed)) == ["no-final-read"]


def as_nats(history: list[Op], consumers: list[str]) -> list[Op]:
    """*history* as the NATS role's (subject ``nats``; its setup names its consumers)."""
    moved = [Op(o.time, o.end, o.process, "nats", o.kind, o.value, o.outcome) for o in history]
    return [op(0, "nats", "nats", "setup", {"consumers": consumers}), *moved]


def test_the_nats_role_is_checked_as_the_bus_and_apart_from_it() -> None:
    clean = bus_history([["a", 1], ["b", 2]], ["a", "b"], [])
    # the NATS role runs no group: nothing is asked of one
    assert check_nats(as_nats(clean, ["durable"])).anomalies == []
    assert kinds(check_nats(as_nats(clean, ["durable", "group"]))) == ["group-undelivered"] * 2
    lost = bus_history([["a", 1]], ["a"], [])  # b confirmed, not in JetStream's stream
    assert kinds(check_nats(as_nats(lost, ["durable"]))) == ["lost-confirmed"]
    assert check_nats(lost).ops == 0  # the embedded bus's history is not the NATS role's
    assert check_bus(as_nats(lost, ["durable"])).ops == 0


# -- pub/sub ------------------------------------------------------------------------------
def ps_history(
    events: list[int], lost: int, reports: dict[str, list[str]], last: int = 6
) -> list[Op]:
    return [
        *(op(n, "feed", "pubsub", "publish", n) for n in range(1, last + 1)),
        op(20, "feed", "pubsub", "feed-end", {"rc": 0, "last": last, "reports": reports}),
        op(21, "ps-sub1", "pubsub", "delivered", {
            "incarnation": 0, "id": "s1", "events": [[n, f"p-{n}"] for n in events],
            "lost": lost}),
    ]  # fmt: skip


def test_pubsub_clean_histories() -> None:
    assert check_pubsub(ps_history([2, 3, 4, 5, 6], 0, {})).anomalies == []  # joined late
    assert check_pubsub(ps_history([1, 2, 5, 6], 2, {})).anomalies == []  # gap reported
    assert check_pubsub(ps_history([1, 2, 3], 0, {"s1": ["is gone"]})).anomalies == []
    assert check_pubsub(ps_history([1, 2, 3], 3, {})).anomalies == []  # it reported the tail


def test_pubsub_names_duplicates_silent_gaps_tails_and_phantoms() -> None:
    assert kinds(check_pubsub(ps_history([1, 2, 2, 3, 4, 5, 6], 0, {}))) == ["duplicate"]
    assert kinds(check_pubsub(ps_history([1, 2, 5, 6], 1, {}))) == ["silent-loss"]
    assert kinds(check_pubsub(ps_history([1, 2, 3], 0, {}))) == ["silent-tail"]
    assert kinds(check_pubsub(ps_history([1, 2, 3, 4, 5, 6, 7], 0, {}))) == ["phantom"]
    no_end = [o for o in ps_history([1], 0, {}) if o.kind != "feed-end"]
    assert kinds(check_pubsub(no_end)) == ["no-feed-end"]


# -- registry -----------------------------------------------------------------------------
SETUP = {"ttl": 2.0, "peer_timeout": 1.0, "tick": 0.2, "interval": 0.4}


def reg_history(views: list[tuple[float, int, list[str]]], kill: tuple[float, float]) -> list[Op]:
    fault = {"fault": "kill", "target": "svc2", "value": None, "error": None}
    return sorted(
        [
            op(0, "registry", "registry", "setup", SETUP),
            op(0, "svc1", "registry", "instance", {"daemon": "svc1", "id": "svc1"}),
            op(0, "svc2", "registry", "instance", {"daemon": "svc2", "id": "svc2"}),
            op(kill[0], "svc2", "nemesis", "start", fault),
            op(kill[1], "svc2", "nemesis", "heal", fault),
            op(50, "nemesis", "nemesis", "heal-all", None),
            *(op(t, f"observer{r}", "registry", "lookup", {"registry": r, "ids": ids})
              for t, r, ids in views),
        ],
        key=lambda o: o.time,
    )  # fmt: skip


def test_registry_convergence_is_measured_from_the_last_heal() -> None:
    both = ["svc1", "svc2"]
    views = [(12, 1, ["svc1"]), (51, 1, ["svc1"]), (52, 1, both), (53, 1, both), (50.5, 2, both)]
    result = check_registry(reg_history(views, (10, 30)))
    assert result.anomalies == []
    assert result.stats["convergence_s"] == pytest.approx([2.0, 0.5])  # heal to converged answer
    assert result.stats["convergence"]["max"] == pytest.approx(2.0)


def test_registry_convergence_with_slow_lookups_overlapping_quick_views() -> None:
    """A lookup is a program run of seconds: one asked before the views converged may end
    after them, and one asked after may end long after the quick dig that showed it."""
    both = ["svc1", "svc2"]
    history = reg_history([], (10, 30))
    slow = [(50.2, 57.0, ["svc1"]), (50.6, 56.0, both)]  # (asked, answered, view)
    history += [Op(t, end, "observer1", "registry", "lookup", {"registry": 1, "ids": ids}, OK)
                for t, end, ids in slow]  # fmt: skip
    history.append(op(50.7, "dig1", "registry", "view", {"registry": 1, "ids": both}))
    result = check_registry(history)
    assert result.anomalies == []
    assert result.stats["convergence_s"] == pytest.approx([0.7])  # healed 50.1, the dig 50.8


def test_registry_names_stale_instances_and_views_that_never_converge() -> None:
    both = ["svc1", "svc2"]
    # svc2 was killed at 10 and served at 20 (past the 6.4 s bound): stale
    views = [(20, 1, both), (52, 1, both), (51, 2, both), (53, 2, ["svc1"])]
    result = check_registry(reg_history(views, (10, 30)))
    assert kinds(result) == ["not-converged", "stale-instance"]
    stale = next(a for a in result.anomalies if a.kind == "stale-instance")
    assert stale.ops == ["svc2 start@10.00s", "observer1 lookup@20.00s"]
    # served 5 s after the kill: within the bound, no anomaly
    assert check_registry(reg_history([(15, 1, both), (52, 1, both)], (10, 30))).anomalies == []
    # a lookup still running when svc2 restarted (at 20.05) may show the new registration
    assert check_registry(reg_history([(19.99, 1, both), (52, 1, both)], (10, 20))).anomalies == []
    assert kinds(check_registry(reg_history([(19.8, 1, both), (52, 1, both)], (10, 20)))) == [
        "stale-instance"
    ]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0] * 99 + [9.0], 99) == 1.0
    assert percentile([1.0] * 98 + [9.0, 9.0], 99) == 9.0


# -- lb -----------------------------------------------------------------------------------
LB_HOSTS = {"w1": "10.0.0.1", "w2": "10.0.0.2"}


def lb_history(
    replies: list[str],
    failed: list[int],
    rc: int,
    unsent: int | None = None,
    sent: dict[str, list[str]] | None = None,
) -> list[Op]:
    """A call of requests r1..r3; by default each was sent to both workers (*sent*:
    request number -> the hosts it went to, as ``eda-lb call -v`` names them)."""
    if sent is None:
        sent = {str(i): sorted(LB_HOSTS.values()) for i in (1, 2, 3)}
    value = {"requests": ["r1", "r2", "r3"], "replies": replies, "failed": failed,
             "unsent_from": unsent, "sent": sent, "rc": rc, "stderr": ""}  # fmt: skip
    return [
        op(0, "lb", "lb", "setup", {"workers": ["w1", "w2"], "hosts": LB_HOSTS}),
        op(1, "lb-call1", "lb", "call", value, OK if rc == 0 else FAIL),
    ]


def test_lb_clean_histories() -> None:
    assert check_lb(lb_history(["r1 w1", "r2 w2", "r3 w1"], [], 0)).anomalies == []
    assert check_lb(lb_history(["r1 w1", "r3 w1"], [2], 1)).anomalies == []
    assert check_lb(lb_history(["r1 w1"], [], 3, unsent=2)).anomalies == []
    assert check_lb(lb_history([], [], 3)).anomalies == []  # no instance: nothing sent
    assert check_lb(lb_history([], [], 1)).anomalies == []  # no registry answered: the same


def test_lb_names_each_anomaly() -> None:
    assert kinds(check_lb(lb_history(["r1 w1", "r1 w2", "r2 w1", "r3 w1"], [], 0))) == [
        "duplicate-reply", "exit-0-incomplete"]  # fmt: skip
    assert kinds(check_lb(lb_history(["r2 w1", "r1 w1", "r3 w1"], [], 0))) == ["out-of-order"]
    assert kinds(check_lb(lb_history(["r1 w1", "r3 w1"], [], 1))) == ["unanswered"]
    assert kinds(check_lb(lb_history(["r1 w9", "r2 w1", "r3 w1"], [1], 1))) == ["phantom-reply"]
    assert kinds(check_lb(lb_history(["r1 w1", "r2 w1", "r3 w1"], [2], 1))) == [
        "answered-and-failed"]  # fmt: skip
    assert kinds(check_lb(lb_history([], [], -1))) == ["hung"]


def test_lb_flags_a_reply_from_an_instance_the_request_did_not_go_to() -> None:
    w1, w2 = LB_HOSTS["w1"], LB_HOSTS["w2"]
    # r2 retried on w2 after w1 timed out, and w1's late reply taken: both were sent it
    retried = {"1": [w1], "2": [w1, w2], "3": [w2]}
    assert check_lb(lb_history(["r1 w1", "r2 w1", "r3 w2"], [], 0, sent=retried)).anomalies == []
    # r2 went to w1 only, the reply says w2 answered it
    elsewhere = lb_history(["r1 w1", "r2 w2", "r3 w2"], [], 0, sent={"1": [w1], "2": [w1],
                                                                     "3": [w2]})  # fmt: skip
    assert kinds(check_lb(elsewhere)) == ["reply-from-elsewhere"]
    # a reply to a request the caller never sent anywhere
    unsent = lb_history(["r1 w1", "r2 w1", "r3 w1"], [], 0, sent={"1": [w1], "3": [w1]})
    assert kinds(check_lb(unsent)) == ["reply-from-elsewhere"]


# -- the schedule -------------------------------------------------------------------------
def test_schedule_is_a_function_of_the_seed_and_heals_in_time() -> None:
    daemons = [("bus", ("kill", "stop")), ("feed", ("stop",)), ("svc1", ("kill", "stop"))]
    hosts = ["n1", "n2", "n3", "n4", "n5"]
    faults = schedule(7, 120, daemons, hosts)
    assert faults == schedule(7, 120, daemons, hosts)
    assert faults != schedule(8, 120, daemons, hosts)
    assert {f.kind for f in faults} == {"kill", "stop", "cut", "split", "loss"}
    assert all(0 < f.start < f.end <= 120 for f in faults)
    assert not any(f.kind == "kill" and f.target == "feed" for f in faults)
    by_target: dict[str, list[tuple[float, float]]] = {}
    for f in faults:
        by_target.setdefault(f.target, []).append((f.start, f.end))
    for spans in by_target.values():  # one fault at a time per target, one split at a time
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    ordered = sorted(faults, key=lambda f: f.start)
    assert any(b.start < a.end for a, b in itertools.pairwise(ordered))  # faults overlap


# -- txn ----------------------------------------------------------------------------------
def transfer(ref: str, src: str, dst: str, amount: int, rc: int, txn: str) -> Op:
    outcome = {0: "committed", 5: "aborted"}.get(rc)
    value = {"ref": ref, "from": src, "to": dst, "amount": amount, "rc": rc, "txn": txn,
             "outcome": outcome, "stderr": ""}  # fmt: skip
    return op(1, "transfer1", "txn", "transfer", value, OK if outcome else INFO)


def account(name: str, done: dict[str, tuple[int, str]], held: Any = None) -> Op:
    records = {"done": done, "held": held or {}}
    value: dict[str, Any] = {"account": name, "initial": 100}
    for state, recs in records.items():
        value[state] = {txn: {"delta": d, "ref": ref} for txn, (d, ref) in recs.items()}
    return op(20, name, "txn", "account", value)


def saga(sid: str, rc: int) -> Op:
    value = {"saga": sid, "n": 1, "rc": rc, "stderr": ""}
    return op(2, "saga1", "txn", "saga", value, OK if rc in (0, 5) else INFO)


def effects(*markers: str) -> Op:
    return op(21, "saga-effects", "txn", "effects", list(markers))


def txn_history(a: dict[str, Any], b: dict[str, Any], *extra: Op, held: Any = None) -> list[Op]:
    return [
        transfer("t1", "a", "b", 30, 0, "c1.1"),
        transfer("t2", "b", "a", 50, 5, "c1.2"),
        transfer("t3", "a", "b", 20, 4, "c2.1"),  # unknown outcome: either is fine
        account("a", a, held), account("b", b), *extra,
    ]  # fmt: skip


def test_txn_clean_history_has_no_anomaly() -> None:
    good = txn_history({"c1.1": (-30, "t1"), "c2.1": (-20, "t3")},
                       {"c1.1": (30, "t1"), "c2.1": (20, "t3")})  # fmt: skip
    sagas = [saga("s1", 0), saga("s2", 5), saga("s3", 5), saga("s4", 1),
             op(30, "saga-resume", "txn", "saga", {"saga": "s4", "rc": 5, "stderr": ""}),
             effects("s1.debit.action.0", "s1.credit.action.0", "s2.debit.action.0",
                     "s2.credit.action.0", "s2.credit.compensate.0", "s2.debit.compensate.0",
                     "s4.debit.action.0", "s4.debit.compensate.0")]  # fmt: skip
    result = check_txn([*good, *sagas])
    assert result.anomalies == []
    assert result.stats["bank_total"] == {"opening": 200, "closing": 200}
    assert result.stats["sagas"] == {"completed": 1, "compensated": 3}
    assert (result.ops, result.ok) == (8, 6)


def test_txn_names_each_anomaly() -> None:
    # t1 committed but done at a only; t2 aborted yet applied; t3 applied twice;
    # a negative; a transfer no one asked for; a wrong amount
    bad = txn_history(
        {"c1.1": (-30, "t1"), "c1.2": (50, "t2"), "c2.1": (-20, "t3"), "c2.9": (-20, "t3"),
         "c9.9": (-90, "nobody")},
        {"c1.2": (-50, "t2"), "c2.1": (20, "t3"), "c2.9": (25, "t3")},
    )  # fmt: skip
    assert kinds(check_txn(bad)) == [
        "aborted-applied", "committed-lost", "disagree", "duplicate", "negative",
        "not-conserved", "phantom", "wrong-amount",
    ]  # fmt: skip
    t1 = {"c1.1": (-30, "t1")}, {"c1.1": (30, "t1")}
    doubt = txn_history(*t1, held={"c2.1": (-20, "t3")})
    assert kinds(check_txn(doubt)) == ["in-doubt"]
    sagas = [saga("s1", 0), saga("s2", 5), saga("s3", 1), saga("s4", 5),
             effects("s1.debit.action.0", "s2.debit.action.0", "s2.credit.action.0",
                     "s2.debit.compensate.0", "s4.credit.compensate.0")]  # fmt: skip
    result = check_txn([*txn_history(*t1), *sagas])
    assert kinds(result) == [
        "phantom-compensation", "saga-half", "saga-half", "saga-unfinished",
    ]  # fmt: skip
    assert kinds(check_txn([transfer("t1", "a", "b", 1, 0, "c1.1")])) == ["no-final-read"]


def test_faulted_names_what_hit_each_role() -> None:
    def fault(kind: str, target: str, outcome: str = OK) -> Op:
        return op(1, target, "nemesis", "start", {"fault": kind, "target": target}, outcome)

    history = [fault("kill", "bus"), fault("cut", "n1"), fault("stop", "lbw1", FAIL)]
    hit = faulted(history, {"bus": ["bus"], "lb": ["lbw1"]})
    assert hit == {"bus": ["kill bus"], "lb": [], "network": ["cut n1"]}
