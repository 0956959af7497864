"""A 2PC participant: votes, remembers its vote durably, applies the outcome, asks when in doubt.

Its journal (``participant-NAME.jsonl`` in the log directory) holds one
record per change of a transaction, the last one wins::

    {"txn": "c1.18f...", "state": "prepared", "data": {...}, "coordinator": "c1",
     "reply_to": "tcp://10.0.0.5:7730", "time": 1764290000.1}
    {"txn": "c1.18f...", "state": "committed", "time": 1764290000.2}

States: ``preparing`` (the prepare action was started: fsynced before it runs, so
that a crash before the vote leaves a trace; on restart such a transaction is
aborted here, its abort action run, since no yes vote was ever sent),
``prepared`` (voted yes: in doubt until the outcome is known),
``committing``/``aborting`` (outcome known, action not yet done),
``committed``/``aborted`` (done), ``heuristic-commit``/``heuristic-abort``
(an operator's ``resolve`` applied while in doubt) and ``hazard`` (the
coordinator's outcome contradicted the operator's).

A yes vote is fsynced before it is sent; an ack (``done``) only after the
final record is fsynced.  Finished transactions are kept in memory as a
small record, the last *kept* of them (:mod:`.compact`); a journal mostly
made of forgotten ones is compacted, on start and while running (every record
of an unfinished transaction is kept, whatever its state).  A journal that
cannot be written (disk full) sends no vote and no ack until it can.
Requests drained together share one fsync.  A
transaction prepared for longer than *inquire_after* seconds asks its
coordinator for the outcome, again and again; while no coordinator answers
it stays in doubt, which the journal and ``eda-txn status`` show.

Presumed abort, from this side: a participant that voted yes aborts on its
own only when the coordinator named by the transaction answers that it never
decided it (the coordinator presumes abort for its own ids only, and it
alone holds the journal where a commit would be).  Silence, a refused
connection, another coordinator at the recorded endpoint, or a name that
discovery does not find prove nothing: a crashed coordinator vanishes from
the registry and from mDNS too, with its commit decision on its disk.  So
forged prepares that name a coordinator that never existed stay in doubt;
what bounds them is *max_per_coordinator* (unfinished transactions of one
coordinator name: the others are served on) and what ends them is one
``resolve`` with a filter (``eda-txn resolve --abort --coordinator NAME``).

Where the rest lives: asking coordinators about transactions in doubt is
:mod:`.indoubt`; the ``resolve`` filter, like every other message, is in
:mod:`.protocol`.  This module (about 550 lines) is the life of a transaction
at one participant, its journal, vote and outcome, kept together because
each step reads the state the previous one recorded.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .. import security
from ..daemon import Daemon
from ..errors import EdaError, NotFoundError, ProtocolError
from . import crash, roles
from .actions import ABORT, COMMIT, PREPARE, Actions, Call, Result
from .compact import COMPACT_MIN, Finished
from .indoubt import InDoubt
from .journal import JournalError, nothing
from .protocol import (
    ACK_LINGER,
    PREPARED,
    Filter,
    Log,
    TxnError,
    check_data,
    check_name,
    check_outcome,
    check_reply_to,
    check_txn,
    owner_of,
    printable,
    quiet,
)
from .service import BatchService

PREPARING = "preparing"
IN_DOUBT = {PREPARED, "heuristic-commit", "heuristic-abort"}
# what a participant still owes work or a vote's outcome on: bounded (a heuristic one is
# settled here and only waits to compare with the coordinator's outcome)
OPEN = {PREPARING, PREPARED, "committing", "aborting"}
FINAL = {"committed", "aborted", "hazard"}
KEPT = 100_000  # finished transactions remembered (older ones: see compact.py)
MAX_LIVE = 10_000  # unfinished transactions; a prepare beyond is refused (a no vote)
MAX_PER_COORDINATOR = 1_000  # unfinished transactions of one coordinator name (ditto)
DONE = {COMMIT: "committed", ABORT: "aborted"}
ROLE = "participant"


def journal_path(log_dir: str | os.PathLike[str], name: str) -> Path:
    return roles.journal_path(ROLE, log_dir, name)


def replay(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Transactions by id, each the merge of its records (later fields win)."""
    txns: dict[str, dict[str, Any]] = {}
    for record in records:
        txn = record.get("txn")
        if isinstance(txn, str):
            txns.setdefault(txn, {}).update(record)
    return txns


