"""One nemesis run: hosts, workloads, faults for a while, heal, recovery, checks, report.

``python -m tests.nemesis --seconds 600 --seed 1 --hosts 10 --out build/nemesis/1``
(``make nemesis``) runs the long form inside a private network namespace;
``tests/nemesis/test_short.py`` runs the short form in the suite.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

from tests.hosts import Host, Network
from tests.nemesis import report
from tests.nemesis.checkers import Result, check_all
from tests.nemesis.history import History
from tests.nemesis.nemesis import Nemesis, schedule
from tests.nemesis.workloads import (
    BusWorkload,
    LbWorkload,
    PubSubWorkload,
    RegistryWorkload,
    Workload,
)

# roles by host index (modulo the number of hosts): 5 hosts share them, 10 spread them
LAYOUT = {
    5: {"bus": 0, "bus-pub": (1, 4), "durable": 2, "members": (3, 4), "feed": 1,
        "ps-subs": (2, 3), "registries": (0, 1, 2), "lb-workers": (2, 3, 4), "lb-callers": (0,)},
    10: {"bus": 0, "bus-pub": (1, 5), "durable": 2, "members": (3, 4), "feed": 5,
         "ps-subs": (6, 7), "registries": (7, 8, 9), "lb-workers": (2, 4, 6),
         "lb-callers": (1, 8)},
}  # fmt: skip


def run(
    network: Network, out: Path, seconds: float, seed: int, hosts: int, recovery: float = 15.0
) -> tuple[list[Result], str]:
    """Run, check and report into *out*; returns the results and the summary text."""
    out.mkdir(parents=True, exist_ok=True)
    roles = LAYOUT[5 if hosts < 10 else 10]
    hs: list[Host] = [network.add_host(f"n{i + 1}") for i in range(hosts)]

    def on(*index: int) -> list[Host]:
        return [hs[i % hosts] for i in index]

    history = History(out / "history.jsonl")
    workloads: list[Workload] = [
        RegistryWorkload(history, out, on(*roles["registries"]), hs),
        BusWorkload(
            history,
            out,
            hs[roles["bus"]],
            on(*roles["bus-pub"]),
            hs[roles["durable"]],
            on(*roles["members"]),
        ),
        PubSubWorkload(history, out, hs[roles["feed"] % hosts], on(*roles["ps-subs"])),
        LbWorkload(history, out, on(*roles["lb-workers"]), on(*roles["lb-callers"])),
    ]
    daemons = [d for w in workloads for d in w.daemons]
    faults = schedule(seed, seconds, [(d.name, d.kinds) for d in daemons], [h.name for h in hs])
    (out / "schedule.json").write_text(json.dumps([asdict(f) for f in faults], indent=1))
    nemesis = Nemesis(network, daemons, faults, history)
    history.add("nemesis", "nemesis", "begin", {"seed": seed, "seconds": seconds, "hosts": hosts})
    for w in workloads:
        w.start()
    nemesis.start()
    threading.Event().wait(max(0.0, nemesis.begun + seconds - history.now()))  # the run's length
    nemesis.finish()
    threading.Event().wait(recovery)  # the recovery window: clients go on, no faults
    registry, *others = workloads  # the registry's observers go on: they time convergence
    for w in others:
        w.stop_clients()
    for w in others:
        try:
            w.finish()
        except Exception as exc:  # recorded; the checkers then miss the final reads
            history.add(w.subject, "harness", "error", repr(exc), "fail")
    registry.stop_clients()
    history.close()
    results = check_all(history.ops)
    title = f"eda nemesis: seed {seed}, {seconds:.0f} s, {hosts} hosts, {len(faults)} faults"
    text = report.write(history.ops, results, out, title)
    return results, text
