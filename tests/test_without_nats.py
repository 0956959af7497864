"""nats-py is the NATS engine's client; without it the embedded bus still works and
the NATS engine's modules still import (the engine then says how to install it)."""

from __future__ import annotations

import subprocess
import sys

BLOCK_NATS = """
import sys
class _NoNats:
    def find_spec(self, name, path=None, target=None):
        if name == "nats" or name.startswith("nats."):
            raise ImportError("no module named " + name)
sys.meta_path.insert(0, _NoNats())
"""


def test_the_nats_engine_modules_import_without_nats_py() -> None:
    code = BLOCK_NATS + (
        "import eda.core.bus.nats.engine, eda.core.bus.nats.bridge, eda.core.bus.nats.client as c\n"
        "assert c.nats is None\n"
        "assert issubclass(c.NatsTimeout, Exception)\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
