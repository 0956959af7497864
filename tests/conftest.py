"""Test harness: the whole suite runs inside a private network namespace.

Run plainly (``pytest``), this file re-executes pytest under
``scripts/netns-run`` before any test opens a socket, so neither ZeroMQ nor
mDNS traffic can reach a real interface.  Every process a test starts goes
through :class:`Procs`, and a fixture fails the test if one is left behind.
"""

from __future__ import annotations

import itertools
import os
import shlex
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import Procs, children_of

ROOT = Path(__file__).resolve().parent.parent

# Property tests check properties, never speed: on a loaded 2-core machine example
# generation and single examples are slow, which hypothesis would report as failures.
settings.register_profile("eda", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("eda")


def pytest_configure(config: pytest.Config) -> None:
    """Outside a private network namespace, restart this pytest run inside one.

    (Also registers the ``long`` marker: see :func:`pytest_collection_modifyitems`.)

    With pytest-xdist (``-n N``), each worker starts in a fresh namespace of
    its own, so tests running at the same time in different workers can never
    see each other's mDNS announcements, ports, bridges or hosts.
    """
    config.addinivalue_line(
        "markers", "long: takes 8 s or more; started first (see pytest_collection_modifyitems)"
    )
    _default_sigint()
    if os.environ.get("EDA_NETNS") == "1":
        _own_namespace_per_worker(config)
        if getattr(config, "workerinput", None) is None:  # once, before any worker starts
            _compile_bytecode()
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    runner = str(ROOT / "scripts" / "netns-run")
    os.execv(runner, [runner, sys.executable, "-m", "pytest", *config.invocation_params.args])


def _default_sigint() -> None:
    """Give the programs the tests start a default SIGINT, whatever this run inherited.

    A shell without job control starts a background command (``make test &``)
    with SIGINT ignored; every process after it inherits that, and Python keeps
    an ignored SIGINT ignored -- as it should, for a program run that way.  The
    tests send SIGINT on purpose (exit 130, --watch, --follow): a handler here
    (not an ignore) makes every child start with the default.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _compile_bytecode() -> None:
    """Write the bytecode of eda (core/, cli/) and of the tests' helpers, if not current.

    Every test starts eda programs, thousands in a run, and each imports some forty
    of eda's modules.  With PYTHONDONTWRITEBYTECODE set (as some environments do),
    nothing is cached and each process compiled them from source again: a quarter
    of a program's start-up CPU.  Bytecode written here is read whatever that
    variable says (it forbids writing only); an up-to-date file is left alone.
    """
    import compileall

    for folder in ("core", "cli", "tests"):
        compileall.compile_dir(ROOT / folder, quiet=2)


def _own_namespace_per_worker(config: pytest.Config) -> None:
    """Start every local xdist worker through netns-run, in a new namespace of its own.

    xdist starts a ``popen`` worker as ``PYTHON -c BOOTSTRAP``; the ``python=``
    part of its spec replaces PYTHON with netns-run (told by the unset
    EDA_NETNS that it is not yet isolated), which execs the interpreter inside
    a fresh namespace: the worker keeps its pid and its pipes to the controller.
    """
    tx = getattr(config.option, "tx", None)
    if not tx or getattr(config, "workerinput", None) is not None:
        return
    runner = ROOT / "scripts" / "netns-run"
    python = f"env -u EDA_NETNS {shlex.quote(str(runner))} {shlex.quote(sys.executable)}"
    specs = []
    for spec in tx:
        count, star, rest = spec.rpartition("*")
        if rest == "popen":
            spec = f"{count}{star}popen//python={python}"
        specs.append(spec)
    config.option.tx = specs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the tests marked ``long`` first, spread evenly over the xdist workers.

    ``--dist worksteal`` hands worker k the k-th of N consecutive chunks of this
    list, then moves the tail half of the longest queue to a worker that ran
    out.  A long test at the tail of a queue would end the run with one worker
    busy and the others idle; all of them at the front of the list would all
    go to one worker.  So each chunk begins with its share of the long tests
    (dealt round robin) and goes on with the others, in collection order.
    Every worker computes the same order, as xdist requires.
    """
    workerinput = getattr(config, "workerinput", None)
    workers = int(workerinput["workercount"]) if workerinput else 1
    items[:] = _long_first(items, workers)


def _long_first(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    long = [item for item in items if item.get_closest_marker("long")]
    rest = iter([item for item in items if not item.get_closest_marker("long")])
    sizes, left = [], len(items)
    for k in range(workers):  # as worksteal splits the list at the start
        sizes.append(left // (workers - k))
        left -= sizes[-1]
    chunks: list[list[pytest.Item]] = [[] for _ in sizes]
    k = 0
    for item in long:
        while len(chunks[k % workers]) >= sizes[k % workers]:  # full: the next one
            k += 1
        chunks[k % workers].append(item)
        k += 1
    for chunk, size in zip(chunks, sizes, strict=True):
        chunk.extend(itertools.islice(rest, size - len(chunk)))
    return [item for chunk in chunks for item in chunk]


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep discovery caches and config files of the tests away from the user's."""
    home = tmp_path_factory.mktemp("home")
    os.environ["XDG_CACHE_HOME"] = str(home / "cache")
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    os.environ["XDG_STATE_HOME"] = str(home / "state")  # ports daemons remember
    for var in [v for v in os.environ if v.startswith("EDA_") and v != "EDA_NETNS"]:
        del os.environ[var]


@pytest.fixture(scope="session", autouse=True)
def _sandboxed(pytestconfig: pytest.Config) -> None:
    """Refuse to run anything unless the only interfaces are ours."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    names = {line.split(":")[0].strip() for line in lines}
    foreign = {n for n in names if n != "lo" and not n.startswith(("edabr", "edav"))}
    assert not foreign, f"not in a private network namespace: {sorted(foreign)}"
    if hasattr(pytestconfig, "workerinput"):  # an xdist worker: not in the namespace of the others
        ours, controller = (os.readlink(f"/proc/{pid}/ns/net") for pid in ("self", os.getppid()))
        assert ours != controller, "this xdist worker shares the network namespace of the others"


@pytest.fixture
def procs(tmp_path: Path) -> object:
    """Start processes for a test; all are killed afterwards and none may linger."""
    group = Procs(tmp_path)
    yield group
    group.kill_all()
    left = children_of(os.getpid())
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def network(procs: Procs) -> object:
    """A bridge to which a test attaches hosts (network namespaces)."""
    from tests.hosts import Network

    net = Network(procs)
    yield net
    procs.kill_all()
    net.close()
