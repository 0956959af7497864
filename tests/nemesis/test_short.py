"""The short form of the LAN nemesis (issue 18): 60 s of faults on 5 hosts, zero anomalies.

``make nemesis SECONDS=600 SEED=n`` runs the long form (10 hosts); both write
the same report (history.jsonl, summary.txt, summary.json, latency.png).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hosts import Network
from tests.nemesis.run import run

SEED = 18  # fixed: the same schedule of faults every run


@pytest.mark.long
@pytest.mark.nemesis
@pytest.mark.timeout(900)
def test_short_form_finds_no_anomaly(network: Network, tmp_path: Path) -> None:
    out = tmp_path / "nemesis"
    results, summary = run(network, out, seconds=60, seed=SEED, hosts=5)
    assert {r.checker for r in results} == {"bus", "pubsub", "registry", "lb"}
    assert all(r.ok > 0 for r in results), summary  # every workload did work
    assert (out / "latency.png").stat().st_size > 0
    assert not [a for r in results for a in r.anomalies], f"report in {out}:\n{summary}"
