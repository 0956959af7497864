"""Start-up: what a program's ``--help`` imports (issue 20: one-shot commands in shell loops).

Timing belongs in bench/; here the property that keeps start-up small: ``--help`` (and so
every command's parsing) never imports the heavy modules only some subcommands need. A
regression of this kind (eda-pub loading SQLite and the bus engines through
``eda.core.bus``'s package imports) cost a third of eda-pub's import time.
"""

from __future__ import annotations

import importlib
import json
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
    args: list[str], status: int | None = 0, env: dict[str, str] | None = None
) -> tuple[str, set[str]]:
    """stdout of ``python -X importtime ARGS`` (exit *status*, None: a failure, any) and the
    modules it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if status is None:
        assert result.returncode not in (0, 2), result.stderr[-2000:]
    else:
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


ROOT = Path(__file__).resolve().parent.parent


def entry_points() -> dict[str, str]:
    """The installed programs, as pyproject.toml declares them (script-files, installed as
    they are): name -> "module:function" the script imports and calls."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = {}
    for path in pyproject["tool"]["setuptools"]["script-files"]:
        lines = (ROOT / path).read_text().splitlines()
        (importing,) = [line for line in lines if line.startswith("from ")]
        _, module, _, function = importing.split()
        assert lines[-1] == f"{function}()", path
        scripts[Path(path).name] = f"{module}:{function}"
    return scripts


def test_every_program_has_an_entry_point():
    assert sorted(entry_points()) == sorted(f"eda-{p}" for p in PROGRAMS)


def as_installed(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """*env* for ``python -S`` to find eda (and its dependencies) as a regular install
    does, without the site-packages' .pth hooks: an editable install's imports re and
    pathlib before the program starts."""
    import sysconfig

    (tmp_path / "eda").mkdir()
    for package in ("core", "cli"):
        (tmp_path / "eda" / package).symlink_to(ROOT / package)
    paths = dict.fromkeys([str(tmp_path), sysconfig.get_path("purelib"),
                           sysconfig.get_path("platlib")])  # fmt: skip
    return dict(env, PYTHONPATH=os.pathsep.join(paths))


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_installed_script_imports_only_eda(program, tmp_path):
    """The installed ``eda-X`` (the file in the interpreter's bin directory, as pip put it
    there) imports nothing before eda's launcher: pip's generated console scripts import
    re first (with enum, functools...: 15-18 ms, a third of ``--version``).  Run without
    the site-packages' .pth hooks (-S: an editable install's imports re itself), eda
    found through PYTHONPATH."""
    script = Path(sys.executable).parent / f"eda-{program}"
    env = as_installed(dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)), tmp_path)
    env.pop("EDA_CONFIG", None)
    for args in (["--version"], ["--help"]):
        out, names = imported(["-S", str(script), *args], env=env)
        assert out.startswith(f"eda-{program} {__version__}\n" if args == ["--version"]
                              else f"Usage: eda-{program} "), out  # fmt: skip
        heavy = sorted(names & {"re", "enum", "functools", "click"})
        assert heavy == [], f"installed eda-{program} {args[0]} imports {heavy}"


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
    "pathlib",  # (with urllib.parse, fnmatch): eda.core.keys imports it for a key file only
    "eda.cli.bus",  # eda-bus's command line: eda-pub and eda-sub need its --bus option only
}


