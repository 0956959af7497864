"""Durable registry state under ``--data DIR``: an append-only log plus snapshots.

``DIR/id`` keeps the registry's id across restarts (it owns its records by
that id).  Every change event is appended to ``DIR/changes.log`` as it
happens (written to the OS at once, so a SIGKILL loses nothing).  Once a
second, ``DIR/snapshot.json`` is rewritten atomically (temp file, fsync,
rename) with every record including last-heartbeat times, and the log is
truncated.  The log is fsynced with each snapshot, so a power cut loses at
most about a second of changes, which the next heartbeats re-teach anyway.
A torn last line in the log is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import EdaError, UsageError
from .model import Instance as Record
from .model import InvalidRecord, from_dict
from .store import DELETIONS

SNAPSHOT, LOG, ID_FILE = "snapshot.json", "changes.log", "id"


class Journal:
    """The log and snapshot files of one registry."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._log: BinaryIO = (self.dir / LOG).open("ab")
        except OSError as exc:
            raise UsageError(f"cannot use data directory {self.dir}: {exc.strerror}") from None
        self.skipped = 0

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
            snap = json.loads((self.dir / SNAPSHOT).read_text())
            seq = int(snap.get("seq", 0))
            for data in snap.get("instances", []):
                self._keep(records, data)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError):
            self.skipped += 1  # an unreadable snapshot: the log still has every change
        with contextlib.suppress(OSError):
            for line in (self.dir / LOG).read_bytes().splitlines():
                try:
                    event = json.loads(line)
                    seq = max(seq, int(event.get("seq", 0)))
                except (ValueError, AttributeError, TypeError):
                    self.skipped += 1
                    continue
                if event.get("type") in DELETIONS:
                    inst = event.get("instance")
                    if isinstance(inst, dict):
                        records.pop(str(inst.get("id")), None)
                else:
                    self._keep(records, event.get("instance"))
        return list(records.values()), seq

    def _keep(self, records: dict[str, Record], data: Any) -> None:
        try:
            inst = from_dict(data)
        except InvalidRecord:
            self.skipped += 1
            return
        records[inst.id] = inst

    def append(self, event: dict[str, Any]) -> None:
        self._log.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        self._log.flush()

    def snapshot(self, records: list[Record], seq: int) -> None:
        doc = {"seq": seq, "instances": [r.to_dict() for r in records]}
        tmp = self.dir / (SNAPSHOT + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(json.dumps(doc, separators=(",", ":")).encode())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.dir / SNAPSHOT)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._log.truncate(0)
        self._log.seek(0)
        os.fsync(self._log.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._log.close()
