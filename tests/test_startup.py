"""Start-up: what a program's ``--help`` imports (issue 20: one-shot commands in shell loops).

Timing belongs in bench/; here the property that keeps start-up small: ``--help`` (and so
every command's parsing) never imports the heavy modules only some subcommands need. A
regression of this kind (eda-pub loading SQLite and the bus engines through
``eda.core.bus``'s package imports) cost a third of eda-pub's import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from eda.core import __version__

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


def imported(
    args: list[str], status: int = 0, env: dict[str, str] | None = None
) -> tuple[str, set[str]]:
    """stdout of ``python -X importtime ARGS`` (exit *status*) and the modules it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == status, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "eda.core" in names  # the probe sees imports at all
    return result.stdout, names


def imported_by_help(program: str) -> set[str]:
    out, names = imported(["-m", f"eda.cli.{program}", "--help"])
    assert "Usage:" in out
    assert "click" in names
    return names


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_imports_nothing_heavy(program):
    heavy = sorted(imported_by_help(program) & HEAVY)
    assert heavy == [], f"eda-{program} --help imports {heavy}"


def entry_points() -> dict[str, str]:
    """The installed programs, as pyproject.toml declares them: name -> "module:function"."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    scripts: dict[str, str] = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    return scripts


def test_every_program_has_an_entry_point():
    assert sorted(entry_points()) == sorted(f"eda-{p}" for p in PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_version_imports_no_click(program):
    """``eda-X --version`` (as the installed script runs it) prints its line without click."""
    module, _, function = entry_points()[f"eda-{program}"].partition(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    out, names = imported(["-c", code, "--version"])
    assert out == f"eda-{program} {__version__}\n"
    heavy = sorted(names & (HEAVY | {"click"}))
    assert heavy == [], f"eda-{program} --version imports {heavy}"


# what a one-shot command does not need either: the daemons' and other subcommands' modules
ONE_SHOT_HEAVY = (HEAVY - {"zmq", "eda.core.discovery"}) | {
    "logging",
    "subprocess",
    "_hashlib",
    "eda.cli.bus",  # eda-bus's command line: eda-pub and eda-sub need its --bus option only
}


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["eda.cli.pub", "t", "one-shot"], 0),  # nobody listening: a warning, exit 0
        (["eda.cli.registry", "lookup", "db"], 3),  # no registry: not found
    ],
    ids=["pub", "registry-lookup"],
)
def test_one_shot_imports_nothing_heavy(tmp_path, args, status):
    """A one-shot ``eda-pub t msg`` or ``eda-registry lookup`` in a shell loop pays for
    ZeroMQ and discovery, never for asyncio, rich, SQLite, zeroconf, logging, subprocess or
    OpenSSL (hashlib)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # fmt: skip
    _, names = imported(["-m", *args], status, env)
    assert {"zmq", "eda.core.discovery"} <= names  # the command did its network work
    heavy = sorted(names & ONE_SHOT_HEAVY)
    assert heavy == [], f"{args[0]} {args[1]} imports {heavy}"
