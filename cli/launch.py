"""The programs' entry points: ``eda-X --version`` answered before anything is imported.

A shell loop or a deploy script that checks the version pays only the interpreter's
start-up: importing click (the larger part of every program's start-up, for its
parameter types and help formatting) is not needed to print one line.  Anything
else, including ``--version`` among other arguments, goes to the program's own
``main`` (click's eager version option gives the same line there).
"""

from __future__ import annotations

import importlib
import sys
from functools import partial

from eda.cli import PROGRAMS


def launch(program: str) -> None:
    """Run *program* (``eda-pub``...): the one-line ``--version`` here, the rest in its module."""
    if sys.argv[1:] == ["--version"]:
        from eda.core import __version__

        sys.stdout.write(f"{program} {__version__}\n")
        sys.stdout.flush()
        return
    importlib.import_module(PROGRAMS[program]).main()


# the console scripts' functions (pyproject.toml [project.scripts])
pub = partial(launch, "eda-pub")
sub = partial(launch, "eda-sub")
registry = partial(launch, "eda-registry")
bus = partial(launch, "eda-bus")
lb = partial(launch, "eda-lb")
txn = partial(launch, "eda-txn")
keys = partial(launch, "eda-keys")
