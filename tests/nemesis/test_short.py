"""The short form of the LAN nemesis (issue 18): 40 s of faults on 5 hosts, zero anomalies.

About a minute in all: the daemons start together, and the recovery window
ends as soon as what the checkers judge holds (every registry peer's view
converged). Seed 21's 40 s schedule kills or freezes a daemon of every role
and cuts, splits and drops packets (19 faults); the test checks that each
was applied. ``make nemesis SECONDS=600 SEED=n`` runs the long form (10
hosts, with the txn role); both write the same report (history.jsonl,
summary.txt, summary.json, latency.png).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hosts import Network
from tests.nemesis.history import load
from tests.nemesis.run import faulted, run

SEED, SECONDS = 21, 40  # fixed: the same schedule of faults every run


@pytest.mark.long
@pytest.mark.nemesis
@pytest.mark.timeout(900)
def test_short_form_finds_no_anomaly(network: Network, tmp_path: Path) -> None:
    out = tmp_path / "nemesis"
    results, summary = run(network, out, seconds=SECONDS, seed=SEED, hosts=5)
    assert {r.checker for r in results} == {"bus", "pubsub", "registry", "lb"}
    assert all(r.ok > 0 for r in results), summary  # every workload did work
    roles = json.loads((out / "roles.json").read_text())
    hit = faulted(load(out / "history.jsonl"), roles)
    assert all(hit.values()), hit  # a daemon of every role was killed or frozen
    assert {f.split()[0] for f in hit["network"]} == {"cut", "split", "loss"}, hit
    assert (out / "latency.png").stat().st_size > 0
    assert not [a for r in results for a in r.anomalies], f"report in {out}:\n{summary}"
