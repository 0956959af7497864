"""Run one eda program as its bin/eda-X script does, marking where its time goes.

``python oneshot_phases.py MARKS.json MODULES PROGRAM [ARGS...]`` imports the
modules named in the file MODULES (one per line: what ``-X importtime`` showed
the same command importing), then runs PROGRAM as ``bin/PROGRAM`` would, and
writes to MARKS.json the perf_counter seconds of each mark, from the script's
first line:

* ``imported``: every module the command needs is imported;
* ``main``: click's ``Command.main`` entered (the launcher's own work before it:
  eda-pub's early mDNS question);
* ``parsed``: the leaf command's ``invoke`` entered (click has parsed argv,
  read the config and environment, converted every value);
* ``connect``: the first ZeroMQ ``connect`` (before it: the command's set-up,
  the discovery cache, its TCP probe, an mDNS wait);
* ``send`` / ``recv``: the first message sent, the last received (between:
  the round trips);
* ``exit``: ``os._exit`` called (after ``recv``: closing sockets, LINGER,
  atexit functions).

bench_oneshot.py's profile runs it, the plain command and the interpreter
alone; the interpreter's start is the process's wall time outside these marks.
Only the bench uses it: the program runs unchanged, only observed.
"""

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

marks_path, modules_path, program, *args = sys.argv[1:]
import click  # noqa: E402
import zmq  # noqa: E402

marks: dict[str, float] = {}


def mark(name: str, again: bool = False) -> None:
    if again or name not in marks:
        marks[name] = time.perf_counter() - T0


def observed(cls: type, method: str, name: str, again: bool = False, leaf: bool = False) -> None:
    original = getattr(cls, method)

    def wrapper(self, *a, **kw):  # type: ignore[no-untyped-def]
        if not (leaf and isinstance(self, click.Group)):
            mark(name, again)
        result = original(self, *a, **kw)
        if name == "recv":
            mark(name, True)
        return result

    setattr(cls, method, wrapper)


observed(click.Command, "main", "main")
observed(click.Command, "invoke", "parsed", leaf=True)
observed(zmq.Socket, "connect", "connect")
for method in ("send", "send_multipart"):
    observed(zmq.Socket, method, "send")
for method in ("recv", "recv_multipart"):
    observed(zmq.Socket, method, "recv")

# eda-lb's caller sends and receives through pyzmq's backend socket (core/lb/protocol.py),
# whose methods cannot be replaced: its two functions are observed instead
from eda.core.lb import protocol  # noqa: E402


def observed_function(module: object, function: str, name: str) -> None:
    original = getattr(module, function)

    def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
        if name == "send":
            mark(name)
        result = original(*a, **kw)
        if name == "recv":
            mark(name, True)
        return result

    setattr(module, function, wrapper)


observed_function(protocol, "send_request", "send")
observed_function(protocol, "recv", "recv")

# observed before the rest is imported: modules keep a method as an attribute of their own
# (core/lb/protocol.py's _RECV)
with open(modules_path) as f:
    for module in f.read().split():
        try:  # noqa: SIM105 (contextlib: one import more than the program's own)
            __import__(module)
        except ImportError:  # an optional import the program itself tolerates
            pass

from eda.cli import launch  # noqa: E402

mark("imported")
real_exit = os._exit


def _exit(status: int) -> None:
    mark("exit")
    with open(marks_path, "w") as out:
        json.dump(marks, out)
    real_exit(status)


os._exit = _exit
sys.argv = [program, *args]
try:
    launch.launch(program)
except SystemExit as exc:  # a program that did not leave through os._exit
    _exit(exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1)
_exit(0)
