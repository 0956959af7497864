"""Start-up: what a program's ``--help`` imports (issue 20: one-shot commands in shell loops).

Timing belongs in bench/; here the property that keeps start-up small: ``--help`` (and so
every command's parsing) never imports the heavy modules only some subcommands need. A
regression of this kind (eda-pub loading SQLite and the bus engines through
``eda.core.bus``'s package imports) cost a third of eda-pub's import time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAMS = ["pub", "sub", "registry", "bus", "lb", "txn", "keys"]
# modules that no program needs to parse its options and print --help
HEAVY = {
    "zmq",
    "zeroconf",
    "rich",
    "sqlite3",
    "asyncio",
    "nats",
    "eda.core.bus.sqlite",
    "eda.core.bus.engine",
    "eda.core.discovery",
}


def imported_by_help(program: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"eda.cli.{program}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage:" in result.stdout
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "click" in names  # the probe sees imports at all
    return names


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_imports_nothing_heavy(program):
    heavy = sorted(imported_by_help(program) & HEAVY)
    assert heavy == [], f"eda-{program} --help imports {heavy}"
