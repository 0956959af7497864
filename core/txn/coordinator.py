"""The 2PC coordinator: collects votes, logs the decision durably, drives phase two to the end.

Presumed abort: nothing is logged before the decision.  A commit decision is
appended to the journal (``coordinator-NAME.jsonl``) and fsynced before any
participant hears of it; every commit decided in one turn of the poll loop
shares one fsync (group commit).  An abort is appended without waiting for
the disk: a transaction the journal does not know was aborted, so that is
what a participant asking about it hears.  Phase two is retried, with
backoff, until every participant acknowledged; then a ``done`` record lets a
restart skip it.  On start the journal is read and every decided transaction
not done is driven again; undecided ones were never logged: aborted.  The
last :data:`FINISHED_KEPT` finished transactions are remembered; when the
journal is mostly made of older ones, it is compacted (on start and while
running): a new segment keeps every record of the transactions not finished
and of the remembered ones, and the last :data:`FINISHED_KEPT` hazards.

A journal that cannot be written (disk full) decides nothing: the commits
whose record did not reach the disk are aborted (their participants told so),
and a new ``commit`` is refused with an error until a write succeeds again.

Records::

    {"txn": "c1.18f...", "state": "committed", "participants": {"stock": "tcp://..."}, ...}
    {"txn": "c1.18f...", "state": "aborted", "reason": "pay voted no: ...", ...}
    {"txn": "c1.18f...", "state": "done"}
    {"txn": "c1.18f...", "hazard": "stock", "heuristic": "abort"}   (reported by a participant)
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..daemon import Daemon
from ..errors import EdaError, NotFoundError
from . import crash, roles
from .compact import COMPACT_MIN
from .directory import Directory
from .journal import Journal, JournalError, nothing
from .peers import Peers
from .protocol import (
    ABORT,
    COMMIT,
    DEFER,
    PENDING,
    PHASE_TWO_RETRY,
    Log,
    TxnError,
    check_name,
    check_participants,
    check_timeout,
    check_txn,
    data_json,
    new_txn_id,
    owner_of,
    printable,
    quiet,
)
from .service import BatchService
from .transaction import ABORTED, COMMITTED, DECIDING, OUTCOME_OF, VOTING, Reply, Txn

ROLE = "coordinator"
FINISHED_KEPT = 10_000  # finished transactions remembered for repeated outcome queries
MAX_ACTIVE = 10_000  # transactions voting at once; a commit beyond is refused (busy)


def journal_path(log_dir: str | os.PathLike[str], name: str) -> Path:
    return roles.journal_path(ROLE, log_dir, name)


class Coordinator(Daemon):
    """Runs the transactions asked of it (``commit``) and answers ``outcome`` questions."""

    def __init__(
        self,
        name: str,
        log_dir: str | os.PathLike[str],
        *,
        directory: Directory | None = None,
        bind: str = "tcp://127.0.0.1:*",
        advertise: str | None = None,
        vote_timeout: float = 5.0,
        retry_max: float = 2.0,
        journal: Journal | None = None,
        max_active: int = MAX_ACTIVE,
        log: Log = quiet,
        warn: Log | None = None,
        interface: str | None = None,
        remember: bool = False,
    ) -> None:
        """*remember*: a port bound as ``*`` is the one remembered in *log_dir*
        (:mod:`.roles`), where commit clients and participants in doubt expect it."""
        super().__init__(log, warn, interface=interface)
        self.name = check_name(name, "coordinator name")
        self.directory = directory or Directory()
        self.vote_timeout = vote_timeout
        self.retry_max = retry_max
        self.finished: OrderedDict[str, str] = OrderedDict()
        self.hazard_records: deque[dict[str, Any]] = deque(maxlen=FINISHED_KEPT)
        decided: dict[str, dict[str, Any]] = {}  # read from the journal: not done yet
        fold = functools.partial(self._fold, decided)
        if journal is None:
            journal = roles.open_role_journal(self, ROLE, log_dir, name, fold)
        else:
            for record in journal.replay():
                fold(record)
            roles.repaired(self, journal)
        self.journal = journal
        self.max_active = max_active
        self.voting = 0  # transactions of self.active still voting
        self.active: dict[str, Txn] = {}
        self.looking: dict[str, list[Txn]] = {}  # participant name -> transactions waiting for it
        self.deciding: list[Txn] = []
        self.flush_due = False
        self.committed = self.aborted = 0
        self.service = BatchService(
            self,
            {"commit": self.commit, "outcome": self.outcome, "stats": self.stats},
            flush=lambda: None,
        )
        sock = self.service.sock
        self.endpoint = roles.bind_role(self, sock, ROLE, log_dir, name, bind, remember)
        self.advertise = advertise or self.endpoint.replace("0.0.0.0", "127.0.0.1")
        self.peers = Peers(self, roles=("participant", "coordinator"))
        self.directory.attach(self, self.found)
        self.recover(decided)
        self.every(0.05, "vote timeouts and phase two", self.retry)
        self.every(0.2, "journal", self.sync_journal)

    # -- transport (a test replaces it) -------------------------------------------------------
    def ask(self, txn: Txn, name: str, msg: bytes, callback: Callable[..., None]) -> None:
        """Send *msg* (a JSON object, encoded) to participant *name* of *txn*."""
        endpoint = txn.participants[name]
        assert endpoint is not None
        try:
            peer = self.peers.get(endpoint)
        except EdaError as exc:  # an endpoint zmq refuses (an odd announcement): a failed ask
            failed = {"ok": False, "error": str(exc), "unasked": True}
            self.after(0, "ask", lambda: callback(failed))
            return
        old = txn.asked.get(name)
        if old is not None:
            old[0].forget(old[1])
        txn.asked[name] = (peer, peer.ask(msg, callback))

    # -- recovery ----------------------------------------------------------------------------
    def _fold(self, decided: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
        """One record of the journal, read on start: the decisions not done yet go
        to *decided*, the done ones to :attr:`finished` (memory holds those, not
        the file)."""
        txn_id, state = record.get("txn"), record.get("state")
        if "hazard" in record:
            self.hazard_records.append(record)
        if not isinstance(txn_id, str) or state is None:
            return
        if state in (COMMITTED, ABORTED):
            if isinstance(record.get("participants"), dict):
                decided[txn_id] = record
        elif state == "done":
            decided.pop(txn_id, None)
            self._finished(txn_id, record.get("outcome"))

    def recover(self, decided: dict[str, dict[str, Any]]) -> None:
        """Drive again every transaction the journal shows decided and not done."""
        for txn_id, record in decided.items():
            state = record["state"]
            participants = record["participants"]
            txn = Txn(txn_id, participants, state=state)
            txn.reason = str(record.get("reason", ""))
            txn.acked = {n for n, e in participants.items() if e is None}
            self.active[txn_id] = txn
            self.log(f"recovering {txn_id}: {state}, phase two again")
        self.compact()

    # -- the journal -------------------------------------------------------------------------
    def sync_journal(self) -> None:
        """Make what was appended durable (aborts, done records), then compact if due."""
        failed = self.journal.failed
        try:
            self.journal.sync()
        except JournalError as exc:
            self.limited("journal", f"error: {exc}; nothing is decided until it can be written")
            return
        if failed is not None and self.journal.failed is None:
            self.warn(f"the journal {self.journal.path} can be written again: deciding again")
        self.compact()

    def compact(self) -> None:
        """A new journal segment, when the journal is mostly forgotten transactions:
        every record of the active and remembered transactions is kept, and the
        hazards (of forgotten transactions too: in the head)."""
        count = self.journal.count
        if count <= COMPACT_MIN or count <= 4 * (len(self.active) + len(self.finished)):
            return
        try:
            hazards = [r for r in self.hazard_records if not self._remembered(r.get("txn"))]
            kept = self.journal.compact(hazards, nothing, self._remembered)
        except JournalError as exc:
            self.limited("journal", f"warning: {exc}; it goes on in the old segment")
            return
        self.log(f"journal compacted: {count} records -> {kept}")

    def _remembered(self, txn: object) -> bool:
        return isinstance(txn, str) and (txn in self.active or txn in self.finished)

    def _finished(self, txn_id: str, outcome: object) -> None:
        self.finished[txn_id] = outcome if outcome in (COMMITTED, ABORTED) else COMMITTED
        if len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    # -- requests ----------------------------------------------------------------------------
    def commit(self, req: dict[str, Any]) -> dict[str, Any]:
        names = check_participants(req.get("participants"))
        data = data_json(req.get("data", {}))
        timeout = check_timeout(req.get("timeout"), self.vote_timeout)
        identity, rid = self.service.current, req.get("rid")
        self.begin(names, data, timeout, lambda result: self.service.reply(identity, rid, result))
        return {DEFER: True}

    def outcome(self, req: dict[str, Any]) -> dict[str, Any]:
        txn_id = check_txn(req.get("txn"))
        txn = self.active.get(txn_id)
        if txn is not None:
            return {"txn": txn_id, "outcome": OUTCOME_OF.get(txn.state, PENDING)}
        if txn_id in self.finished:
            return {"txn": txn_id, "outcome": OUTCOME_OF[self.finished[txn_id]]}
        if owner_of(txn_id) != self.name:
            raise NotFoundError(f"transaction {txn_id} belongs to another coordinator")
        return {"txn": txn_id, "outcome": ABORT}  # presumed abort: never decided, or long done

    def metrics(self) -> Any:
        """What --metrics exports (core/txn/metrics.py)."""
        from .metrics import coordinator_families

        return coordinator_families(self)

    def stats(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.name,
            "committed": self.committed,
            "aborted": self.aborted,
            "active": len(self.active),
            "fsyncs": self.journal.fsyncs,
            "malformed": self.malformed,
        }

    # -- phase one ---------------------------------------------------------------------------
    def begin(self, names: list[str], data: str, timeout: float, waiter: Reply) -> Txn:
        """Start a transaction of *names* on *data* (JSON text); *waiter* gets the result.

        Participants not known yet are looked up in the background; the
        prepares go out when every one is found (or the transaction aborts
        when one is not, or when *timeout* passes first)."""
        if self.voting >= self.max_active:
            raise TxnError(f"busy: {self.voting} transactions are voting; try again later")
        self.writable()
        txn_id = new_txn_id(self.name)
        while txn_id in self.active or txn_id in self.finished:  # a clock that went back
            txn_id = new_txn_id(self.name)
        prepare = (
            f'{{"op":"prepare","txn":"{txn_id}","coordinator":"{self.name}",'
            f'"reply_to":{json.dumps(self.advertise)},"data":{data}}}'
        ).encode()
        endpoints: dict[str, str | None] = dict.fromkeys(names)
        txn = Txn(txn_id, endpoints, waiter=waiter, timeout=timeout, prepare=prepare)
        txn.deadline = time.monotonic() + timeout
        self.active[txn.id] = txn
        self.voting += 1
        for name in names:
            found = self.directory.endpoints(name)
            if found is None:
                self.looking.setdefault(name, []).append(txn)
            elif not found:
                return self._not_found(txn, name)
            else:
                txn.participants[name] = found[0]
        self._send_prepares(txn)
        return txn

    def writable(self) -> None:
        """Raise unless the journal can be written (after a failure: try it again now)."""
        if self.journal.failed is None:
            return
        try:
            self.journal.sync()
        except JournalError as exc:
            raise TxnError(f"{exc}; no transaction is started until it can be") from None

    def _not_found(self, txn: Txn, name: str) -> Txn:
        txn.acked.update(txn.participants)  # nobody was asked anything: nobody to tell
        self.decide(txn, ABORT, self.directory.missing(name))
        return txn

    def _send_prepares(self, txn: Txn) -> None:
        if txn.state != VOTING or None in txn.participants.values():
            return
        msg, txn.prepare = txn.prepare, b""
        for name in txn.participants:
            self.ask(txn, name, msg, lambda reply, n=name: self.on_vote(txn, n, reply))
        crash.point(ROLE, "after-prepare-sent")

    def found(self, names: list[str]) -> None:
        """Lookups of *names* ended (in the background): go on with the transactions
        waiting for them, and with phase two where a participant was looked for again."""
        for name in names:
            endpoints = self.directory.endpoints(name) or []
            for txn in self.looking.pop(name, []):
                if txn.state != VOTING or txn.participants.get(name, "") is not None:
                    continue
                if not endpoints:
                    self._not_found(txn, name)
                else:
                    txn.participants[name] = endpoints[0]
                    self._send_prepares(txn)
        self.peers.flush()

    def on_vote(self, txn: Txn, name: str, reply: dict[str, Any] | None) -> None:
        txn.asked.pop(name, None)
        if txn.state != VOTING:
            return
        yes = reply is not None and reply.get("ok") is True and reply.get("vote") == "yes"
        txn.votes[name] = "yes" if yes else "no"
        if not yes:
            txn.acked.add(name)  # a no vote aborted there already (a refusal: nothing came)
            why = reply.get("reason") or reply.get("error") if reply else None
            detail = f": {printable(why, 300)}" if why else ""
            self.decide(txn, ABORT, f"{name} {_no_vote(reply)}{detail}")
        elif len(txn.votes) == len(txn.participants):
            self.decide(txn, COMMIT, "")

    def expire(self, txn: Txn) -> None:
        if txn.state != VOTING:
            return
        unknown = [n for n, e in txn.participants.items() if e is None]
        if unknown:
            txn.acked.update(txn.participants)  # the prepares were never sent: nobody to tell
            self.decide(
                txn,
                ABORT,
                f"participant {', '.join(unknown)} still looked for after {txn.timeout:g}s",
            )
            return
        silent = [n for n in txn.participants if n not in txn.votes]
        for name in silent:
            self.directory.stale(name)
        self.decide(txn, ABORT, f"no vote from {', '.join(silent)} within {txn.timeout:g}s")

    # -- the decision ------------------------------------------------------------------------
    def decide(self, txn: Txn, outcome: str, reason: str) -> None:
        if txn.state == VOTING:
            self.voting -= 1
        txn.reason = reason
        record = {"txn": txn.id, "participants": txn.participants, "time": round(time.time(), 3)}
        if outcome == COMMIT:
            crash.point(ROLE, "before-decision")
            txn.ticket = self.journal.append({**record, "state": COMMITTED})
            txn.state = DECIDING
            self.deciding.append(txn)
            if not self.flush_due:  # after every handler of this turn: one fsync for all
                self.flush_due = True
                self.after(0, "group commit", self.flush)
        else:
            self._abort(txn, record)

    def _abort(self, txn: Txn, record: dict[str, Any]) -> None:
        # not synced: a transaction the journal does not know was aborted anyway
        self.journal.append({**record, "state": ABORTED, "reason": txn.reason})
        txn.state = ABORTED
        self.aborted += 1
        self._answer(txn)
        self.phase_two(txn)

    def flush(self) -> None:
        """Make the decisions of this turn durable, then tell their participants."""
        self.flush_due = False
        batch, self.deciding = self.deciding, []
        self.peers.flush()  # the prepares of this turn go before the fsync, not after it
        try:
            self.journal.sync()
        except JournalError as exc:
            batch = self._not_durable(batch, exc)
        crash.point(ROLE, "after-decision")
        self.service.hold()  # one message per asker, one per participant
        for txn in batch:
            txn.state = COMMITTED
            self.committed += 1
            self._answer(txn)
            self.phase_two(txn)
        self.service.release()
        self.peers.flush()
        if self.journal.failed is None:
            self.compact()

    def _not_durable(self, batch: list[Txn], exc: JournalError) -> list[Txn]:
        """The journal refused the commit records of *batch*: those not on disk are
        taken back and aborted (nobody heard "commit" yet); those already on disk
        (synced by an earlier write) stay committed and are returned."""
        taken = self.journal.withdraw({txn.ticket for txn in batch})
        lost = [txn for txn in batch if txn.ticket in taken]
        self.limited("journal", f"error: {exc}; nothing is decided until it can be written")
        self.service.hold()
        for txn in lost:
            txn.reason = f"not committed: {exc}"
            when = round(time.time(), 3)
            self._abort(txn, {"txn": txn.id, "participants": txn.participants, "time": when})
        self.service.release()
        return [txn for txn in batch if txn not in lost]

    def _answer(self, txn: Txn) -> None:
        if txn.waiter is not None:
            waiter, txn.waiter = txn.waiter, None
            waiter(txn.result())

    # -- phase two ---------------------------------------------------------------------------
    def phase_two(self, txn: Txn) -> None:
        """Send the decision to every participant that has not acknowledged it."""
        outcome = OUTCOME_OF[txn.state]
        txn.tries += 1
        backoff = PHASE_TWO_RETRY * 2 ** min(txn.tries - 1, 10)
        txn.next_try = time.monotonic() + min(self.retry_max, backoff)
        first = True
        msg = f'{{"op":"decide","txn":"{txn.id}","outcome":"{outcome}"}}'.encode()
        for name in txn.participants:
            if name in txn.acked:
                continue
            self.ask(txn, name, msg, lambda reply, n=name: self.on_ack(txn, n, reply))
            if first:
                first = False
                if "EDA_CRASH_AT" in os.environ and name in txn.asked:  # really sent, then crash
                    txn.asked[name][0].flush()
                crash.point(ROLE, f"after-{outcome}-sent")
        self._maybe_done(txn)

    def on_ack(self, txn: Txn, name: str, reply: dict[str, Any] | None) -> None:
        txn.asked.pop(name, None)
        if reply is None or name in txn.acked or txn.id not in self.active:
            return
        if reply.get("ok") is True and reply.get("done") is True:
            if reply.get("hazard") is True:
                self._hazard(txn, name, "its operator's heuristic decision differs")
            txn.acked.add(name)
        elif reply.get("code") == 3 and txn.state == COMMITTED:
            self._hazard(txn, name, "it never prepared the transaction")
            txn.acked.add(name)
        self._maybe_done(txn)

    def _hazard(self, txn: Txn, name: str, why: str) -> None:
        txn.hazards.append(name)
        record = {"txn": txn.id, "hazard": name, "outcome": txn.state, "why": why}
        self.hazard_records.append(record)
        self.journal.write(record)
        self.warn(f"warning: heuristic hazard: {txn.id} {txn.state}, but at {name} {why}")

    def _maybe_done(self, txn: Txn) -> None:
        if len(txn.acked) < len(txn.participants) or txn.id not in self.active:
            return
        crash.point(ROLE, "before-done")
        self.journal.append({"txn": txn.id, "state": "done", "outcome": txn.state})
        del self.active[txn.id]
        self._finished(txn.id, txn.state)

    def retry(self) -> None:
        """Abort what is still voting past its deadline; phase two again for the
        decided transactions whose participants are late."""
        now = time.monotonic()
        for txn in list(self.active.values()):
            if txn.state == VOTING and now >= txn.deadline:
                self.expire(txn)
            if txn.state in (COMMITTED, ABORTED) and now >= txn.next_try:
                if txn.tries % 4 == 3:  # a participant may have moved: ask where it is now
                    for name in txn.participants:
                        if name not in txn.acked:
                            self.directory.stale(name)
                            found = self.directory.endpoints(name)  # None: being looked up
                            if found:
                                txn.participants[name] = found[0]
                self.phase_two(txn)
        self.peers.flush()

    def close(self) -> None:
        roles.close(self, [self.directory, self.journal], super().close)


def _no_vote(reply: dict[str, Any] | None) -> str:
    """How a participant's missing yes is told: it voted no, refused this coordinator's
    key (secure mode: it never saw the prepare), or could not be asked at all."""
    if reply is not None and reply.get("refused") is True:
        return "refused"
    if reply is not None and reply.get("unasked") is True:
        return "could not be asked"
    return "voted no"
