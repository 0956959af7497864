"""eda-bus's storage: the engine interface and the engines that implement it.

:mod:`.engine` defines what a bus daemon needs from a store (append with
idempotence, group commit, reads by sequence, time and pattern, durable
consumers, consumer groups, stats, retention). :mod:`.sqlite` implements it
on one SQLite file in WAL mode, :mod:`.nats` on NATS JetStream; both check
batches and track publisher sequences with :mod:`.streams`. :mod:`.wal`
tells a torn last write from a clean crash; :mod:`.retention` decides what
old events go.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


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
# Imported when first used (PEP 562): a program that only needs a submodule
# (eda-pub's --bus options need retention's parsers) must not pay for SQLite
# and the engines at every start; ``--help`` and one-shot runs are timed.
_LAZY = {name: ".sqlite" if name == "SQLiteEngine" else ".engine" for name in __all__}