class Participant(Daemon):
    """Serves ``prepare``, ``decide`` and ``resolve`` for participant *name*."""

    def __init__(
        self,
        name: str,
        actions: Actions,
        log_dir: str | os.PathLike[str],
        *,
        bind: str = "tcp://127.0.0.1:*",
        inquire_after: float = 2.0,
        inquire_timeout: float = 1.0,
        find_coordinator: Any = None,
        kept: int = KEPT,
        max_live: int = MAX_LIVE,
        max_per_coordinator: int = MAX_PER_COORDINATOR,
        log: Log = quiet,
        warn: Log | None = None,
        interface: str | None = None,
        remember: bool = False,
    ) -> None:
        """*remember*: a port bound as ``*`` is the one remembered in *log_dir*
        (:mod:`.roles`), where coordinators last found it."""
        super().__init__(log, warn, interface=interface)
        self.name = check_name(name, "participant name")
        self.actions = actions
        self.txns: dict[str, dict[str, Any]] = {}  # live: not finished
        self.finished = Finished(kept)
        self.max_live = max_live
        self.max_per_coordinator = max_per_coordinator
        self.live_of: dict[str, int] = {}  # coordinator name -> its open transactions here
        self.open = 0  # open transactions (see OPEN): at most max_live
        self.started: dict[str, Any] = {}  # this process's start record (with its endpoint)
        self.journal = roles.open_role_journal(self, ROLE, log_dir, name, self._load)
        self._compact()
        for txn, record in self.txns.items():
            if record.get("state") in OPEN:
                self._count(txn, 1)
        now = time.monotonic()
        self.attempts: dict[tuple[str, str], int] = {}  # (txn, phase) -> runs so far
        self.retry: dict[str, float] = {}  # txn -> when to run its pending action again
        self.hazards = 0
        self._voted = self._acked = False
        self.service = BatchService(
            self,
            {
                "prepare": self.prepare,
                "decide": self.decide,
                "resolve": self.resolve,
                "stats": self.stats,
            },
            flush=self._flush,
        )
        self.service.ahead = self._look_ahead
        # an ack waits for the next fsync (a prepare's, a vote's) to share, up to ACK_LINGER
        self.service.lazy = lambda reply: reply.get("done") is True
        self.service.linger = ACK_LINGER
        # a batch's votes wait for the next batch's "preparing" fsync when it is there already
        self.service.carry = True
        self.ready: dict[tuple[str, str], Result] = {}  # results of actions run ahead
        sock = self.service.sock
        self.endpoint = roles.bind_role(self, sock, ROLE, log_dir, name, bind, remember)
        self.in_doubt = InDoubt(
            self,
            [t for t, r in self.txns.items() if r.get("state") in IN_DOUBT],
            inquire_after=inquire_after,
            inquire_timeout=inquire_timeout,
            find_coordinator=find_coordinator,
        )
        cut = [t for t, r in self.txns.items() if r.get("state") == PREPARING]
        for txn in cut:  # cut short before any vote: nobody was promised anything, undo it
            self._record(txn, "aborting", note="prepare cut short by a crash, no vote sent")
        if cut:
            self.warn(
                f"warning: {len(cut)} prepare(s) cut short by a crash ({cut[0]}"
                f"{', ...' if len(cut) > 1 else ''}): aborting them"
            )
        for txn, record in self.txns.items():
            if record.get("state") in ("committing", "aborting"):
                self.retry[txn] = now
        self.started = {"participant": self.name, "endpoint": local(self.endpoint),
                        "pid": os.getpid(), "started": time.time()}  # fmt: skip
        secure = security.active()
        if secure is not None:  # eda-txn resolve pins it (when it trusts it)
            self.started["key"] = secure.public_key
        self.journal.write(self.started)
        self.every(min(0.5, inquire_after / 2), "in-doubt transactions", self._tick)
        self.every(0.2, "journal", self._sync_journal)

    # -- the journal ------------------------------------------------------------------------
    def _load(self, record: dict[str, Any]) -> None:
        """One record of the journal, read on start (stream-wise: memory holds the
        live and remembered transactions, not the file)."""
        mark = record.get("forgotten_before")
        if isinstance(mark, int) and mark > self.finished.forgotten_before:
            self.finished.forgotten_before = mark
        txn = record.get("txn")
        if not isinstance(txn, str):
            return
        merged = self.txns.pop(txn, None) or self.finished.pop(txn, None) or {}
        merged.update(record)
        if merged.get("state") in FINAL:
            self.finished.add(txn, _final(txn, merged))
        else:
            self.txns[txn] = merged

    def _compact(self) -> None:
        """A new journal segment when the journal is mostly forgotten transactions:
        every record of an unfinished transaction, a small one per remembered one."""
        count = self.journal.count
        if count <= COMPACT_MIN or count <= 2 * (len(self.txns) + len(self.finished)):
            return
        started = [self.started] if self.started else []
        head = [{"forgotten_before": self.finished.forgotten_before}, *self.finished.values()]
        try:
            # every record of an unfinished transaction; the rest is in the head
            kept = self.journal.compact([*head, *started], nothing, self.txns.__contains__)
        except JournalError as exc:
            self.limited("journal", f"warning: {exc}; it goes on in the old segment")
            return
        self.log(f"journal compacted: {count} records -> {kept}")

    def _sync_journal(self) -> None:
        self.journal.sync()  # a failure is warned by the loop; the records stay buffered
        self._compact()

    def _known(self, txn: str) -> dict[str, Any] | None:
        return self.txns.get(txn) or self.finished.get(txn)

    def _record(self, txn: str, state: str, **fields: Any) -> dict[str, Any]:
        record = {"txn": txn, "state": state, **fields, "time": round(time.time(), 3)}
        self.journal.append(record)
        live = self.txns.setdefault(txn, {})
        was_open = live.get("state") in OPEN
        live.update(record)
        if was_open != (state in OPEN):
            self._count(txn, -1 if was_open else 1)
        if state in IN_DOUBT:
            self.in_doubt.entered(txn)
        else:
            self.in_doubt.left(txn, finished=state in FINAL)
        if state in FINAL:  # finished: only a small record stays, for repeated messages
            del self.txns[txn]
            self.finished.add(txn, _final(txn, live))
        return live

    def _count(self, txn: str, change: int) -> None:
        """*txn* became open (+1) or stopped being open (-1)."""
        owner = owner_of(txn)
        left = self.live_of.get(owner, 0) + change
        if left > 0:
            self.live_of[owner] = left
        else:
            self.live_of.pop(owner, None)
        self.open += change

    def _flush(self) -> None:
        self.journal.sync()
        self._durable()
        self._compact()

    def _durable(self) -> None:
        """The journal was just synced: the votes and acks recorded are on disk."""
        if self._voted:
            self._voted = False
            crash.point(ROLE, "after-vote-logged")
        if self._acked:
            self._acked = False
            crash.point(ROLE, "before-ack")

    def _sync_first(self) -> None:
        """Sync the journal before an action runs (its "preparing" mark); the replies
        waiting (the last batch's, carried over) are durable with it: they go now."""
        self.journal.sync()
        self._durable()
        self.service.send_durable()

    # -- actions ----------------------------------------------------------------------------
    def _run(self, phase: str, txn: str, data: dict[str, Any]) -> Result:
        key = (txn, phase)
        ready = self.ready.pop(key, None)
        if ready is not None:
            return ready
        attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.actions.run(Call(phase, txn, data, attempt))

    def _look_ahead(self, messages: list[list[bytes]]) -> None:
        """Run at once the actions a batch of requests will certainly need (an agent
        then gets them as one pipeline); the handlers find the results ready."""
        self.ready.clear()
        calls: list[Call] = []
        seen: set[str] = set()
        starting: list[tuple[str, dict[str, Any]]] = []  # preparing records to write first
        planned: dict[str, int] = {}  # prepares of this batch per coordinator
        for frames in messages:
            try:
                msg = json.loads(frames[-1])
                op, txn = msg.get("op"), check_txn(msg.get("txn"))
            except (ValueError, UnicodeDecodeError, RecursionError, AttributeError, EdaError):
                continue
            if op not in ("prepare", "decide"):
                return  # a resolve may change what a decide does: no running ahead
            if txn in seen:
                continue
            seen.add(txn)
            record = self._known(txn)
            if op == "prepare" and record is None and self.open + len(calls) < self.max_live:
                try:
                    data = check_data(msg.get("data", {}))
                    coordinator = check_name(msg.get("coordinator"), "coordinator name")
                    if coordinator != owner_of(txn):
                        continue
                    reply_to = check_reply_to(msg.get("reply_to", ""))
                except EdaError:
                    continue
                if self._crowded(coordinator, planned.get(coordinator, 0)):
                    continue
                planned[coordinator] = planned.get(coordinator, 0) + 1
                calls.append(Call(PREPARE, txn, data, 1))
                starting.append(
                    (txn, {"data": data, "coordinator": coordinator, "reply_to": reply_to})
                )
            elif (
                op == "decide"
                and record is not None
                and record.get("state") == PREPARED
                and msg.get("outcome") in (COMMIT, ABORT)
                and "heuristic" not in record
            ):
                calls.append(Call(msg["outcome"], txn, record.get("data") or {}, 1))
        if len(calls) < 2:
            return
        for txn, fields in starting:
            self._record(txn, PREPARING, **fields, since=round(time.time(), 3))
        if starting:  # (commit and abort actions need nothing synced first: acks wait on)
            self._sync_first()  # one fsync: every prepare of the batch leaves a trace first
        if any(call.phase != PREPARE for call in calls):
            crash.point(ROLE, "before-apply")  # where the handler would have reached it
        for call in calls:
            key = (call.txn, call.phase)
            call.attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        for call, result in zip(calls, self.actions.run_many(calls), strict=True):
            self.ready[(call.txn, call.phase)] = result

    def _apply(self, txn: str, outcome: str, final: str | None = None) -> Result:
        """Run the commit or abort action; record *final* (default committed/aborted) when done."""
        record = self.txns[txn]
        result = self._run(outcome, txn, record.get("data") or {})
        if result.ok:
            self.attempts.pop((txn, PREPARE), None)
            self.attempts.pop((txn, outcome), None)
            self.retry.pop(txn, None)
            extra = {"heuristic": outcome} if final and final.startswith("heuristic") else {}
            self._record(txn, final or DONE[outcome], **extra)
        else:
            pending = "committing" if outcome == COMMIT else "aborting"
            if final is None and record.get("state") != pending:
                self._record(txn, pending, error=printable(result.reason))
            n = self.attempts.get((txn, outcome), 1)
            if final is None:  # (an operator's resolve that failed is not retried on its own)
                self.retry[txn] = time.monotonic() + min(5.0, 0.05 * 2 ** min(n, 10))
            self.limited(f"action:{outcome}", f"{outcome} of {txn} failed: {result.reason}")
        return result

    # -- requests ---------------------------------------------------------------------------
    def prepare(self, req: dict[str, Any]) -> dict[str, Any]:
        txn = check_txn(req.get("txn"))
        data = check_data(req.get("data", {}))
        coordinator = check_name(req.get("coordinator"), "coordinator name")
        if owner_of(txn) != coordinator:  # ids are NAME.HEX, made by coordinator NAME
            raise ProtocolError(f"transaction {txn} does not belong to coordinator {coordinator}")
        reply_to = check_reply_to(req.get("reply_to", ""))
        known = self._known(txn)
        if known is not None and known.get("state") != PREPARING:
            # a repeated prepare: the same vote, nothing run again
            state = known.get("state")
            yes = state in IN_DOUBT or state == "committed" or state == "committing"
            return {"vote": "yes" if yes else "no", "reason": "" if yes else f"already {state}"}
        if known is None:  # (else the look-ahead recorded it and ran the action)
            if self.open >= self.max_live:  # a flood of prepares
                raise TxnError(f"busy: {self.open} transactions unfinished at {self.name}")
            if self._crowded(coordinator):  # a flood naming one coordinator: the others go on
                raise TxnError(
                    f"busy: {self.live_of.get(coordinator, 0)} transactions of coordinator "
                    f"{coordinator} unfinished at {self.name}"
                )
            self._record(txn, PREPARING, data=data, coordinator=coordinator, reply_to=reply_to,
                         since=round(time.time(), 3))  # fmt: skip
            self._sync_first()  # a crash from here on leaves a trace: the abort runs on restart
        result = self._run(PREPARE, txn, data)
        crash.point(ROLE, "before-vote-logged")
        if result.ok:
            # secure mode: the key the coordinator proved, to pin when asking it in doubt
            proven = {"coordinator_key": key} if (key := self.service.sender_key) else {}
            self._record(txn, PREPARED, **proven)
            self._voted = True
            return {"vote": "yes"}
        # a no vote aborts here and now: release whatever the prepare may have left
        self._record(txn, "aborting", vote="no")
        self._apply(txn, ABORT)
        return {"vote": "no", "reason": printable(result.reason)}

    def _crowded(self, coordinator: str, more: int = 0) -> bool:
        """Whether *coordinator* has its full share of unfinished transactions here."""
        return self.live_of.get(coordinator, 0) + more >= self.max_per_coordinator

    def decide(self, req: dict[str, Any]) -> dict[str, Any]:
        txn = check_txn(req.get("txn"))
        outcome = check_outcome(req.get("outcome"))
        if self._known(txn) is None:
            if outcome == COMMIT and self.finished.forgotten(txn):
                return {"done": True, "forgotten": True}  # finished here long ago
            if outcome == ABORT:  # no vote logged: a prepare cut short by a crash may have run
                self._record(txn, "aborting", data={}, note="no vote logged")
                if not self._apply(txn, ABORT).ok:
                    raise TxnError(f"abort of {txn} failed")
                self._acked = True
                return {"done": True}
            raise NotFoundError(f"transaction {txn} was never prepared by {self.name}")
        reply = self.settle(txn, outcome)
        self._acked = True
        return reply

    def settle(self, txn: str, outcome: str) -> dict[str, Any]:
        """Apply the coordinator's *outcome* to *txn*; a contradicted heuristic is a hazard."""
        record = self._known(txn)
        assert record is not None
        state = record.get("state")
        if state == "hazard":
            return {"done": True, "hazard": True}
        heuristic = record.get("heuristic")
        if state in ("committed", "aborted") and heuristic is None:
            if state != DONE[outcome]:
                raise TxnError(f"transaction {txn} is already {state} here")
            return {"done": True}
        if heuristic is not None:
            if heuristic == outcome:
                if state != DONE[outcome]:
                    self._record(txn, DONE[outcome], heuristic=heuristic)
                return {"done": True}
            self._record(txn, "hazard", heuristic=heuristic, outcome=outcome)
            self.hazards += 1
            self.warn(
                f"warning: heuristic hazard: {txn} was resolved --{heuristic} by an operator "
                f"but its coordinator decided {outcome}"
            )
            return {"done": True, "hazard": True}
        if (record.get("vote") == "no" or state == PREPARING) and outcome == COMMIT:
            how = "voted no" if state != PREPARING else "has not voted"
            raise TxnError(f"{self.name} {how} on {txn}: it cannot commit")
        started = {"committing": COMMIT, "aborting": ABORT}.get(str(state))
        if started is not None and started != outcome:
            raise TxnError(f"transaction {txn} is already {state} here")
        due = self.retry.get(txn)
        if started is not None and due is not None and time.monotonic() < due:
            # failing, and backing off: a coordinator's repeated decide does not run it sooner
            n = self.attempts.get((txn, outcome), 0)
            raise TxnError(
                f"{outcome} of {txn} failed {n} times; next try in {due - time.monotonic():.1f}s"
            )
        if (txn, outcome) not in self.ready:  # else the look-ahead passed the point already
            crash.point(ROLE, "before-apply")
        result = self._apply(txn, outcome)
        if not result.ok:
            raise TxnError(f"{outcome} of {txn} failed: {result.reason}")
        return {"done": True}

    def resolve(self, req: dict[str, Any]) -> dict[str, Any]:
        """An operator's heuristic decision on an in-doubt transaction, or on every one
        a filter matches (see :meth:`resolve_matching`)."""
        outcome = check_outcome(req.get("outcome"))
        if req.get("txn") is None:
            return self.resolve_matching(outcome, Filter.from_request(req))
        txn = check_txn(req.get("txn"))
        record = self._known(txn)
        if record is None:
            raise NotFoundError(f"no transaction {txn} at participant {self.name}")
        if record.get("state") != PREPARED:
            raise TxnError(f"transaction {txn} is not in doubt here: it is {record.get('state')}")
        result = self._apply(txn, outcome, final=f"heuristic-{outcome}")
        if not result.ok:
            raise TxnError(f"{outcome} of {txn} failed: {result.reason}")
        return {"txn": txn, "state": self.txns[txn]["state"], "participant": self.name}

    def resolve_matching(self, outcome: str, where: Filter) -> dict[str, Any]:
        """Settle by hand up to *where.limit* in-doubt transactions that *where* matches
        (oldest first); ``more`` says how many others match (ask again)."""
        now = time.time()
        matching = [t for t, r in self.txns.items() if where.matches(t, r, now)]
        resolved: list[dict[str, str]] = []
        failed: list[dict[str, str]] = []
        for txn in matching[: where.limit]:
            result = self._apply(txn, outcome, final=f"heuristic-{outcome}")
            if result.ok:
                resolved.append({"txn": txn, "state": self.txns[txn]["state"]})
            else:
                failed.append({"txn": txn, "error": printable(result.reason, 200)})
        return {
            "participant": self.name,
            "resolved": resolved,
            "failed": failed,
            "more": max(0, len(matching) - where.limit),
        }

    def metrics(self) -> Any:
        """What --metrics exports (core/txn/metrics.py)."""
        from .metrics import participant_families

        return participant_families(self)

    def stats(self, _req: dict[str, Any]) -> dict[str, Any]:
        states: dict[str, int] = {}
        for record in [*self.txns.values(), *self.finished.values()]:
            state = str(record.get("state"))
            states[state] = states.get(state, 0) + 1
        return {
            "name": self.name,
            "states": states,
            "forgotten_before": self.finished.forgotten_before,
            "hazards": self.hazards,
            "fsyncs": self.journal.fsyncs,
            "malformed": self.malformed,
        }

    # -- pending actions, and the transactions in doubt ------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        for txn, due in list(self.retry.items())[:100]:
            if now >= due and txn in self.txns:
                state = self.txns[txn].get("state")
                self._apply(txn, COMMIT if state == "committing" else ABORT)
        self.in_doubt.inquire(now)

    def note_unanswered(self, txn: str, note: str) -> None:
        """Record that *txn*'s coordinator does not answer (a note: synced with the
        next batch, so a flood of them costs no fsync each)."""
        self.journal.append({"txn": txn, "in_doubt": note, "time": round(time.time(), 3)})
        self.txns[txn]["in_doubt"] = note
        self.warn(f"warning: {txn} {note}")

    def learned(self, txn: str, outcome: str) -> None:
        """The coordinator's *outcome* for in-doubt *txn*, from an inquiry."""
        try:
            self.settle(txn, outcome)
        finally:
            self.journal.sync()

    def close(self) -> None:
        roles.close(self, [self.actions, self.in_doubt, self.journal], super().close)


def _final(txn: str, record: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a finished transaction."""
    keep = {"txn": txn, "state": record.get("state"), "time": record.get("time")}
    if "heuristic" in record:
        keep["heuristic"] = record["heuristic"]
    return keep


def local(endpoint: str) -> str:
    """A bound endpoint as a local client connects to it (``*``/0.0.0.0 -> 127.0.0.1)."""
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
