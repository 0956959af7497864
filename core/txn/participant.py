"""A 2PC participant: votes, remembers its vote durably, applies the outcome, asks when in doubt.

Its journal (``participant-NAME.jsonl`` in the log directory) holds one
record per change of a transaction, the last one wins::

    {"txn": "c1.18f...", "state": "prepared", "data": {...}, "coordinator": "c1",
     "reply_to": "tcp://10.0.0.5:7730", "time": 1764290000.1}
    {"txn": "c1.18f...", "state": "committed", "time": 1764290000.2}

States: ``prepared`` (voted yes: in doubt until the outcome is known),
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
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from ..daemon import Daemon
from ..errors import EdaError, NotFoundError
from ..reqrep import ProtocolError
from . import crash
from .actions import ABORT, COMMIT, PREPARE, Actions, Call, Result
from .compact import COMPACT_MIN, Finished
from .journal import JournalError, open_journal
from .protocol import (
    BatchService,
    Log,
    Lookups,
    Peers,
    TxnError,
    check_data,
    check_name,
    check_outcome,
    check_reply_to,
    check_txn,
    owner_of,
    printable,
)

PREPARED = "prepared"
IN_DOUBT = {PREPARED, "heuristic-commit", "heuristic-abort"}
FINAL = {"committed", "aborted", "hazard"}
KEPT = 100_000  # finished transactions remembered (older ones: see compact.py)
MAX_LIVE = 10_000  # unfinished transactions; a prepare beyond is refused (a no vote)
DONE = {COMMIT: "committed", ABORT: "aborted"}
ROLE = "participant"


def journal_path(log_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(log_dir) / f"participant-{name}.jsonl"


def replay(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Transactions by id, each the merge of its records (later fields win)."""
    txns: dict[str, dict[str, Any]] = {}
    for record in records:
        txn = record.get("txn")
        if isinstance(txn, str):
            txns.setdefault(txn, {}).update(record)
    return txns


