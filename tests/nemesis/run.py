"""One nemesis run: hosts, workloads, faults for a while, heal, recovery, checks, report.

``python -m tests.nemesis --seconds 600 --seed 1 --hosts 10 --out build/nemesis/1``
(``make nemesis``) runs the long form inside a private network namespace;
``tests/nemesis/test_short.py`` runs the short form in the suite.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tests.hosts import Host, Network
from tests.nemesis import report
from tests.nemesis.checkers import Result, check_all
from tests.nemesis.history import OK, History, Op
from tests.nemesis.nemesis import Nemesis, schedule
from tests.nemesis.txn import TxnWorkload
from tests.nemesis.workloads import (
    BusWorkload,
    LbWorkload,
    NatsWorkload,
    PubSubWorkload,
    RegistryWorkload,
    Workload,
)

# roles by host index (modulo the number of hosts): 5 hosts share them, 10 spread them;
# the txn role (bank transfers and sagas) and the NATS role (three JetStream nodes, two
# fronts) run in the long form only (the short form's budget: the suite is over its own)
LAYOUT = {
    5: {"bus": 0, "bus-pub": (1, 4), "durable": 2, "members": (3, 4), "feed": 1,
        "ps-subs": (2, 3), "registries": (0, 1, 2), "lb-workers": (2, 3, 4), "lb-callers": (0,),
        "txn-participants": (1, 2, 3), "txn-coordinators": (0, 4), "txn-clients": (2,),
        "nats-nodes": (1, 2, 3), "nats-fronts": (0, 4), "nats-pub": (2, 3), "nats-durable": 1},
    10: {"bus": 0, "bus-pub": (1, 5), "durable": 2, "members": (3, 4), "feed": 5,
         "ps-subs": (6, 7), "registries": (7, 8, 9), "lb-workers": (2, 4, 6),
         "lb-callers": (1, 8), "txn-participants": (3, 5, 9), "txn-coordinators": (0, 7),
         "txn-clients": (1, 6), "nats-nodes": (1, 4, 8), "nats-fronts": (3, 9),
         "nats-pub": (2, 6), "nats-durable": 5},
}  # fmt: skip
SETTLE = 2.0  # s the checkers' conditions hold before the recovery window ends


def faulted(history: Sequence[Op], roles: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per workload, the faults applied to its daemons (kill, stop); "network": to hosts."""
    hit: dict[str, list[str]] = {subject: [] for subject in [*roles, "network"]}
    owner = {name: subject for subject, names in roles.items() for name in names}
    for op in history:
        if op.subject == "nemesis" and op.kind == "start" and op.outcome == OK:
            subject = owner.get(op.value["target"], "network")
            hit[subject].append(f"{op.value['fault']} {op.value['target']}")
    return hit


def _finish(workload: Workload, history: History) -> None:
    try:
        workload.finish()
    except Exception as exc:  # recorded; the checkers then miss the final reads
        history.add(workload.subject, "harness", "error", repr(exc), "fail")


def run(
    network: Network,
    out: Path,
    seconds: float,
    seed: int,
    hosts: int,
    recovery: float = 30.0,
    txn: bool | None = None,
    nats: bool | None = None,
) -> tuple[list[Result], str]:
    """Run, check and report into *out*; returns the results and the summary text.

    The recovery window after the heal ends once every workload's checked
    conditions hold (:meth:`Workload.recovered`, for :data:`SETTLE` s), or
    after *recovery* s. *txn*, *nats*: run the txn role, the NATS role (by default on
    10 hosts only)."""
    out.mkdir(parents=True, exist_ok=True)
    roles = LAYOUT[5 if hosts < 10 else 10]
    hs: list[Host] = [network.add_host(f"n{i + 1}") for i in range(hosts)]

    def on(*index: int) -> list[Host]:
        return [hs[i % hosts] for i in index]

    history = History(out / "history.jsonl")
    workloads: list[Workload] = [
        RegistryWorkload(history, out, on(*roles["registries"]), hs, rotate_lookups=hosts < 10),
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
    if txn if txn is not None else hosts >= 10:
        workloads.append(
            TxnWorkload(
                history, out, on(*roles["txn-participants"]), on(*roles["txn-coordinators"]),
                on(*roles["txn-clients"]),
            )
        )  # fmt: skip
    if nats if nats is not None else hosts >= 10:
        workloads.append(
            NatsWorkload(
                history, out, on(*roles["nats-nodes"]), on(*roles["nats-fronts"]),
                on(*roles["nats-pub"]), hs[roles["nats-durable"] % hosts],
            )
        )  # fmt: skip
    for w in workloads:  # every daemon was started above: their start-ups overlap
        w.ready()
    daemons = [d for w in workloads for d in w.daemons]
    (out / "roles.json").write_text(
        json.dumps({w.subject: [d.name for d in w.daemons] for w in workloads}, indent=1)
    )
    faults = schedule(seed, seconds, [(d.name, d.kinds) for d in daemons], [h.name for h in hs])
    (out / "schedule.json").write_text(json.dumps([asdict(f) for f in faults], indent=1))
    nemesis = Nemesis(network, daemons, faults, history)
    history.add("nemesis", "nemesis", "begin", {"seed": seed, "seconds": seconds, "hosts": hosts})
    for w in workloads:
        w.start()
    nemesis.start()
    threading.Event().wait(max(0.0, nemesis.begun + seconds - history.now()))  # the run's length
    nemesis.finish()
    healed = history.now()
    deadline, held_since = time.monotonic() + recovery, None
    while time.monotonic() < deadline:  # the recovery window: clients go on, no faults
        if all(w.recovered(healed) for w in workloads):
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= SETTLE:
                break
        else:
            held_since = None
        threading.Event().wait(0.2)
    history.add("nemesis", "nemesis", "recovered", {"after": history.now() - healed})
    for w in workloads:  # every client told at once: each ends the operation it is in
        for loop in w.loops:
            loop.stopped.set()
    for w in workloads:
        w.stop_clients()
    finishing = [threading.Thread(target=_finish, args=(w, history)) for w in workloads]
    for t in finishing:  # the final reads of different workloads overlap
        t.start()
    for t in finishing:
        t.join()
    history.close()
    results = check_all(history.ops)
    title = f"eda nemesis: seed {seed}, {seconds:.0f} s, {hosts} hosts, {len(faults)} faults"
    kinds = Counter(f.kind for f in faults)
    text = report.write(history.ops, results, out, title)
    text = f"{title} ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})\n{text}"
    (out / "summary.txt").write_text(text)
    return results, text
