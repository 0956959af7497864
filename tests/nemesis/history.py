"""The history of a nemesis run: every operation and fault, as JSON Lines.

One record per completed operation, Jepsen style: when it started and ended
(seconds since the run began), which process or host did it, the subject
(``bus``, ``pubsub``, ``registry``, ``nemesis``), its kind, its value and its
outcome: ``ok`` (it happened), ``fail`` (it certainly did not) or ``info``
(unknown: a publish that timed out may or may not have been stored).
Checkers are pure functions over a list of :class:`Op`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, FAIL, INFO = "ok", "fail", "info"


@dataclass(frozen=True)
class Op:
    time: float  # started, seconds since the run began
    end: float  # completed
    process: str  # the client, daemon or host
    subject: str
    kind: str
    value: Any
    outcome: str

    @property
    def latency(self) -> float:
        return self.end - self.time

    def ref(self) -> str:
        """A short name for a report: where to find it in the history."""
        return f"{self.process} {self.kind}@{self.time:.2f}s"


class History:
    """Ops appended from many threads, each written out as one JSON line at once."""

    def __init__(self, path: Path | None = None) -> None:
        self.start = time.monotonic()
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._file = path.open("w") if path else None

    def now(self) -> float:
        return round(time.monotonic() - self.start, 4)

    def add(
        self,
        process: str,
        subject: str,
        kind: str,
        value: Any,
        outcome: str = OK,
        started: float | None = None,
    ) -> Op:
        end = self.now()
        op = Op(end if started is None else started, end, process, subject, kind, value, outcome)
        with self._lock:
            self.ops.append(op)
            if self._file:
                self._file.write(json.dumps(asdict(op)) + "\n")
                self._file.flush()
        return op

    def close(self) -> None:
        if self._file:
            self._file.close()


def load(path: Path) -> list[Op]:
    return [Op(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