@pytest.mark.parametrize(
    ("args", "status", "network"),
    [
        (["eda.cli.pub", "t", "one-shot"], 0, {"eda.core.discovery"}),  # nobody listening
        (["eda.cli.registry", "lookup", "db"], 3, {"eda.core.discovery"}),  # no registry
        (["eda.cli.lb", "call", "echo", "x", "--connect", "tcp://127.0.0.1:9", "--timeout",
          "0.2"], 3, {"eda.core.lb.caller"}),  # nobody there: no live instance
        (["eda.cli.pub", "--bus", "tcp://127.0.0.1:9", "--confirm", "--timeout", "0.2", "t",
          "x"], 4, {"eda.core.bus.publisher"}),  # no bus there: not confirmed
        (["eda.cli.txn", "commit", "-p", "a,b", "--coordinator", "tcp://127.0.0.1:9",
          "--wait", "0.2", "--no-mdns"], None, {"eda.core.txn.protocol"}),  # nobody there
    ],
    ids=["pub", "registry-lookup", "lb-call", "pub-bus-confirm", "txn-commit"],
)
def test_one_shot_imports_nothing_heavy(tmp_path, args, status, network):
    """A one-shot ``eda-pub t msg``, ``eda-registry lookup``, ``eda-lb call``, ``eda-pub --bus
    --confirm`` or ``eda-txn commit`` in a shell loop pays for ZeroMQ and discovery, never
    for asyncio, rich, SQLite, zeroconf, logging, subprocess or OpenSSL (hashlib: its
    random ids come from os.urandom, as secrets' do)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # fmt: skip
    _, names = imported(["-S", "-m", *args], status, as_installed(env, tmp_path))
    assert {"zmq", *network} <= names  # the command did its network work
    heavy = sorted(names & ONE_SHOT_HEAVY)
    assert heavy == [], f"{args[0]} {args[1]} imports {heavy}"



@pytest.mark.parametrize(
    ("args", "status", "unneeded"),
    [
        (["eda.cli.lb", "call", "echo", "x", "--connect", "tcp://127.0.0.1:9", "--timeout",
          "0.2"], 3, {"socket"}),  # given an instance: no TCP probe, no socket module
        (["eda.cli.txn", "commit", "-p", "a,b", "--coordinator", "tcp://127.0.0.1:9",
          "--wait", "0.2", "--no-mdns"], 4, {"eda.core.daemon", "encodings.idna"}),
        (["eda.cli.registry", "lookup", "db"], 3, {"eda.core.daemon"}),  # none found by mDNS
    ],
    ids=["lb-call", "txn-commit", "registry-lookup"],
)
def test_a_client_imports_no_server_half(tmp_path, args, status, unneeded):
    """A one-shot client does not import what only servers use: the daemon loop (the
    request/reply server half's, eda.core.reqrep.Service), the socket module when it
    probes nothing, nor the IDNA codec (stringprep, unicodedata) for an ASCII endpoint
    it probes (eda-txn commit's check that the coordinator given accepts connections)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # fmt: skip
    _, names = imported(["-S", "-m", *args], status, as_installed(env, tmp_path))
    assert {"zmq", "eda.core.reqrep"} <= names  # the command did its network work
    needless = sorted(names & unneeded)
    assert needless == [], f"{args[0]} {args[1]} imports {needless}"

# each subcommand of a lazy group (eda.cli.lazygroup) and the modules only other subcommands need
LAZY = {
    "eda.cli.registryserve": ["registry", "serve"],
    "eda.cli.registryquery": ["registry", "lookup"],
    "eda.cli.registrywatch": ["registry", "watch"],
    "eda.cli.lbworker": ["lb", "worker"],
    "eda.cli.lbcall": ["lb", "call"],
    "eda.cli.lbserve": ["lb", "serve"],
    "eda.cli.lbstats": ["lb", "stats"],
    "eda.cli.lbtcp": ["lb", "tcp"],
    "eda.cli.txndaemons": ["txn", "coordinator"],
    "eda.cli.txncommit": ["txn", "commit"],
    "eda.cli.txnresolve": ["txn", "resolve"],
    "eda.cli.txnsaga": ["txn", "saga"],
    "eda.cli.txnstatus": ["txn", "status"],
    "eda.cli.busserve": ["bus", "serve"],
    "eda.cli.busadmin": ["bus", "stats"],
}


@pytest.mark.parametrize("program", ["registry", "lb", "txn", "bus"])
def test_group_help_lists_every_subcommand(program):
    """``eda-X --help`` lists each subcommand with its short help, taken from its definition."""
    import click

    command = importlib.import_module(f"eda.cli.{program}").command
    out, _ = imported(["-m", f"eda.cli.{program}", "--help"])
    listed = out.split("Commands:\n", 1)[1]
    for name, sub in command.commands.items():
        ctx = click.Context(sub)
        assert f"  {name} " in listed
        assert sub.get_short_help_str(40)[:20] in listed, (name, ctx)


@pytest.mark.parametrize("module", sorted(LAZY))
def test_a_subcommand_imports_no_other_subcommands_module(module):
    """Running (here: asking for the help of) one subcommand imports its own module only."""
    program, sub = LAZY[module]
    _, names = imported(["-m", f"eda.cli.{program}", sub, "--help"])
    assert module in names
    others = sorted(m for m in LAZY if m != module and LAZY[m][0] == program)
    assert not names & set(others), f"eda-{program} {sub} imports {sorted(names & set(others))}"


def test_a_config_key_of_another_subcommand_is_no_error(tmp_path):
    """Only the subcommand that runs is imported, yet a config key of another subcommand is
    still accepted, and one of no subcommand still refused (exit 2)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), EDA_NO_MDNS="1")
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[registry]\nttl = 5\n")  # register's option
    bad.write_text("[registry]\nno_such_option = 5\n")
    lookup = [sys.executable, "-m", "eda.cli.registry", "lookup", "db", "-c"]
    result = subprocess.run([*lookup, str(good)], capture_output=True, text=True, env=env,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stderr  # the config was fine: it looked
    assert "no registry found" in result.stderr
    result = subprocess.run([*lookup, str(bad)], capture_output=True, text=True, env=env,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "no_such_option' is not an option of eda-registry" in result.stderr


# a subcommand per program with subcommands, whose --help the launcher also knows
HELP_OF = {"pub": [], "sub": [], "keys": ["trust"], "registry": ["lookup"], "bus": ["stats"],
           "lb": ["call"], "txn": ["commit"]}  # fmt: skip


def launched(program: str, args: list[str], env: dict[str, str]) -> tuple[str, set[str]]:
    """What the installed ``eda-PROGRAM ARGS`` prints (via eda.cli.launch), and imports."""
    module, _, function = entry_points()[f"eda-{program}"].partition(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return imported(["-c", code, *args], env=env)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_is_clicks_text_without_click(program, tmp_path):
    """``eda-X [SUB] --help`` prints exactly what click renders, at a pipe's width (80) and
    a wide terminal's, without importing click (the text generated by scripts/gendocs.py)."""
    for columns in ("80", "132"):
        env = dict(os.environ, COLUMNS=columns, XDG_CONFIG_HOME=str(tmp_path))
        env.pop("EDA_CONFIG", None)
        for args in {(), tuple(HELP_OF[program])}:
            out, names = launched(program, [*args, "--help"], env)
            assert "click" not in names, (program, args, columns)
            clicks = subprocess.run(
                [sys.executable, "-m", f"eda.cli.{program}", *args, "--help"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            assert out == clicks.stdout, (program, args, columns)


def test_help_with_a_config_file_is_clicks_own(tmp_path):
    """A config file may change the defaults help shows: then click renders it."""
    (tmp_path / "eda").mkdir()
    (tmp_path / "eda" / "config.toml").write_text("[pub]\n")
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path))
    out, names = launched("pub", ["--help"], env)
    assert "click" in names
    assert out.startswith("Usage: eda-pub")


def test_help_imports_nothing_but_its_text(tmp_path):
    """Beyond what the interpreter imports for ``python -c pass``, ``eda-X --help`` imports
    eda's launcher, the help texts and the config file finder: no click, no typing, re,
    shutil (with bz2, lzma), functools or importlib (with warnings).  As installed:
    without the site-packages' .pth hooks, which may import any of them first."""
    env = as_installed(dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)), tmp_path)
    env.pop("EDA_CONFIG", None)
    floor = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", "import site"],
                           capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    baseline = {line.rsplit("|", 1)[1].strip() for line in floor.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}  # fmt: skip
    for args in (["--help"], ["lookup", "-h"]):
        _, names = imported(["-S", str(Path(sys.executable).parent / "eda-registry"), *args],
                            env=env)  # fmt: skip
        extra = sorted(names - baseline)
        assert extra == ["eda", "eda.cli", "eda.cli.helptext", "eda.cli.launch", "eda.core",
                         "eda.core.configpaths"], extra  # fmt: skip


