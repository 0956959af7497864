"""The embedded store's files: schema, ownership, opening, WAL repair, upgrades.

One process owns a store at a time (an flock on ``PATH.lock``).  On open, a
WAL left by a crash is checked (:mod:`.wal`) and a torn last write is
reported in the engine's ``repairs``; SQLite then drops it, and the store is
back to its last complete commit.  A WAL damaged in the middle (intact
frames after a bad one) is never truncated: opening raises StoreError before
SQLite sees it, and the files stay as they are.  Stores of schema 1 are
upgraded when opened (one pass, once).  The engine itself is
:mod:`.sqlite`.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Final

from . import wal
from .engine import Fsync, StoreError, StoreFullError

SQLITE_FULL: Final = 13
_CHECKPOINT_BYTES: Final = 16 << 20  # WAL size that triggers an automatic checkpoint

SCHEMA_VERSION: Final = 2  # 2: batches.cum, the topics table and index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, count INTEGER NOT NULL, stored REAL NOT NULL,
    topic TEXT NOT NULL, kind INTEGER NOT NULL, time REAL NOT NULL,
    pubid TEXT NOT NULL, pubseq INTEGER NOT NULL, source TEXT NOT NULL,
    ext BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS batches_stored ON batches (stored);
CREATE TABLE IF NOT EXISTS streams (
    pubid TEXT NOT NULL, topic TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
    seen REAL NOT NULL, PRIMARY KEY (pubid, topic, lo)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY, patterns TEXT NOT NULL, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY, patterns TEXT NOT NULL, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    grp TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (grp, first)) WITHOUT ROWID;
"""
_UPGRADE_2 = """
ALTER TABLE batches ADD COLUMN cum INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN cumb INTEGER NOT NULL DEFAULT 0;
UPDATE batches SET cum = w.cum, cumb = w.cumb FROM (
    SELECT seq, sum(count) OVER (PARTITION BY topic ORDER BY seq) AS cum,
        sum(length(body)) OVER (PARTITION BY topic ORDER BY seq) AS cumb FROM batches) AS w
    WHERE batches.seq = w.seq;
CREATE INDEX IF NOT EXISTS batches_topic ON batches (topic, seq, count, cum, cumb);
UPDATE meta SET value = 2 WHERE key = 'schema';
"""


def lock(path: Path) -> int:
    """Own the store at *path* (an flock on ``PATH.lock``); the descriptor holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(f"store {path} is in use by another process") from None
    return fd


def open_store(path: Path, fsync: Fsync, page_size: int, repairs: list[str]) -> sqlite3.Connection:
    """The connection to the store at *path*, set up, upgraded, a torn WAL tail repaired
    (one line each in *repairs*); StoreError (the files untouched) when damaged."""
    scan = wal.scan(Path(f"{path}-wal"))
    if scan and scan.intact_after:  # before SQLite opens it: it would drop the intact frames
        raise StoreError(
            f"store {path} is damaged: its write-ahead log has a bad frame at byte "
            f"{scan.damaged_at} followed by {scan.intact_after} intact frames, so this is not "
            f"a torn last write; not opening it (SQLite would discard those frames): keep "
            f"{path}-wal, restore the store from a copy, or move the log aside to open "
            f"the store as of its last checkpoint, losing what the log holds"
        )
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from None
    try:
        fresh = conn.execute("PRAGMA page_count").fetchone()[0] == 0
        if fresh:
            conn.execute(f"PRAGMA page_size = {int(page_size)}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        sync = "OFF" if fsync == "never" else "FULL"
        conn.execute(f"PRAGMA synchronous = {sync}")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(64, _CHECKPOINT_BYTES // size)}")
        conn.execute("PRAGMA cache_size = -32768")
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('next_seq', 1)",
            (SCHEMA_VERSION,),
        )
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {path} was written by a newer eda (schema {version})")
        if scan and (scan.torn_bytes or scan.uncommitted):
            _repair(conn, path, scan, repairs)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(batches)")]
        if "cum" not in columns:  # a new store, or one of schema 1: one pass, one transaction
            conn.execute("BEGIN")
            for statement in _UPGRADE_2.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
    except BaseException as exc:
        conn.close()
        if not isinstance(exc, sqlite3.Error):
            raise
        if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
            raise StoreFullError(f"cannot open store {path}: the disk is full") from None
        raise StoreError(f"cannot open store {path}: {exc}") from None
    return conn


def _repair(conn: sqlite3.Connection, path: Path, scan: wal.WalScan, repairs: list[str]) -> None:
    """SQLite has dropped the damaged tail; check the rest, make it final, and say so."""
    verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    if verdict != "ok":
        raise StoreError(f"store {path} is damaged beyond its last write: {verdict}")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    last = conn.execute("SELECT max(seq + count - 1) FROM batches").fetchone()[0] or 0
    if scan.torn_bytes:
        repairs.append(
            f"store {path}: the last write was torn ({scan.torn_bytes} damaged bytes at "
            f"the end of the write-ahead log); it was discarded and the store is back to its "
            f"last complete commit, sequence {last}"
        )
    else:
        repairs.append(
            f"store {path}: discarded a transaction that was never committed "
            f"({scan.uncommitted} pages); the store ends at sequence {last}"
        )
