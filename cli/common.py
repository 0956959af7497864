"""Shared CLI plumbing: options, config, output modes, errors and signals.

Every program is a click command wrapped by :func:`run`, which loads the
TOML config into click's ``default_map`` (so flags and ``EDA_*`` variables
win over it), renders errors as one line with the exit codes of
CONVENTIONS.md, and turns SIGTERM, SIGINT and a closed pipe into clean exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Collection
from typing import Any, NoReturn, TypeVar

import click

from eda.core import __version__
from eda.core.config import Setting, default_paths, settings_for
from eda.core.errors import ConfigError, EdaError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_LOSS = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130


class Exit(Exception):
    """Leave the program with *code* after cleanup (raised from deep inside loops)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Terminated(Exception):
    """SIGTERM arrived: flush, clean up and exit."""


def common_options(func: F) -> F:
    """Options every program has."""
    decorators = [
        click.option(
            "-c",
            "--config",
            "config",
            type=click.Path(dir_okay=False),
            envvar="EDA_CONFIG",
            help="TOML config file (see FILES in the man page).",
        ),
        click.option(
            "--interface",
            envvar="EDA_INTERFACE",
            metavar="NAME|IP",
            help="Network interface (name or IPv4 address) for mDNS and binding.",
        ),
        click.option(
            "--no-mdns",
            "no_mdns",
            is_flag=True,
            envvar="EDA_NO_MDNS",
            help="Do not use mDNS; wire everything with --connect/--bind.",
        ),
        click.option(
            "-v",
            "--verbose",
            "--debug",
            "verbose",
            is_flag=True,
            help="Diagnostics on stderr; tracebacks on errors.",
        ),
        click.version_option(__version__, "--version", message="%(prog)s %(version)s"),
        click.help_option("-h", "--help"),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def output_options(func: F) -> F:
    """Options choosing how items are printed on stdout."""
    func = click.option(
        "--format",
        "template",
        metavar="TEMPLATE",
        help="Print one line per item from a template, e.g. '{time} {topic} {data}'.",
    )(func)
    return click.option(
        "--json", "force_json", is_flag=True, help="JSON Lines even on a terminal."
    )(func)


# CSI and OSC escape sequences, then any other C0/C1 control character but tab
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0a-\x1f\x7f-\x9f]"
)


def for_terminal(value: object) -> str:
    """*value* as text safe to show on a terminal: escape sequences and control
    characters (anything a peer could use to retitle, clear or move the screen)
    become visible ``\\xNN`` escapes.  Render the result with rich ``Text``
    objects (never as markup), or pass it through ``rich.markup.escape``.
    """
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


class Template:
    """``--format TEMPLATE``: ``str.format`` fields, ``\\t`` a tab.

    With *fields* (the names an item can have), a template naming any other
    field is refused at once, as ``mosquitto_sub -F`` does; a known field an
    item lacks renders blank.  A template that cannot render an item
    (``{x[0]}`` on a string, say) is a usage error with a one-line message,
    not a traceback.
    """

    def __init__(self, text: str, fields: Collection[str] | None = None) -> None:
        import string

        self.text = text.replace("\\t", "\t")
        try:  # refuse a malformed template before any work is done
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise click.UsageError(f"--format {self.text!r}: {exc}") from None
        if fields is not None:
            for _, name, _, _ in parsed:
                if name is None:
                    continue
                base = re.split(r"[.\[]", name, maxsplit=1)[0]
                if base not in fields:
                    known = ", ".join(sorted(fields))
                    raise click.UsageError(
                        f"--format: unknown field {{{base}}}; known fields: {known}"
                    )

    def line(self, fields: dict[str, Any]) -> str:
        """One rendered line, newline included."""
        try:
            return self.text.format_map(_Fields(fields)) + "\n"
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise click.UsageError(f"--format {self.text!r}: {exc}") from None


class Context:
    """What a running program needs besides its options: its name and stderr."""

    def __init__(self, prog: str, verbose: bool) -> None:
        self.prog = prog
        self.verbose = verbose

    def warn(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.stderr.flush()

    def debug(self, message: str) -> None:
        if self.verbose:
            self.warn(message)


def write_stdout(data: bytes) -> None:
    """Write all of *data* to stdout now (a closed pipe ends the program with 0)."""
    view = memoryview(data)
    try:
        while view:
            written = os.write(1, view)
            view = view[written:]
    except BrokenPipeError:
        raise Exit(EXIT_OK) from None


def _config_path(argv: list[str]) -> str | None:
    """Find -c/--config before click parses, so the file can feed default_map."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
        if arg == "--":
            break
    return os.environ.get("EDA_CONFIG")


def _options_by_key(command: click.Command) -> dict[str, click.Parameter]:
    """The options a config key can name: ``idle_timeout`` and ``timeout`` for -W/--timeout."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if not param.name or param.name == "config":
            continue
        keys[param.name] = param
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = param
    return keys


def default_map(command: click.Command, program: str, argv: list[str]) -> dict[str, Any]:
    """Config-file values for *command*, type-checked, errors naming file, line and key.

    Keys are option names; the per-program table is named after the program
    without ``eda-``.  For a program with subcommands, a key feeds every
    subcommand that has that option.
    """
    section = program.removeprefix("eda-")
    settings = settings_for(section, default_paths(_config_path(argv)))
    targets: list[tuple[str | None, dict[str, click.Parameter]]]
    if isinstance(command, click.Group):
        targets = [(name, _options_by_key(sub)) for name, sub in command.commands.items()]
    else:
        targets = [(None, _options_by_key(command))]
    result: dict[str, Any] = {}
    for key, setting in settings.items():
        used = False
        for sub_name, options in targets:
            param = options.get(key)
            if param is None or not param.name:
                continue
            into = result if sub_name is None else result.setdefault(sub_name, {})
            into[param.name] = _convert(param, setting)
            used = True
        if not used and setting.key.startswith(f"{section}."):
            raise ConfigError(f"{setting.where()} is not an option of {program}")
    return result


def _convert(param: click.Parameter, setting: Setting) -> Any:
    try:
        if param.multiple or (param.nargs != 1):
            values = setting.value if isinstance(setting.value, list) else [setting.value]
            return [param.type.convert(v, param, None) for v in values]
        return param.type.convert(setting.value, param, None)
    except click.BadParameter as exc:
        raise ConfigError(f"{setting.where()}: {exc.message}") from None


def _on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def run(command: click.Command, program: str, argv: list[str] | None = None) -> NoReturn:
    """Run *command* as *program* and exit with the conventional status."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "--verbose", "--debug") for a in argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    code = EXIT_OK
    try:
        defaults = default_map(command, program, argv)
        command.main(argv, prog_name=program, standalone_mode=False, default_map=defaults)
    except Exit as exc:
        code = exc.code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.UsageError as exc:
        hint = f" (see {program} --help)"
        sys.stderr.write(f"{program}: error: {exc.format_message()}{hint}\n")
        code = EXIT_USAGE
    except click.Abort:
        code = EXIT_INTERRUPTED
    except EdaError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"{program}: error: {exc}\n")
        code = exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        code = EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_OK
    except BrokenPipeError:
        code = EXIT_OK
    except OSError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"{program}: error: {exc.strerror or exc}\n")
        code = EXIT_ERROR
    with contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.flush()
    # stdout may be a closed pipe: keep the interpreter from complaining on exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.exit(code)