def _quiet(_message: str) -> None:
    pass


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
        log: Log = _quiet,
        warn: Log | None = None,
        interface: str | None = None,
    ) -> None:
        super().__init__(log, warn, interface=interface)
        self.name = check_name(name, "participant name")
        self.actions = actions
        self.inquire_after = inquire_after
        self.inquire_timeout = inquire_timeout
        # name -> endpoints, when the recorded one fails; looked up off the loop
        self.coordinators = Lookups(find_coordinator, ttl=5.0) if find_coordinator else None
        self.txns: dict[str, dict[str, Any]] = {}  # live: not finished
        self.finished = Finished(kept)
        self.max_live = max_live
        self.started: dict[str, Any] = {}  # this process's start record (with its endpoint)
        self.journal = open_journal(journal_path(log_dir, name), self._load)
        if self.journal.repaired:
            self.warn(f"warning: cut a torn tail of {self.journal.repaired} bytes off the journal")
        self._compact()
        now = time.monotonic()
        self.since = {t: now for t, r in self.txns.items() if r.get("state") in IN_DOUBT}
        self.attempts: dict[tuple[str, str], int] = {}  # (txn, phase) -> runs so far
        self.retry: dict[str, float] = {}  # txn -> when to run its pending action again
        self.asking: dict[str, tuple[Any, int, float]] = {}
        self.unanswered: set[str] = set()
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
        # an ack may wait a moment for the next prepare: one fsync for both
        self.service.lazy = lambda reply: reply.get("done") is True
        self.ready: dict[tuple[str, str], Result] = {}  # results of actions run ahead
        self.endpoint = self.bind(self.service.sock, bind)
        if self.coordinators is not None:
            self.coordinators.attach(self, lambda _names: None)  # used at the next inquiry
        self.peers = Peers(self)
        for txn, record in self.txns.items():
            if record.get("state") in ("committing", "aborting"):
                self.retry[txn] = now
        self.started = {"participant": self.name, "endpoint": local(self.endpoint),
                        "pid": os.getpid(), "started": time.time()}  # fmt: skip
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
            kept = self.journal.compact([*head, *started], _nothing, self.txns.__contains__)
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
        live.update(record)
        if state in IN_DOUBT:
            self.since.setdefault(txn, time.monotonic())
        else:
            self.since.pop(txn, None)
            self.asking.pop(txn, None)
        if state in FINAL:  # finished: only a small record stays, for repeated messages
            del self.txns[txn]
            self.finished.add(txn, _final(txn, live))
        return live

    def _flush(self) -> None:
        self.journal.sync()
        if self._voted:
            self._voted = False
            crash.point(ROLE, "after-vote-logged")
        if self._acked:
            self._acked = False
            crash.point(ROLE, "before-ack")
        self._compact()

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
            if op == "prepare" and record is None and len(self.txns) + len(calls) < self.max_live:
                try:
                    data = check_data(msg.get("data", {}))
                    if check_name(msg.get("coordinator"), "coordinator name") != owner_of(txn):
                        continue
                    check_reply_to(msg.get("reply_to", ""))
                except EdaError:
                    continue
                calls.append(Call(PREPARE, txn, data, 1))
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
        busy = len(self.txns) >= self.max_live and (txn, PREPARE) not in self.ready
        if known is None and busy:  # a flood of prepares (none run ahead for this one)
            raise TxnError(f"busy: {len(self.txns)} transactions unfinished at {self.name}")
        if known is not None:  # a repeated prepare: the same vote, nothing run again
            state = known.get("state")
            yes = state in IN_DOUBT or state == "committed" or state == "committing"
            return {"vote": "yes" if yes else "no", "reason": "" if yes else f"already {state}"}
        result = self._run(PREPARE, txn, data)
        crash.point(ROLE, "before-vote-logged")
        if result.ok:
            self._record(txn, PREPARED, data=data, coordinator=coordinator, reply_to=reply_to)
            self._voted = True
            return {"vote": "yes"}
        # a no vote aborts here and now: release whatever the prepare may have left
        self._record(txn, "aborting", data=data, coordinator=coordinator, vote="no")
        self._apply(txn, ABORT)
        return {"vote": "no", "reason": printable(result.reason)}

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
        if record.get("vote") == "no" and outcome == COMMIT:
            raise TxnError(f"{self.name} voted no on {txn}: it cannot commit")
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
        """An operator's heuristic decision on an in-doubt transaction."""
        txn = check_txn(req.get("txn"))
        outcome = check_outcome(req.get("outcome"))
        record = self._known(txn)
        if record is None:
            raise NotFoundError(f"no transaction {txn} at participant {self.name}")
        if record.get("state") != PREPARED:
            raise TxnError(f"transaction {txn} is not in doubt here: it is {record.get('state')}")
        result = self._apply(txn, outcome, final=f"heuristic-{outcome}")
        if not result.ok:
            raise TxnError(f"{outcome} of {txn} failed: {result.reason}")
        return {"txn": txn, "state": self.txns[txn]["state"], "participant": self.name}

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

    # -- in doubt ---------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        for txn, due in list(self.retry.items())[:100]:
            if now >= due and txn in self.txns:
                state = self.txns[txn].get("state")
                self._apply(txn, COMMIT if state == "committing" else ABORT)
        asked = 0
        found: dict[str, list[str]] = {}  # coordinators looked up this tick: once each
        for txn, since in list(self.since.items()):
            if asked >= 200 or now - since < self.inquire_after:
                continue
            pending = self.asking.get(txn)
            if pending is not None:
                if now - pending[2] < self.inquire_timeout:
                    continue
                pending[0].forget(pending[1])
                self._unanswered(txn)
            self._inquire(txn, now, found if pending is not None else None)
            asked += 1

    def _inquire(self, txn: str, now: float, found: dict[str, list[str]] | None) -> None:
        """Ask the coordinator of *txn*; with *found*, one found anew by name if it
        was silent (the recorded endpoint may be gone: a coordinator that moved)."""
        record = self.txns[txn]
        endpoint = record.get("reply_to")
        name = str(record.get("coordinator"))
        if found is not None and self.coordinators is not None:
            if name not in found:
                found[name] = self.coordinators.get(name) or []  # [] while being looked up
            others = [e for e in found[name] if e != endpoint]
            endpoint = others[0] if others else endpoint
        if not isinstance(endpoint, str):
            return
        try:
            peer = self.peers.get(endpoint)
        except EdaError as exc:  # a journal written before reply_to was checked this strictly
            self.limited("inquire", f"cannot ask about {txn}: {exc}")
            self.asking[txn] = (_NOBODY, 0, now)  # asked again after inquire_timeout
            return
        rid = peer.ask({"op": "outcome", "txn": txn}, functools.partial(self._answered, txn))
        self.asking[txn] = (peer, rid, now)

    def _unanswered(self, txn: str) -> None:
        if txn in self.unanswered:
            return
        self.unanswered.add(txn)
        record = self.txns[txn]
        note = f"in doubt: coordinator {record.get('coordinator')} does not answer"
        self.journal.write({"txn": txn, "in_doubt": note, "time": round(time.time(), 3)})
        record["in_doubt"] = note
        self.warn(f"warning: {txn} {note}")

    def _answered(self, txn: str, reply: dict[str, Any] | None) -> None:
        self.asking.pop(txn, None)
        if reply is None or txn not in self.txns or txn not in self.since:
            return
        outcome = reply.get("outcome")
        if not reply.get("ok") or outcome not in (COMMIT, ABORT):
            return  # pending, or refused: ask again later
        self.unanswered.discard(txn)
        try:
            self.settle(txn, outcome)
        finally:
            self.journal.sync()

    def close(self) -> None:
        try:
            self.actions.close()
            if self.coordinators is not None:
                self.coordinators.close()
            self.journal.close()  # last: a disk still full raises, the rest is closed
        finally:
            super().close()


class _Nobody:
    """Stands for a peer that could not be made (nothing to forget)."""

    def forget(self, rid: int) -> None:
        pass


_NOBODY = _Nobody()


def _nothing(_record: dict[str, Any]) -> bool:
    return False


def _final(txn: str, record: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a finished transaction."""
    keep = {"txn": txn, "state": record.get("state"), "time": record.get("time")}
    if "heuristic" in record:
        keep["heuristic"] = record["heuristic"]
    return keep


def local(endpoint: str) -> str:
    """A bound endpoint as a local client connects to it (``*``/0.0.0.0 -> 127.0.0.1)."""
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
