"""Shared CLI plumbing: running a program -- config, errors, exit status, signals, stderr.

Every program is a click command wrapped by :func:`run`, which loads the
TOML config into click's ``default_map`` (so flags and ``EDA_*`` variables
win over it), renders errors as one line with the exit codes of
CONVENTIONS.md, and turns SIGTERM, SIGINT and a closed pipe into clean exits.
Options every program shares are in :mod:`eda.cli.options`, the output
modes in :mod:`eda.cli.output`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, NoReturn

import click

from eda.cli.lazygroup import LazyGroup, subcommand_of
from eda.core.config import Setting, default_paths, settings_for
from eda.core.errors import ConfigError, EdaError, ExitStatus, NotFoundError

if TYPE_CHECKING:
    from eda.core.registry.access import Access


# what each status means, as the man pages' EXIT STATUS and the README's table say it
EXIT_MEANINGS: dict[ExitStatus, str] = {
    ExitStatus.OK: "success (also: a closed output pipe, SIGTERM)",
    ExitStatus.ERROR: (
        "runtime error (network, I/O, remote refused), some input was rejected, "
        "or an --exec command failed"
    ),
    ExitStatus.USAGE: "usage error (bad flag, bad config)",
    ExitStatus.NOT_FOUND: "not found (no such service, no passing instance)",
    ExitStatus.TIMEOUT: (
        "timeout reached before the requested work finished (-W, --wait-subscribers)"
    ),
    ExitStatus.LOSS: "data loss detected (--strict); eda-txn: the transaction aborted",
    ExitStatus.INTERRUPTED: "interrupted (SIGINT)",
}

# options every program shares keep one variable each; every other option gets
# EDA_<PROGRAM>_<LONG OPTION> (assign_envvars)
SHARED_ENVVARS = {
    "--config": "EDA_CONFIG",
    "--interface": "EDA_INTERFACE",
    "--no-mdns": "EDA_NO_MDNS",
}


class Exit(Exception):
    """Leave the program with *code* after cleanup (raised from deep inside loops)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Terminated(BaseException):
    """SIGTERM arrived: flush, clean up and exit."""


