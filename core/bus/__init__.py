"""eda-bus's storage: the engine interface and the engines that implement it.

:mod:`.engine` defines what a bus daemon needs from a store (append with
idempotence, group commit, reads by sequence, time and pattern, durable
consumers, consumer groups, stats, retention). :mod:`.sqlite` implements it
on one SQLite file in WAL mode, :mod:`.nats` on NATS JetStream; both check
batches and track publisher sequences with :mod:`.streams`. :mod:`.wal`
tells a torn last write from a clean crash; :mod:`.retention` decides what
old events go.
"""

from .engine import (
    FSYNC_MODES,
    ConsumerStats,
    Engine,
    EventTooLargeError,
    Fsync,
    Receipt,
    Record,
    Retained,
    Stats,
    StoreError,
    StoreFullError,
    TopicStats,
)
from .sqlite import SQLiteEngine

__all__ = [
    "FSYNC_MODES",
    "ConsumerStats",
    "Engine",
    "EventTooLargeError",
    "Fsync",
    "Receipt",
    "Record",
    "Retained",
    "SQLiteEngine",
    "Stats",
    "StoreError",
    "StoreFullError",
    "TopicStats",
]
