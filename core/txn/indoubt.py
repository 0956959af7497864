"""A participant's transactions in doubt: asking their coordinators for the outcome.

A transaction a participant voted yes on is in doubt until it hears the
outcome.  Once it has been in doubt for *inquire_after* seconds,
:class:`InDoubt` asks the coordinator recorded with it (the prepare's
``reply_to``), again and again; one that stays silent for *inquire_timeout*
is noted in the journal ("does not answer", what ``eda-txn status`` and a
``resolve --unanswered`` filter see) and, when a way to find coordinators
by name is given, looked up anew (a coordinator that moved).  Only an
answer from the coordinator that made the transaction ends the doubt: the
rules of presumed abort are in :mod:`.participant`.

Secure mode: the coordinator is asked under the key it proved when it sent the
prepare (``coordinator_key`` in the journal), while that key is still trusted;
one found anew by name comes with the key its lookup pinned.  A coordinator
that refuses this participant's key is noted with the reason.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import EdaError
from .directory import Lookups, pin_trusted
from .peers import Peers
from .protocol import ABORT, COMMIT

if TYPE_CHECKING:
    from .participant import Participant

MAX_ASKED = 200  # inquiries started in one tick (the rest: at the next one)


class _Nobody:
    """Stands for a peer that could not be made (nothing to forget)."""

    def forget(self, rid: int) -> None:
        pass


_NOBODY = _Nobody()


class InDoubt:
    """Asks the coordinators of *participant*'s in-doubt transactions for their outcome.

    The participant says when a transaction enters doubt (:meth:`entered`)
    and leaves it (:meth:`left`), and calls :meth:`inquire` from its tick; an
    answer goes back to it as ``participant.learned(txn, outcome)``, a silence
    as ``participant.note_unanswered(txn, note)``.
    """

    def __init__(
        self,
        participant: Participant,
        txns: Iterable[str],
        *,
        inquire_after: float,
        inquire_timeout: float,
        find_coordinator: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.participant = participant
        self.inquire_after = inquire_after
        self.inquire_timeout = inquire_timeout
        now = time.monotonic()
        self.since = dict.fromkeys(txns, now)  # txn -> when it entered doubt
        self.asking: dict[str, tuple[Any, int, float]] = {}  # txn -> (peer, rid, when asked)
        self.unanswered: set[str] = set()
        self.misdirected: set[str] = set()  # recorded endpoint is another coordinator's
        # name -> endpoints, when the recorded one fails; looked up off the loop
        self.coordinators = Lookups(find_coordinator, ttl=5.0) if find_coordinator else None
        if self.coordinators is not None:
            self.coordinators.attach(participant, lambda _names: None)  # used at the next inquiry
        self.peers = Peers(participant, roles=("coordinator", "participant"))

    def entered(self, txn: str) -> None:
        self.since.setdefault(txn, time.monotonic())

    def left(self, txn: str, *, finished: bool) -> None:
        self.since.pop(txn, None)
        self.asking.pop(txn, None)
        if finished:
            self.misdirected.discard(txn)

    def inquire(self, now: float) -> None:
        """Ask about every transaction in doubt long enough and not being asked about."""
        asked = 0
        found: dict[str, list[str]] = {}  # coordinators looked up this tick: once each
        for txn, since in list(self.since.items()):
            if asked >= MAX_ASKED or now - since < self.inquire_after:
                continue
            pending = self.asking.get(txn)
            if pending is not None:
                if now - pending[2] < self.inquire_timeout:
                    continue
                pending[0].forget(pending[1])
                self._unanswered(txn)
            again = pending is not None or txn in self.misdirected  # look the name up anew
            self._ask(txn, now, found if again else None)
            asked += 1

    def _ask(self, txn: str, now: float, found: dict[str, list[str]] | None) -> None:
        """Ask the coordinator of *txn*; with *found*, one found anew by name if it
        was silent (the recorded endpoint may be gone: a coordinator that moved)."""
        record = self.participant.txns[txn]
        endpoint = record.get("reply_to")
        name = str(record.get("coordinator"))
        if found is not None and self.coordinators is not None:
            if name not in found:
                found[name] = self.coordinators.get(name) or []  # [] while being looked up
            others = [e for e in found[name] if e != endpoint]
            endpoint = others[0] if others else endpoint
        if not isinstance(endpoint, str):
            return
        if endpoint == record.get("reply_to"):
            pin_trusted(endpoint, record.get("coordinator_key"))
        try:
            peer = self.peers.get(endpoint)
        except EdaError as exc:  # a journal written before reply_to was checked this strictly
            self.participant.limited("inquire", f"cannot ask about {txn}: {exc}")
            self.asking[txn] = (_NOBODY, 0, now)  # asked again after inquire_timeout
            return
        rid = peer.ask({"op": "outcome", "txn": txn}, functools.partial(self._answered, txn))
        self.asking[txn] = (peer, rid, now)

    def _unanswered(self, txn: str, why: str = "does not answer") -> None:
        if txn in self.unanswered:
            return
        self.unanswered.add(txn)
        coordinator = self.participant.txns[txn].get("coordinator")
        note = f"in doubt: coordinator {coordinator} {why}"
        self.participant.note_unanswered(txn, note)

    def _answered(self, txn: str, reply: dict[str, Any] | None) -> None:
        self.asking.pop(txn, None)
        if reply is None or txn not in self.participant.txns or txn not in self.since:
            return
        if reply.get("refused") is True:  # secure mode: it refuses this participant's key
            self._unanswered(txn, f"cannot be asked: {reply.get('error')}")
            return
        outcome = reply.get("outcome")
        if reply.get("ok") is not True and reply.get("code") == 3:
            # another coordinator answers there (it never presumes about ids not its own):
            # no outcome, and no proof that ours is gone; find it by name next time
            self.misdirected.add(txn)
            self._unanswered(txn)
            return
        if not reply.get("ok") or outcome not in (COMMIT, ABORT):
            return  # pending, or refused: ask again later
        self.unanswered.discard(txn)
        self.participant.learned(txn, outcome)

    def close(self) -> None:
        if self.coordinators is not None:
            self.coordinators.close()