def _stderr(line: str) -> None:
    """Every line a program writes on stderr goes through here."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Context:
    """What a running program needs besides its options: its name, stderr, and the
    options every program has (--interface, --no-mdns, -v: :func:`eda.cli.options.common_options`
    gives a command its Context)."""

    def __init__(
        self, prog: str, verbose: bool, interface: str | None = None, no_mdns: bool = False
    ) -> None:
        self.prog = prog
        self.verbose = verbose
        self.interface = interface
        self.no_mdns = no_mdns
        self._last: dict[str, float] = {}

    def warn(self, message: str) -> None:
        _stderr(f"{self.prog}: {message}")

    def error(self, message: str) -> None:
        _stderr(f"{self.prog}: error: {message}")

    def debug(self, message: str) -> None:
        if self.verbose:
            self.warn(message)

    def due(self, key: str, interval: float = 1.0) -> bool:
        """Whether a rate-limited warning named *key* may be written now (once per *interval*)."""
        now = time.monotonic()
        if now - self._last.get(key, -interval) < interval:
            return False
        self._last[key] = now
        return True


class Registries(NamedTuple):
    """--registry (repeatable) and --serverless as given
    (:func:`eda.cli.options.registry_option`)."""

    given: tuple[str, ...] = ()
    serverless: bool = False


def registry_access(registry: Registries, ctx: Context) -> Access:
    """How a program finds services: the ``--registry``/``--serverless`` options and the
    common ``--interface``/``--no-mdns`` as an :class:`~eda.core.registry.access.Access`;
    in secure mode, registries announced and skipped are said (:func:`secure_reports`)."""
    from eda.cli.secure import secure_reports
    from eda.core.registry.access import Access, resolve_interface

    access = Access(
        registries=registry.given,
        interface=resolve_interface(ctx.interface),
        mdns=not ctx.no_mdns,
        serverless=registry.serverless,
        log=ctx.debug,
    )
    secure_reports(ctx, access, "registry")
    return access


class _Signals:
    """SIGTERM arriving while output is being written waits for the write to end."""

    writing = False
    term_pending = False
    interrupted = False  # SIGINT stopped a daemon: it ends cleanly, and exits 130


def on_stop_signals(handler: Callable[[int, Any], None]) -> None:
    """Call *handler* on SIGINT and SIGTERM (a daemon's clean shutdown).

    A command that returns after a SIGINT exits 130 (interrupted), after a
    SIGTERM 0, as the exit-code table says; :func:`run` sees to it.
    """

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            _Signals.interrupted = True
        handler(signum, frame)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


CLOSED_STDOUT = "stdout is closed (>&-): there is nowhere to write the output"


class _Standard:
    """Which of the standard descriptors were closed when the program started."""

    closed: ClassVar[set[int]] = set()


def hold_standard_fds() -> None:
    """Give a closed stdin, stdout or stderr (``cmd >&-``) /dev/null.

    Python has no ``sys.stdout`` then, and the next file or socket opened (a
    store, a ZeroMQ socket) would take descriptor 1 and receive the output.
    A closed stdin reads as empty and a closed stderr discards; stdout is held
    read-only, so writing output still fails (EBADF), reported as
    :data:`CLOSED_STDOUT`.
    """
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        held = os.open(os.devnull, flags)  # the lowest free number: fd itself, in this order
        if held != fd:
            os.dup2(held, fd)
            os.close(held)
        _Standard.closed.add(fd)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (lives as long as the process)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def _closed_stdout(exc: OSError) -> bool:
    return exc.errno == errno.EBADF and 1 in _Standard.closed


def write_stdout(data: bytes) -> None:
    """Write all of *data* to stdout now (a closed pipe ends the program with 0).

    A SIGTERM during the write takes effect once it is done, so no line is
    cut in half; a second SIGTERM ends it at once (a reader that never reads).
    """
    view = memoryview(data)
    _Signals.writing = True
    try:
        while view:
            written = os.write(1, view)
            view = view[written:]
    except BrokenPipeError:
        raise Exit(ExitStatus.OK) from None
    except OSError as exc:
        if _closed_stdout(exc):
            raise EdaError(CLOSED_STDOUT) from None
        raise
    finally:
        _Signals.writing = False
    if _Signals.term_pending:
        raise Terminated()


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
    subcommand that has that option.  Of a :class:`LazyGroup`, only the
    subcommand *argv* runs is imported, unless a key is none of its options.
    """
    from eda.cli import PROGRAMS

    section = program.removeprefix("eda-")
    tables = {name.removeprefix("eda-") for name in PROGRAMS}
    settings = settings_for(section, default_paths(_config_path(argv)), tables)
    if not isinstance(command, LazyGroup):
        return _defaults(command, program, settings)
    command.commands.get(subcommand_of(command, argv) or "")
    try:
        return _defaults(command, program, settings, command.commands.loaded())
    except ConfigError:  # perhaps another subcommand's option: the error if nobody's
        return _defaults(command, program, settings)


def _defaults(
    command: click.Command,
    program: str,
    settings: dict[str, Setting],
    subcommands: dict[str, click.Command] | None = None,
) -> dict[str, Any]:
    """:func:`default_map` over *subcommands* (default: all of a group's)."""
    section = program.removeprefix("eda-")
    targets: list[tuple[str | None, dict[str, click.Parameter]]]
    if isinstance(command, click.Group):
        subs = dict(command.commands.items()) if subcommands is None else subcommands
        targets = [(name, _options_by_key(sub)) for name, sub in subs.items()]
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


def _commands(command: click.Command) -> list[click.Command]:
    """*command* and its subcommands (of a :class:`LazyGroup`, those imported so far)."""
    if isinstance(command, LazyGroup):
        return [command, *command.commands.loaded().values()]
    if isinstance(command, click.Group):
        return [command, *command.commands.values()]
    return [command]


def envvar_prefix(program: str) -> str:
    return "EDA_" + program.removeprefix("eda-").upper().replace("-", "_")


# options whose value means something else in each subcommand (a template names
# that subcommand's fields): their variable names the subcommand, EDA_TXN_STATUS_FORMAT
PER_SUBCOMMAND = ("--format",)


def assign_envvars(command: click.Command, program: str) -> None:
    """Give every option without one its environment variable, EDA_<PROGRAM>_<OPTION>
    (``EDA_SUB_TIMEOUT`` for eda-sub's ``--timeout``); for a group, the variable
    feeds every subcommand that has the option, as a config key does, except for
    :data:`PER_SUBCOMMAND` options: EDA_<PROGRAM>_<SUBCOMMAND>_<OPTION>.  A
    :class:`LazyGroup`'s subcommands get theirs when imported."""
    prefix = envvar_prefix(program)
    for cmd in _commands(command):
        _assign_envvars(cmd, prefix, cmd is not command)
    if isinstance(command, LazyGroup):
        command.commands.prepare = partial(_assign_envvars, prefix=prefix, subcommand=True)


def _assign_envvars(cmd: click.Command, prefix: str, subcommand: bool) -> None:
    sub = f"_{cmd.name}" if subcommand and cmd.name else ""
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.envvar or not param.expose_value:
            continue
        long = [opt for opt in param.opts if opt.startswith("--")]
        if long:
            name = long[0][2:] if long[0] not in PER_SUBCOMMAND else sub + "_" + long[0][2:]
            param.envvar = f"{prefix}_{name.lstrip('_').replace('-', '_').upper()}"


def _on_sigterm(signum: int, frame: Any) -> None:
    if _Signals.writing and not _Signals.term_pending:
        _Signals.term_pending = True  # write_stdout raises once its data is out
        return
    raise Terminated()


def run(command: click.Command, program: str, argv: list[str] | None = None) -> NoReturn:
    """Run *command* as *program* and exit with the conventional status."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "--verbose", "--debug") for a in argv) or os.environ.get(
        f"{envvar_prefix(program)}_VERBOSE", ""
    ).lower() in ("1", "true", "yes", "on")
    signal.signal(signal.SIGTERM, _on_sigterm)
    hold_standard_fds()
    code: int = ExitStatus.OK
    assign_envvars(command, program)
    try:
        defaults = default_map(command, program, argv)
        command.main(argv, prog_name=program, standalone_mode=False, default_map=defaults)
    except Exit as exc:
        code = exc.code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group run without a subcommand
            _stderr(exc.format_message())
        else:
            see = exc.ctx.command_path if exc.ctx is not None else program  # the subcommand's
            _stderr(f"{program}: error: {exc.format_message()} (see {see} --help)")
        code = ExitStatus.USAGE
    except click.Abort:
        code = ExitStatus.INTERRUPTED
    except EdaError as exc:
        if verbose and not isinstance(exc, NotFoundError):  # a not-found is one line
            import traceback

            traceback.print_exc()
        _stderr(f"{program}: error: {exc}")
        code = exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        code = ExitStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else ExitStatus.OK
    except BrokenPipeError:
        code = ExitStatus.OK
    except OSError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        what = CLOSED_STDOUT if _closed_stdout(exc) else exc.strerror or exc
        _stderr(f"{program}: error: {what}")
        code = ExitStatus.ERROR
    if code == ExitStatus.OK and _Signals.interrupted:
        code = ExitStatus.INTERRUPTED  # a daemon that SIGINT stopped cleanly (see on_stop_signals)
    with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stdout
        sys.stdout.flush()
    # stdout may be a closed pipe: keep the interpreter from complaining on exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.exit(code)
