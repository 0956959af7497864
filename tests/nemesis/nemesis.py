"""The nemesis: a seeded schedule of overlapping faults, applied to hosts and daemons.

:func:`schedule` is a pure function of the seed: the same seed gives the same
faults at the same times (what they hit then depends on timing, as in any
real run). Kinds:

- ``kill``: ``kill -9`` of a daemon; restarted with the same command at the end
- ``stop``: SIGSTOP of a daemon, SIGCONT at the end
- ``cut``: one host's cable pulled (link down), then plugged back
- ``split``: the bridge split in two halves (nftables drops on input), then joined
- ``loss``: a host drops a share of its UDP, or UDP and TCP, input at random

Only one split at a time, and a target (daemon or host) has one fault at a
time; otherwise faults overlap freely. No clock step: a network namespace has
no clock of its own (time namespaces move the monotonic clocks only, and eda
uses those for every timeout), so there is nothing to step per host.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.helpers import Proc
from tests.hosts import Host, Network
from tests.nemesis.history import FAIL, OK, History

KINDS = ("kill", "stop", "cut", "split", "loss")


@dataclass(frozen=True)
class Fault:
    start: float
    end: float
    kind: str
    target: str  # a daemon's name, a host's name, or for a split the hosts of one half
    value: Any = None  # loss: {"percent": n, "protocols": [...]}


@dataclass
class Daemon:
    """A long-running program on a host, which the nemesis may kill, restart or freeze."""

    name: str
    host: Host
    proc: Proc
    kinds: tuple[str, ...] = ("kill", "stop")  # what the nemesis may do to it
    incarnations: list[Proc] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.incarnations.append(self.proc)

    def kill9(self) -> None:
        with self.lock:
            self.proc.kill()

    def restart(self) -> None:
        with self.lock:
            self.proc = self.host.restart(self.proc)
            self.incarnations.append(self.proc)

    def stop(self) -> None:
        self.host.stop(self.proc)

    def cont(self) -> None:
        self.host.cont(self.proc)


def schedule(
    seed: int,
    seconds: float,
    daemons: Sequence[tuple[str, Sequence[str]]],
    hosts: Sequence[str],
    gap: float = 2.5,
    longest: float = 8.0,
) -> list[Fault]:
    """Faults for a run of *seconds*: one starts every *gap* s on average, each lasting
    1 to *longest* s, all healed by *seconds*. *daemons* are (name, kinds allowed)."""
    rng = random.Random(seed)
    busy: dict[str, float] = {}  # target -> when its fault ends
    faults: list[Fault] = []
    t = rng.uniform(1.0, 3.0)
    while True:
        t += rng.expovariate(1.0 / gap)
        if t >= seconds - 1.0:
            return faults
        kind = rng.choice(KINDS)
        end = min(t + rng.uniform(1.0, longest), seconds)
        if kind in ("kill", "stop"):
            names = [n for n, kinds in daemons if kind in kinds and busy.get(n, 0) <= t]
            if not names:
                continue
            target, value = rng.choice(names), None
        elif kind == "split":
            if busy.get("split", 0) > t or len(hosts) < 2:
                continue
            half = rng.sample(list(hosts), rng.randint(1, len(hosts) // 2))
            target, value = "split", sorted(half)
        else:
            names = [h for h in hosts if busy.get(h, 0) <= t]
            if not names:
                continue
            target = rng.choice(names)
            value = (
                {"percent": rng.choice((10, 20, 30, 50)), "protocols": rng.choice(
                    (["udp"], ["udp", "tcp"]))}
                if kind == "loss"
                else None
            )  # fmt: skip
        busy[target] = end
        faults.append(Fault(round(t, 3), round(end, 3), kind, target, value))


class Nemesis:
    """Applies a schedule in a thread of its own, recording every fault and heal."""

    def __init__(
        self, network: Network, daemons: Sequence[Daemon], faults: Sequence[Fault], history: History
    ) -> None:
        self.network = network
        self.daemons = {d.name: d for d in daemons}
        self.hosts = {h.name: h for h in network.hosts}
        self.faults = list(faults)
        self.history = history
        self.stopped = threading.Event()
        self.begun = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name="nemesis")

    def start(self) -> None:
        """Start the schedule now: its times count from this call."""
        self.begun = self.history.now()
        self._thread.start()

    def _run(self) -> None:
        events = sorted(
            [(f.start, 1, i, f) for i, f in enumerate(self.faults)]
            + [(f.end, 0, i, f) for i, f in enumerate(self.faults)]
        )  # heals before new faults at the same instant
        for at, is_start, _, fault in events:
            if self.stopped.wait(max(0.0, self.begun + at - self.history.now())):
                return
            self._do(fault, bool(is_start))

    def _do(self, fault: Fault, start: bool) -> None:
        began = self.history.now()
        outcome, note = OK, None
        try:
            (self._apply if start else self._heal)(fault)
        except Exception as exc:  # recorded: a fault that could not be applied is no silent gap
            outcome, note = FAIL, f"{type(exc).__name__}: {exc}"
        value = {"fault": fault.kind, "target": fault.target, "value": fault.value, "error": note}
        self.history.add(
            fault.target, "nemesis", "start" if start else "heal", value, outcome, began
        )

    def _apply(self, fault: Fault) -> None:
        if fault.kind == "kill":
            self.daemons[fault.target].kill9()
        elif fault.kind == "stop":
            self.daemons[fault.target].stop()
        elif fault.kind == "cut":
            self.hosts[fault.target].cut()
        elif fault.kind == "split":
            self.network.split([self.hosts[n] for n in fault.value])
        elif fault.kind == "loss":
            self.hosts[fault.target].set_input_loss(
                fault.value["percent"], fault.value["protocols"]
            )

    def _heal(self, fault: Fault) -> None:
        if fault.kind == "kill":
            self.daemons[fault.target].restart()
        elif fault.kind == "stop":
            self.daemons[fault.target].cont()
        elif fault.kind == "cut":
            self.hosts[fault.target].reconnect()
        elif fault.kind == "split":
            self.network.join()
        elif fault.kind == "loss":
            self.hosts[fault.target].set_input_loss(0)

    def finish(self) -> None:
        """Stop scheduling and heal everything: every daemon running, every host connected."""
        self.stopped.set()
        self._thread.join(30)
        began = self.history.now()
        for host in self.hosts.values():
            host.reconnect()
            host.set_input_loss(0)
        self.network.join()
        for daemon in self.daemons.values():
            daemon.cont()
            if daemon.proc.popen.poll() is not None:
                daemon.restart()
        self.history.add("nemesis", "nemesis", "heal-all", None, OK, began)
