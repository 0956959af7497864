"""Checkers: pure functions over a history, each naming its anomalies with their operations.

A checker never looks at processes or files, only at the :class:`Op` records,
so each is tested on hand-made histories holding each anomaly
(``tests/nemesis/test_checkers.py``): a checker that cannot fail shows nothing.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.nemesis.history import FAIL, INFO, OK, Op


@dataclass
class Anomaly:
    kind: str  # e.g. "lost-confirmed", "duplicate", "phantom"
    detail: str
    ops: list[str]  # Op.ref() of the operations that show it


@dataclass
class Result:
    checker: str
    ops: int = 0
    ok: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def flag(self, kind: str, detail: str, ops: Sequence[Op]) -> None:
        self.anomalies.append(Anomaly(kind, detail, [op.ref() for op in ops][:10]))


def _of(history: Sequence[Op], subject: str, kind: str) -> list[Op]:
    return [op for op in history if op.subject == subject and op.kind == kind]


def _count(result: Result, ops: Sequence[Op]) -> None:
    result.ops += len(ops)
    result.ok += sum(op.outcome == OK for op in ops)


# -- bus ----------------------------------------------------------------------------------
def check_bus(history: Sequence[Op], subject: str = "bus") -> Result:
    """Confirmed events stored exactly once; unconfirmed ones at most once; nothing that
    was never published; every event below the durable's acknowledged position
    delivered to it; every stored event delivered to at least one group member (when
    the workload's setup names a group). *subject*: ``bus`` (the embedded engine) or
    ``nats`` (fronts on JetStream)."""
    result = Result(subject)
    setup = _of(history, subject, "setup")
    groups = not setup or "group" in setup[-1].value["consumers"]
    publishes = _of(history, subject, "publish")
    _count(result, publishes)
    by_value: dict[str, Op] = {}
    for op in publishes:
        for v in op.value["values"]:
            by_value[v] = op
    reads = [op for op in _of(history, subject, "read") if op.outcome == OK]
    if not reads:
        result.flag("no-final-read", "the log could not be read after the recovery", [])
        return result
    read = reads[-1]
    stored = Counter(data for data, _ in read.value)
    seq_of = {data: seq for data, seq in read.value}
    for value, n in sorted(stored.items()):
        if value not in by_value:
            result.flag("phantom", f"{value!r} is in the log but was never published", [read])
        elif n > 1:
            result.flag("duplicate", f"{value!r} is in the log {n} times", [by_value[value], read])
    for value, op in by_value.items():
        if op.outcome == OK and value not in stored:
            result.flag("lost-confirmed", f"{value!r} was confirmed, not in the log", [op, read])
    delivered: dict[str, set[str]] = defaultdict(set)
    for op in _of(history, subject, "delivered"):
        for data, _ in op.value["events"]:
            delivered[op.value["consumer"]].add(data)
            if data not in by_value:
                result.flag("phantom", f"{data!r} delivered but never published", [op])
    stats = [op for op in _of(history, subject, "stats") if op.outcome == OK]
    if not stats:
        result.flag("not-caught-up", "the durable consumer or the group never caught up", [])
        return result
    acked = stats[-1].value.get("d1", {}).get("next", 1)
    result.stats["durable_next"] = acked
    for value, seq in sorted(seq_of.items(), key=lambda kv: kv[1]):
        if seq < acked and value not in delivered["durable"]:
            result.flag(
                "acked-undelivered",
                f"{value!r} (bus seq {seq}) is below the durable's position {acked} "
                "but was never delivered to it",
                [stats[-1], read],
            )
        if groups and value not in delivered["group"]:
            result.flag(
                "group-undelivered",
                f"{value!r} (bus seq {seq}) reached no member of the group",
                [stats[-1], read],
            )
    result.stats["stored"] = len(stored)
    result.stats["confirmed"] = sum(len(op.value["values"]) for op in publishes if op.outcome == OK)
    result.stats["unconfirmed"] = sum(
        len(op.value["values"]) for op in publishes if op.outcome == INFO
    )
    return result


def check_nats(history: Sequence[Op]) -> Result:
    """:func:`check_bus` on the NATS engine's role (subject ``nats``)."""
    return check_bus(history, "nats")


# -- brokerless pub/sub -------------------------------------------------------------------
def check_pubsub(history: Sequence[Op]) -> Result:
    """Per subscriber run: nothing twice, nothing unpublished, every gap reported by the
    subscriber (``lost N``), and a tail it missed reported by the publisher."""
    result = Result("pubsub")
    publishes = _of(history, "pubsub", "publish")
    _count(result, publishes)
    published = {op.value for op in publishes}
    ends = _of(history, "pubsub", "feed-end")
    if not ends:
        result.flag("no-feed-end", "the feed never ended", [])
        return result
    end = ends[-1]
    last, reports = end.value["last"], end.value["reports"]
    for op in _of(history, "pubsub", "delivered"):
        seqs = [seq for seq, _ in op.value["events"]]
        for seq, data in op.value["events"]:
            if data != f"p-{seq}" or seq not in published:
                result.flag("phantom", f"event {seq} {data!r} was never published", [op])
        for seq, n in sorted(Counter(seqs).items()):
            if n > 1:
                result.flag("duplicate", f"event {seq} delivered {n} times", [op])
        if not seqs:
            continue
        first, high = min(seqs), max(seqs)
        missing = (high - first + 1) - len(set(seqs))
        lost = op.value["lost"]
        if missing > lost:
            result.flag(
                "silent-loss",
                f"{op.process} #{op.value['incarnation']} missed {missing} event(s) between "
                f"{first} and {high} and reported {lost} lost",
                [op],
            )
        if high < last and missing + (last - high) > lost and not reports.get(op.value["id"]):
            result.flag(
                "silent-tail",
                f"{op.process} #{op.value['incarnation']} ({op.value['id']}) got none after "
                f"event {high} of {last}; neither it nor the publisher reported a loss",
                [op, end],
            )
    return result


# -- registry -----------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def check_registry(history: Sequence[Op]) -> Result:
    """After the last heal every peer's view converges to every live instance (time to
    converge p50/p99/max); no instance served once its registrant has been dead for
    longer than the TTL plus the peer hand-over (peer timeout + TTL) plus a tick."""
    result = Result("registry")
    # eda-registry lookup, and dig at the DNS interface, in the order they were asked: an
    # answer is from some instant between an op's start and end, so a slow lookup asked
    # before the views converged may end after quicker ones asked later
    lookups = sorted(
        _of(history, "registry", "lookup") + _of(history, "registry", "view"), key=lambda o: o.time
    )
    _count(result, lookups)
    setup = _of(history, "registry", "setup")
    if not setup:
        result.flag("no-setup", "no registry setup in the history", [])
        return result
    conf = setup[-1].value
    bound = 2 * conf["ttl"] + conf["peer_timeout"] + 2 * conf["tick"] + 1.0
    result.stats["dead_bound_s"] = bound
    instances = {op.value["daemon"]: op.value["id"] for op in _of(history, "registry", "instance")}
    # when each instance's registrant was dead (killed) or frozen: [from, to)
    dead: dict[str, list[tuple[float, float, Op]]] = defaultdict(list)
    opened: dict[str, tuple[float, Op]] = {}
    for op in history:
        if op.subject != "nemesis" or op.outcome != OK or op.kind not in ("start", "heal"):
            continue
        fault, target = op.value["fault"], op.value["target"]
        if fault not in ("kill", "stop") or target not in instances:
            continue
        if op.kind == "start":
            opened[target] = (op.end, op)
        elif target in opened:
            since, start = opened.pop(target)
            dead[instances[target]].append((since, op.time, start))
    heals = [op for op in history if op.kind == "heal-all"]
    ends = [op.time for op in heals]
    for target, (since, start) in opened.items():
        dead[instances[target]].append((since, ends[-1] if ends else math.inf, start))
    for op in lookups:
        if op.outcome != OK:
            continue
        for inst in op.value["ids"]:
            for since, until, fault in dead.get(inst, []):
                # the answer is from some instant of [time, end]: stale only if all of it
                # is past the bound and before the restart (which registers it anew)
                if since + bound < op.time and op.end < until:
                    result.flag(
                        "stale-instance",
                        f"registry{op.value['registry']} served {inst} {op.time - since:.1f} s "
                        f"after its registrant died (bound {bound:.1f} s)",
                        [fault, op],
                    )
    if not ends:
        result.flag("no-heal", "the run never healed", [])
        return result
    healed = heals[-1].end  # everything is healed and every daemon restarted
    expected = sorted(instances.values())
    times = []
    for peer in sorted({op.value["registry"] for op in lookups}):
        after = [op for op in lookups if op.value["registry"] == peer and op.time >= healed]
        ok = [op for op in after if op.outcome == OK]
        if not ok or ok[-1].value["ids"] != expected:
            shown = ok[-1].value["ids"] if ok else "nothing (no lookup answered)"
            result.flag(
                "not-converged",
                f"registry{peer}'s last view is {shown}, not {expected}",
                ok[-1:] or after[-1:],
            )
            continue
        i = len(ok) - 1
        while i > 0 and ok[i - 1].value["ids"] == expected:
            i -= 1
        # converged as soon as the first of the final run of full views answered
        times.append(max(0.0, min(op.end for op in ok[i:]) - healed))
    result.stats["convergence_s"] = times
    result.stats["convergence"] = {
        "p50": percentile(times, 50), "p99": percentile(times, 99),
        "max": max(times) if times else math.nan,
    }  # fmt: skip
    return result


# -- eda-lb -------------------------------------------------------------------------------
def check_lb(history: Sequence[Op]) -> Result:
    """Per call: every request answered at most once, in input order, by one of the
    workers, or reported (``request N failed``, ``input from line N on not sent``, or
    exit 3 before anything was sent); a reply only from an instance the caller sent
    that request to (``eda-lb call -v``: ``request N sent to ENDPOINT``); the caller ends."""
    result = Result("lb")
    calls = _of(history, "lb", "call")
    _count(result, calls)
    setup = _of(history, "lb", "setup")
    workers = set(setup[-1].value["workers"]) if setup else set()
    host_of = setup[-1].value["hosts"] if setup else {}
    for op in calls:
        v = op.value
        index = {r: i for i, r in enumerate(v["requests"], 1)}
        answered: list[int] = []
        for line in v["replies"]:
            body, _, worker = line.rpartition(" ")
            if body not in index or worker not in workers:
                result.flag("phantom-reply", f"reply {line!r} answers no request sent", [op])
                continue
            answered.append(index[body])
            went = v.get("sent", {}).get(str(index[body]), [])
            if host_of.get(worker) not in went:
                result.flag(
                    "reply-from-elsewhere",
                    f"request {index[body]} answered by {worker} ({host_of.get(worker)}), "
                    f"sent only to {went or 'no instance'}",
                    [op],
                )
        for i, n in sorted(Counter(answered).items()):
            if n > 1:
                result.flag("duplicate-reply", f"request {i} answered {n} times", [op])
        if answered != sorted(answered):
            result.flag("out-of-order", f"replies in the order {answered}", [op])
        if v["rc"] == -1:
            result.flag("hung", f"the caller did not end: {v['stderr']}", [op])
            continue
        # a call that failed as a whole before any reply (exit 3: no instance; exit 1 with
        # one error line, e.g. no registry answered) reports every request as not done
        whole = v["rc"] != 0 and not answered and not v["failed"]
        unsent = v["unsent_from"] or (1 if whole else None)
        for i in range(1, len(v["requests"]) + 1):
            reported = i in v["failed"] or (unsent is not None and i >= unsent)
            if i not in answered and not reported:
                result.flag("unanswered", f"request {i} neither answered nor reported", [op])
            if i in answered and i in v["failed"]:
                result.flag("answered-and-failed", f"request {i} answered and reported", [op])
        if v["rc"] == 0 and sorted(answered) != list(range(1, len(v["requests"]) + 1)):
            result.flag("exit-0-incomplete", "exit 0 without every reply", [op])
    return result


# -- eda-txn ------------------------------------------------------------------------------
def check_txn(history: Sequence[Op]) -> Result:
    """2PC transfers: both accounts of a transfer hold it as done or neither does (every
    participant agrees), each once and for its amount; the bank total is conserved; no
    account is negative; none is still held (in doubt) after the recovery window; and
    what a client was told (committed, aborted) is what the accounts show.
    Sagas: each ends completed (every step's action, no compensation) or compensated
    (every action undone), never half, and as its client was told."""
    result = Result("txn")
    transfers = _of(history, "txn", "transfer")
    sagas = _of(history, "txn", "saga")
    _count(result, [*transfers, *sagas])
    accounts = _of(history, "txn", "account")
    if not accounts:
        result.flag("no-final-read", "the accounts were not read after the recovery", [])
        return result
    by_ref = {op.value["ref"]: op for op in transfers}
    # txn id -> account -> (state, record)
    seen: dict[str, dict[str, tuple[str, dict[str, Any]]]] = defaultdict(dict)
    opening = total = 0
    held_any = False
    for op in accounts:
        v = op.value
        balance = v["initial"] + sum(r["delta"] for r in v["done"].values())
        opening += v["initial"]
        total += balance
        if balance < 0:
            result.flag("negative", f"{v['account']} ends at {balance}", [op])
        for txn, rec in v["held"].items():
            held_any = True
            shown = [op, by_ref[rec["ref"]]] if rec["ref"] in by_ref else [op]
            result.flag("in-doubt", f"{v['account']} still holds {txn} ({rec['ref']})", shown)
        for state in ("held", "done"):
            for txn, rec in v[state].items():
                seen[txn][v["account"]] = (state, rec)
    result.stats["bank_total"] = {"opening": opening, "closing": total}
    if total != opening and not held_any:
        result.flag("not-conserved", f"the bank holds {total}, not {opening}", accounts)
    refs: Counter[str] = Counter()
    for txn, where in sorted(seen.items()):
        ref = next(iter(where.values()))[1]["ref"]
        transfer = by_ref.get(ref)
        if transfer is None:
            result.flag("phantom", f"{txn} ({ref!r}) is in the accounts but was never asked",
                        accounts)  # fmt: skip
            continue
        t = transfer.value
        expect = {t["from"]: -t["amount"], t["to"]: t["amount"]}
        done = {a for a, (state, _) in where.items() if state == "done"}
        if done:
            refs[ref] += 1
        for account, (_, rec) in where.items():
            if expect.get(account) != rec["delta"]:
                result.flag("wrong-amount", f"{txn} moved {rec['delta']} at {account}, "
                            f"not {expect.get(account)}", [transfer])  # fmt: skip
        if done and done != set(expect) and not any(s == "held" for s, _ in where.values()):
            result.flag("disagree", f"{txn} ({ref}) is done at {sorted(done)} only, "
                        f"not at {sorted(set(expect) - done)}", [transfer])  # fmt: skip
        if t["outcome"] == "aborted" and done:
            result.flag("aborted-applied", f"{txn} was reported aborted, done at "
                        f"{sorted(done)}", [transfer])  # fmt: skip
    for ref, n in refs.items():
        if n > 1:
            result.flag("duplicate", f"transfer {ref} applied as {n} transactions", [by_ref[ref]])
    for op in transfers:
        t = op.value
        if t["outcome"] == "committed" and {
            a for a, (s, _) in seen.get(t["txn"], {}).items() if s == "done"
        } != {t["from"], t["to"]}:
            result.flag("committed-lost", f"{t['txn']} ({t['ref']}) was reported committed, "
                        "not done at both accounts", [op])  # fmt: skip
    result.stats["transfers"] = dict(Counter(op.value["outcome"] or "unknown" for op in transfers))
    _check_sagas(result, history, sagas)
    return result


def _check_sagas(result: Result, history: Sequence[Op], sagas: Sequence[Op]) -> None:
    """Sagas against their effects: markers SAGA.STEP.PHASE.N, one per action or
    compensation a step's service ran."""
    effects = _of(history, "txn", "effects")
    if not sagas:
        return
    if not effects:
        result.flag("no-final-read", "the sagas' effects were not read", [])
        return
    ran: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for marker in effects[-1].value:
        parts = marker.rsplit(".", 3)
        if len(parts) == 4:
            ran[parts[0]].add((parts[1], parts[2]))
    last: dict[str, Op] = {}
    for op in sagas:
        last[op.value["saga"]] = op  # a resume comes after the run it continues
    steps = sorted({step for done in ran.values() for step, _ in done} | {"debit", "credit"})
    ends: Counter[str] = Counter()
    for sid, op in sorted(last.items()):
        done = ran.get(sid, set())
        applied = {s for s in steps if (s, "action") in done}
        undone = {s for s in steps if (s, "compensate") in done}
        if undone - applied:
            result.flag("phantom-compensation", f"saga {sid} compensated {sorted(undone - applied)}"
                        " which never ran", [op])  # fmt: skip
        if applied == set(steps) and not undone:
            end = "completed"
        elif applied <= undone:
            end = "compensated"
        else:
            end = "half"
            result.flag("saga-half", f"saga {sid} ran {sorted(applied)} and undid "
                        f"{sorted(undone)}", [op])  # fmt: skip
        ends[end] += 1
        told = {0: "completed", 5: "compensated"}.get(op.value["rc"])
        if told is None:
            result.flag("saga-unfinished", f"saga {sid} did not end (exit {op.value['rc']}: "
                        f"{op.value['stderr']})", [op])  # fmt: skip
        elif told != end and end != "half":
            result.flag("saga-misreported", f"saga {sid} exited {told}, its effects say {end}",
                        [op])  # fmt: skip
    result.stats["sagas"] = dict(ends)


CHECKERS = (check_bus, check_nats, check_pubsub, check_registry, check_lb, check_txn)


def check_harness(history: Sequence[Op]) -> Result:
    """The harness's own errors (a client loop that died, a final read that raised):
    the run did not check what it claims, which counts as an anomaly too."""
    result = Result("harness")
    for op in _of(history, "harness", "error"):
        result.flag("harness-error", f"{op.process}: {op.value}", [op])
    return result


def check_all(history: Sequence[Op]) -> list[Result]:
    subjects = {op.subject for op in history}
    results = [c(history) for c in CHECKERS if c.__name__.removeprefix("check_") in subjects]
    harness = check_harness(history)
    return [*results, harness] if harness.anomalies else results


__all__ = ["FAIL", "Anomaly", "Result", "check_all"]
