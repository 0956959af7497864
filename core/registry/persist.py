"""Durable registry state under ``--data DIR``: an append-only log plus snapshots.

``DIR/id`` keeps the registry's id across restarts (it owns its records by
that id).  Every change event is appended to ``DIR/changes.log`` as it
happens (written to the OS at once, so a SIGKILL loses nothing).  Once a
second, ``DIR/snapshot.json`` is rewritten atomically (temp file, fsync,
rename) with every record including last-heartbeat times, and the log is
truncated.  The log is fsynced with each snapshot, so a power cut loses at
most about a second of changes, which the next heartbeats re-teach anyway.
A torn last line in the log is skipped, and so is every record or line that
does not validate as a request would (counted in :attr:`Journal.skipped`):
a file edited by hand or damaged on disk never stops the registry.

When a write fails (full disk, read-only or removed directory) the error is
raised to the server, which warns and keeps serving from memory: changes
since the last good snapshot are then not durable until a later write works.
A failed snapshot leaves no partial ``snapshot.json.tmp`` behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import EdaError
from .model import MAX_REV, InvalidRecord, from_dict
from .model import Instance as Record
from .store import DELETIONS

SNAPSHOT, LOG, ID_FILE = "snapshot.json", "changes.log", "id"


class Journal:
    """The log and snapshot files of one registry."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # unbuffered: a failed write (disk full) leaves nothing queued to reappear later
            self._log: BinaryIO = (self.dir / LOG).open("ab", buffering=0)
        except OSError as exc:
            # an I/O failure at start (exit 1): nothing to serve durably from
            raise EdaError(f"cannot use data directory {self.dir}: {exc.strerror}") from None
        self.skipped = 0
        self._torn = False  # the last append failed part-way: end that line first

    def registry_id(self) -> str:
        path = self.dir / ID_FILE
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text.isalnum():
                return text
        new = secrets.token_hex(4)
        try:
            path.write_text(new + "\n")
        except OSError as exc:
            raise EdaError(f"cannot write {path}: {exc.strerror}") from None
        return new

    def load(self) -> tuple[list[Record], int]:
        """Records as of the last change written, and the last event sequence number."""
        records: dict[str, Record] = {}
        seq = 0
        try:
            snap = json.loads((self.dir / SNAPSHOT).read_bytes())
            if not isinstance(snap, dict) or not isinstance(snap.get("instances", []), list):
                raise ValueError("not a snapshot")
            try:
                seq = _seq(snap)
            except ValueError:
                self.skipped += 1  # (the records are still good: the log was truncated)
            for data in snap.get("instances", []):
                self._keep(records, data)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, RecursionError):
            self.skipped += 1  # an unreadable snapshot: the log still has every change
        with contextlib.suppress(OSError):
            for line in (self.dir / LOG).read_bytes().splitlines():
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError("not an event")
                    seq = max(seq, _seq(event))
                except (ValueError, RecursionError):
                    self.skipped += 1
                    continue
                if event.get("type") in DELETIONS:
                    inst = event.get("instance")
                    if isinstance(inst, dict) and isinstance(inst.get("id"), str):
                        records.pop(inst["id"], None)
                    else:
                        self.skipped += 1
                else:
                    self._keep(records, event.get("instance"))
        return list(records.values()), seq

    def _keep(self, records: dict[str, Record], data: Any) -> None:
        try:
            inst = from_dict(data)
        except (InvalidRecord, ValueError, TypeError):
            self.skipped += 1
            return
        records[inst.id] = inst

    def append(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        if self._torn:
            line = b"\n" + line
        self._torn = True
        view = memoryview(line)
        while view:
            written = self._log.write(view)
            if not written:
                raise OSError(28, "No space left on device")
            view = view[written:]
        self._torn = False

    def snapshot(self, records: list[Record], seq: int) -> None:
        """Replace the snapshot atomically; on failure the old one stays, no temp file."""
        doc = {"seq": seq, "instances": [r.to_dict() for r in records]}
        data = json.dumps(doc, separators=(",", ":")).encode()
        tmp = self.dir / (SNAPSHOT + ".tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.dir / SNAPSHOT)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._log.truncate(0)
        self._log.seek(0)
        self._torn = False
        os.fsync(self._log.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._log.close()


def _seq(doc: dict[str, Any]) -> int:
    seq = doc.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_REV:
        raise ValueError("bad sequence number")
    return seq