# records, in order, the first import of click and of pyzmq and every datagram sent to
# the mDNS port (from any thread), then runs the installed eda-pub (its console script)
AUDITED = """
import os, sys
seen = []
def hook(event, args):
    if event == "import" and args[0] in ("click", "zmq"):
        seen.append("import " + args[0])
    elif event == "socket.sendto" and isinstance(args[1], tuple) and args[1][1:2] == (5353,):
        seen.append("mdns question")
sys.addaudithook(hook)
import atexit
atexit.register(lambda: os.write(2, ("\\nAUDIT " + ",".join(seen) + "\\n").encode()))
from eda.cli.launch import pub
sys.exit(pub())
"""


def audited_pub(args: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    """Exit status, the AUDITED events and stderr of the installed ``eda-pub ARGS``."""
    result = subprocess.run([sys.executable, "-c", AUDITED, *args], capture_output=True,
                            text=True, env=env, timeout=60)  # fmt: skip
    events = result.stderr.rsplit("\nAUDIT ", 1)[1].strip()
    return result.returncode, events.split(",") if events else [], result.stderr


def test_one_shot_publish_asks_for_subscribers_before_importing_click_and_pyzmq(tmp_path):
    """``eda-pub TOPIC MESSAGE`` sends its mDNS question as it starts, so the answers and
    the settle for newcomers (50 ms) pass while click and pyzmq are imported, instead
    of after; with an option or a setting that could change how it looks, or --no-mdns,
    it asks only once the command knows (or not at all)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # fmt: skip
    for name in ("EDA_CONFIG", "EDA_INTERFACE", "EDA_NO_MDNS"):
        env.pop(name, None)
    code, events, err = audited_pub(["t", "one-shot"], env)
    assert code == 0, err  # nobody listening: a warning, exit 0
    assert events[0] == "mdns question", events
    assert {"import click", "import zmq"} <= set(events)
    # an option: the command decides, after parsing (the question after click's import)
    code, events, err = audited_pub(["--discover-timeout", "0.2", "t", "x"], env)
    assert code == 0, err
    assert events.index("import click") < events.index("mdns question"), events
    for args, extra in (
        (["--no-mdns", "t", "x"], {}),
        (["t", "x"], {"EDA_NO_MDNS": "1"}),
        (["t", "x"], {"EDA_PUB_BUS": "tcp://127.0.0.1:9"}),  # (the bus is not there: exit 1)
    ):
        code, events, err = audited_pub(args, {**env, **extra})
        assert "mdns question" not in events, (args, extra, events)


def test_a_publish_that_fails_after_asking_exits_cleanly(tmp_path):
    """The question asked as eda-pub starts is let end when the command fails before
    taking its answer: the usual one-line error and status, and the discovery cache
    written whole (no temporary file left)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # fmt: skip
    code, events, err = audited_pub(["orders/#", "x"], env)  # an MQTT-style topic
    assert code == 2, err
    assert events[:1] == ["mdns question"], events
    assert "eda-pub: error: invalid topic 'orders/#'" in err and "Traceback" not in err
    cache_dir = tmp_path / "cache" / "eda"
    assert [p.name for p in cache_dir.iterdir()] == ["discovery.json"]


# says whether the interpreter was torn down (its modules cleared: an object held by
# one is collected then) and whether the atexit functions ran, then runs a program
TEARDOWN = """
import os, sys
class Held:
    def __del__(self, write=os.write):
        write(2, b"\\nTEARDOWN\\n")
held = Held()
import atexit
atexit.register(lambda: os.write(2, b"\\nATEXIT\\n"))
from eda.cli.launch import {function}
sys.exit({function}())
"""


@pytest.mark.parametrize(
    ("program", "args", "status", "torn_down"),
    [
        ("pub", ["t", "one-shot"], 0, False),  # nobody listening: a warning, exit 0
        ("pub", ["orders/#", "x"], 2, False),  # a usage error
        ("registry", ["lookup", "db", "--no-mdns"], 1, False),  # no registry found
        ("lb", ["call", "echo", "x", "--connect", "tcp://127.0.0.1:9", "--timeout", "0.2"], 3,
         False),  # nobody there: no live instance
        ("txn", ["status", "--log", "{tmp}"], 0, True),  # not a one-shot of shell loops
    ],
    ids=["pub", "pub-usage", "registry-lookup", "lb-call", "txn-status"],
)
def test_a_one_shot_command_exits_without_the_interpreters_teardown(
    tmp_path, program, args, status, torn_down
):
    """The commands shell loops run leave at once when done, their exit status kept, the
    atexit functions run (and stdout, stderr flushed): tearing the interpreter down
    (a tenth of their time) does nothing they need.  Other commands exit as usual."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))  # fmt: skip
    module, _, function = entry_points()[f"eda-{program}"].partition(":")
    code = TEARDOWN.format(function=function).replace("eda.cli.launch", module)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, env=env, timeout=60)  # fmt: skip
    assert result.returncode == status, result.stderr
    assert "\nATEXIT\n" in result.stderr
    assert ("\nTEARDOWN\n" in result.stderr) == torn_down, result.stderr
    assert "Traceback" not in result.stderr


def test_the_early_question_never_hides_a_new_subscriber(procs):
    """Through the installed eda-pub, whose mDNS question goes out as it starts (and whose
    wait for newcomers passes during its imports): a subscriber started since the last
    run, which the discovery cache does not know, still gets the event."""
    first = procs.sub_ready("t", "-C", "2")
    code, events, err = audited_pub(["t", "warm the cache"], dict(os.environ))
    assert code == 0 and events[0] == "mdns question", (events, err)
    first.wait_lines(1)
    second = procs.sub_ready("t", "-C", "1")  # not in the cache yet
    code, events, err = audited_pub(["t", "both"], dict(os.environ))
    assert code == 0 and events[0] == "mdns question", (events, err)
    assert first.wait() == 0 and second.wait() == 0
    assert json.loads(second.lines()[0])["data"] == "both"


def test_the_client_base_generates_no_dataclass_but_liveness():
    """Importing the request/reply client base (eda.core.reqrep, with eda.core.sockets and
    eda.core.security: every client and daemon) generates no dataclass besides
    sockets.Liveness (copied with dataclasses.replace): generating one costs each
    program's start-up 2-3 million instructions, about 1 % of a one-shot command."""
    code = """
import dataclasses
import eda.core.endpoint, eda.core.errors, eda.core.keys  # (their own classes: not counted)
made = []
original = dataclasses._process_class
def spy(cls, *args):
    made.append(f"{cls.__module__}.{cls.__qualname__}")
    return original(cls, *args)
dataclasses._process_class = spy
import eda.core.reqrep
print(" ".join(made))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["eda.core.sockets.Liveness"]
