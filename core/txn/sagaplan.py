"""A checked saga: its steps, their actions and retry rules (what :mod:`.sagafile` loads).

The executor (:mod:`.saga`) runs a :class:`Plan`; the log (:mod:`.sagalog`)
keeps it as :meth:`Plan.to_dict` in its first record, so that a resume does
not depend on the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("run", "call", "publish")


@dataclass(frozen=True)
class Retry:
    """How often and how patiently an action is tried."""

    attempts: int = 1  # tries in all (1 = no retry); retriable steps ignore it
    backoff: float = 0.5  # seconds before the second try; doubled for each further one
    jitter: float = 0.5  # each delay is cut by up to this fraction, at random
    max_backoff: float = 30.0

    def delay(self, failures: int, rand: float) -> float:
        """Seconds to wait after the *failures*-th failed try; *rand* is uniform in [0, 1)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** min(failures - 1, 60))
        return base * (1.0 - self.jitter * rand)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "backoff": self.backoff,
            "jitter": self.jitter,
            "max_backoff": self.max_backoff,
        }


@dataclass(frozen=True)
class Action:
    """One thing to do: a shell command, a service call or a publish."""

    kind: str  # "run", "call" or "publish"
    target: str  # the command, service or topic
    timeout: float | None = None  # seconds; None = no limit
    retry: Retry = field(default_factory=Retry)
    connect: tuple[str, ...] = ()  # publish: subscribers besides mDNS; call: the instances

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            self.kind: self.target,
            "timeout": self.timeout,
            "retry": self.retry.to_dict(),
        }
        if self.connect:
            out["connect"] = list(self.connect)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Action:
        kind = next(k for k in KINDS if k in raw)
        return cls(
            kind,
            raw[kind],
            raw.get("timeout"),
            Retry(**raw["retry"]),
            tuple(raw.get("connect", ())),
        )

    def describe(self) -> str:
        return f"{self.kind} {self.target}"


@dataclass(frozen=True)
class Step:
    name: str
    action: Action
    compensate: Action | None = None
    group: str | None = None
    pivot: bool = False
    retriable: bool = False  # after the pivot: retried until it succeeds, never compensated
    line: int = 0  # where its [[step]] header is in the file

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action.to_dict(),
            "compensate": self.compensate.to_dict() if self.compensate else None,
            "group": self.group,
            "pivot": self.pivot,
            "retriable": self.retriable,
            "line": self.line,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Step:
        comp = raw.get("compensate")
        return cls(
            raw["name"],
            Action.from_dict(raw["action"]),
            Action.from_dict(comp) if comp else None,
            raw.get("group"),
            bool(raw.get("pivot")),
            bool(raw.get("retriable")),
            int(raw.get("line", 0)),
        )


@dataclass(frozen=True)
class Plan:
    """A checked saga: its steps in order."""

    name: str
    steps: tuple[Step, ...]
    source: str = ""  # the file it came from

    def stages(self) -> list[list[Step]]:
        """The steps as they run: a lone step, or the consecutive members of a group."""
        stages: list[list[Step]] = []
        for step in self.steps:
            if stages and step.group is not None and stages[-1][0].group == step.group:
                stages[-1].append(step)
            else:
                stages.append([step])
        return stages

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "steps": [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        return cls(
            raw["name"], tuple(Step.from_dict(s) for s in raw["steps"]), raw.get("source", "")
        )
