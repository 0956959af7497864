"""Durable consumers and consumer groups of the embedded engine, in its SQLite database.

A durable consumer is a row of ``consumers`` (its patterns, the next bus
sequence it has not acknowledged); a group a row of ``groups`` (its patterns
and cursor) with its ``leases``: ``(first, last)`` bus sequence ranges each
held by a member ("" once released, for the next claims).  Every change goes
into the engine's open transaction (durable with the next commit; at once
with fsync ``always``).  The engine itself is :mod:`.sqlite`.
"""

from __future__ import annotations

import json
import sqlite3
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from ..errors import NotFoundError, UsageError
from ..topics import Matcher
from .base import EngineBase
from .engine import Fsync, Record, StoreError
from .streams import MAX_SEQ, check_name


class SQLiteConsumers(EngineBase):
    """The consumers' half of :class:`.sqlite.SQLiteEngine` (see the module docstring)."""

    _conn: sqlite3.Connection
    fsync: Fsync

    @abstractmethod
    def _begin(self) -> None:
        """Open the engine's transaction if none is open."""

    @abstractmethod
    def _failed(self, exc: Exception) -> StoreError:
        """Roll back to the last commit; the error to raise."""

    def _spec(self, patterns_json: str) -> Matcher:
        return self._matcher(json.loads(patterns_json))

    # -- durable consumers ----------------------------------------------------
    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self._begin()
            self._conn.execute(sql, args)
        except Exception as exc:
            raise self._failed(exc) from None
        if self.fsync == "always":
            self.commit()

    def consumer(self, name: str, patterns: Sequence[str], start: int) -> int:
        check_name(name, "consumer")
        spec = json.dumps(Matcher(patterns).patterns)
        row = self._conn.execute(
            "SELECT next, patterns FROM consumers WHERE name = ?", (name,)
        ).fetchone()
        if row:
            if row[1] != spec:  # resumed with other patterns: its lag is counted by the new ones
                self._write("UPDATE consumers SET patterns = ? WHERE name = ?", (spec, name))
            return int(row[0])
        start = max(1, min(start, self._next))
        self._write("INSERT INTO consumers VALUES (?, ?, ?)", (name, spec, start))
        return start

    def position(self, name: str) -> int:
        row = self._conn.execute("SELECT next FROM consumers WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no durable consumer {name!r}")
        return int(row[0])

    def ack(self, name: str, seq: int) -> int:
        current = self.position(name)
        if seq > self.last_seq:
            raise UsageError(f"consumer {name!r} acknowledged {seq}, beyond the last event")
        if seq + 1 > current:
            self._write("UPDATE consumers SET next = ? WHERE name = ?", (seq + 1, name))
            current = seq + 1
        return current

    def patterns_of(self, name: str) -> tuple[str, ...] | None:
        sql = "SELECT patterns FROM consumers WHERE name = ?"
        row = self._conn.execute(sql, (name,)).fetchone()
        return None if row is None else tuple(self._spec(row[0]).patterns)

    def move(self, name: str, seq: int) -> int:
        self.position(name)  # NotFoundError if unknown
        seq = max(1, min(seq, self._next))
        self._write("UPDATE consumers SET next = ? WHERE name = ?", (seq, name))
        return seq

    def drop_consumer(self, name: str) -> None:
        n = self._conn.execute(
            "SELECT (SELECT count(*) FROM consumers WHERE name = ?)"
            " + (SELECT count(*) FROM groups WHERE name = ?)",
            (name, name),
        ).fetchone()[0]
        if not n:
            raise NotFoundError(f"no durable consumer or group {name!r}")
        self._write("DELETE FROM consumers WHERE name = ?", (name,))
        self._write("DELETE FROM groups WHERE name = ?", (name,))
        self._write("DELETE FROM leases WHERE grp = ?", (name,))

    # -- consumer groups ------------------------------------------------------
    def _group(self, group: str, patterns: Sequence[str], start: int | None) -> tuple[Matcher, int]:
        check_name(group, "group")
        spec = json.dumps(Matcher(patterns).patterns)
        row = self._conn.execute(
            "SELECT patterns, next FROM groups WHERE name = ?", (group,)
        ).fetchone()
        if row is None:
            nxt = self._durable + 1 if start is None else max(1, min(start, self._next))
            self._write("INSERT INTO groups VALUES (?, ?, ?)", (group, spec, nxt))
            return self._spec(spec), nxt
        if row[0] != spec:
            raise UsageError(f"group {group!r} has patterns {json.loads(row[0])}, not {patterns}")
        return self._spec(spec), int(row[1])

    def claim(
        self, group: str, member: str, patterns: Sequence[str], limit: int, start: int | None = None
    ) -> list[Record]:
        check_name(member, "member")
        matcher, nxt = self._group(group, patterns, start)
        out: list[Record] = []
        got = 0
        released = self._conn.execute(
            "SELECT first, last FROM leases WHERE grp = ? AND member = '' ORDER BY first", (group,)
        ).fetchall()
        for first, last in released:
            if got >= limit:
                return out
            records = list(self.read(first, last, matcher))
            self._write(
                "UPDATE leases SET member = ? WHERE grp = ? AND first = ?", (member, group, first)
            )
            out += records
            got += sum(r.size for r in records)
        if got >= limit or nxt > self._durable:
            return out
        records = list(self.read(nxt, None, matcher, limit - got))
        reached = self._durable
        if records and sum(r.size for r in records) >= limit - got:
            reached = records[-1].seq + records[-1].size - 1
        if records:
            self._write(
                "INSERT INTO leases VALUES (?, ?, ?, ?)",
                (group, records[0].seq, reached, member),
            )
        self._write("UPDATE groups SET next = ? WHERE name = ?", (reached + 1, group))
        return out + records

    def group_ack(self, group: str, member: str, seq: int, first: int = 0) -> int:
        if not 0 <= seq <= MAX_SEQ:
            raise UsageError(f"group {group!r}: acknowledged sequence {seq} is out of range")
        if not 0 <= first <= seq:
            raise UsageError(f"group {group!r}: acknowledged range {first}-{seq} is not one")
        matcher = self._group_matcher(group)
        leases = self._conn.execute(
            "SELECT first, last FROM leases WHERE grp = ? AND member = ? AND first <= ?"
            " AND last >= ?",
            (group, member, seq, first),
        ).fetchall()
        settled = 0
        for lo, hi in leases:
            settled += self._count(max(lo, first), min(hi, seq), matcher)
            # what is left on either side stays held, unless no event of the group lies there
            if lo < first and self._count(lo, first - 1, matcher):
                self._write(
                    "UPDATE leases SET last = ? WHERE grp = ? AND first = ?", (first - 1, group, lo)
                )
            else:
                self._write("DELETE FROM leases WHERE grp = ? AND first = ?", (group, lo))
            if seq < hi and self._count(seq + 1, hi, matcher):
                self._write("INSERT INTO leases VALUES (?, ?, ?, ?)", (group, seq + 1, hi, member))
        return settled

    def release(self, group: str, member: str) -> int:
        matcher = self._group_matcher(group)
        leases = self._conn.execute(
            "SELECT first, last FROM leases WHERE grp = ? AND member = ?", (group, member)
        ).fetchall()
        if leases:
            self._write(
                "UPDATE leases SET member = '' WHERE grp = ? AND member = ?", (group, member)
            )
        return sum(self._count(first, last, matcher) for first, last in leases)

    def held(self, group: str) -> dict[str, list[tuple[int, int]]]:
        self._group_matcher(group)
        out: dict[str, list[tuple[int, int]]] = {}
        for first, last, member in self._conn.execute(
            "SELECT first, last, member FROM leases WHERE grp = ? ORDER BY first", (group,)
        ):
            out.setdefault(member, []).append((first, last))
        return out

    def _group_matcher(self, group: str) -> Matcher:
        row = self._conn.execute("SELECT patterns FROM groups WHERE name = ?", (group,)).fetchone()
        if row is None:
            raise NotFoundError(f"no consumer group {group!r}")
        return self._spec(row[0])
