"""Keeping 2PC journals and memory bounded: finished transactions are forgotten in order.

A daemon remembers the last *kept* finished transactions (to answer a
repeated message about them) and forgets older ones; a journal mostly made
of forgotten transactions (over :data:`COMPACT_MIN` records) is compacted,
on start and while running, into a new segment with only what is still
needed (:meth:`.journal.Journal.compact`).

Transaction ids carry their creation time (``COORDINATOR.TTTTTTTTTTTRRRRRR``:
eleven hex digits of milliseconds, six random), so a daemon can tell a
transaction it forgot (created before the newest one it forgot) from one it
never saw.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

COMPACT_MIN = 20_000  # records: smaller journals are read as they are


def created_ms(txn: str) -> int | None:
    """When transaction *txn* was created (ms since the epoch), if its id says."""
    digits = txn.partition(".")[2]
    return int(digits[:11], 16) if len(digits) == 17 else None


class Finished(OrderedDict[str, dict[str, Any]]):
    """The last *kept* finished transactions, oldest first; what falls off is
    remembered only as :attr:`forgotten_before` (the newest creation time)."""

    def __init__(self, kept: int) -> None:
        super().__init__()
        self.kept = kept
        self.forgotten_before = 0

    def add(self, txn: str, record: Mapping[str, Any]) -> None:
        self[txn] = dict(record)
        self.move_to_end(txn)
        while len(self) > self.kept:
            old, _ = self.popitem(last=False)
            self.forgot(old)

    def forgot(self, txn: str) -> None:
        when = created_ms(txn)
        if when is not None and when > self.forgotten_before:
            self.forgotten_before = when

    def forgotten(self, txn: str) -> bool:
        """Whether *txn* is older than something forgotten (so perhaps forgotten itself)."""
        when = created_ms(txn)
        return when is not None and when <= self.forgotten_before
