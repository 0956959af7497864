"""Options more than one command shares, each defined once.

Every program has :func:`common_options`; commands that print items take
:func:`output_options` (``--format``, ``--json``); those that find services
:func:`registry_option`; secure ones :func:`security_options` (daemons also
:func:`allow_option`, :func:`metrics_option`, :func:`advertise_options`); the TCP
proxy and ``eda-registry register`` :func:`health_check_options`; eda-lb's three
balancers :func:`strategy_option` (the names are
:data:`eda.core.lb.balancer.STRATEGIES`) and, call, serve and worker alike,
:func:`retries_option`, :func:`slow_start_option`, :func:`heartbeat_option` and
:func:`size_option`.  Durations and counts are :func:`seconds_option` and
:func:`number_option`, one line each.

What a command only passes on reaches it as one typed value, built by the
decorator: ``ctx`` (:class:`~eda.cli.common.Context`: the program's name, -v,
--interface, --no-mdns), ``registry`` (:class:`~eda.cli.common.Registries`) and
``secure`` (:class:`SecureMode`, turned on by ``secure.apply()``).  A program of
subcommands is made by :func:`program_group`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import click

from eda.cli.common import SHARED_ENVVARS, Context, Registries
from eda.core import __version__
from eda.core.endpoint import Endpoint
from eda.core.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

SECONDS = click.FloatRange(min=0, min_open=True)
JSON_HELP = "JSON Lines even on a terminal."
# a health check at most every 10 ms: a shorter period spins a shell (or a connect) per
# loop turn, and HAProxy counts its check interval in whole milliseconds
CHECK_SECONDS = click.FloatRange(min=0.01)


def common_options(func: F) -> F:
    """Options every program has, given to the command as ``ctx``, its
    :class:`~eda.cli.common.Context`; --config is read by :func:`eda.cli.common.run`
    before click parses."""
    decorators = [
        click.option(
            "-c",
            "--config",
            "config",
            type=click.Path(dir_okay=False),
            envvar=SHARED_ENVVARS["--config"],
            expose_value=False,
            help="TOML config file (see FILES in the man page).",
        ),
        click.option(
            "--interface",
            envvar=SHARED_ENVVARS["--interface"],
            metavar="NAME|IP",
            help="Network interface (name or IPv4 address) for mDNS and binding.",
        ),
        click.option(
            "--no-mdns",
            "no_mdns",
            is_flag=True,
            envvar=SHARED_ENVVARS["--no-mdns"],
            help="Do not use mDNS (no announcing, no browsing): give endpoints explicitly.",
        ),
        click.option(
            "-v",
            "--verbose",
            "--debug",
            "verbose",
            is_flag=True,
            help="Diagnostics on stderr; tracebacks on errors.",
        ),
    ]
    func = version_help_options(cast(F, _with_context(func)))
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _with_context(func: Callable[..., Any]) -> Callable[..., Any]:
    """*func* called with ``ctx``, a :class:`~eda.cli.common.Context` of the program that
    runs (its name, -v, --interface, --no-mdns) instead of those three options."""

    @functools.wraps(func)
    def contextual(
        *args: Any, interface: str | None, no_mdns: bool, verbose: bool, **kwargs: Any
    ) -> Any:
        prog = click.get_current_context().find_root().info_name or ""
        return func(*args, ctx=Context(prog, verbose, interface, no_mdns), **kwargs)

    return contextual


def version_help_options(func: F) -> F:
    """--version and -h/--help."""
    func = click.help_option("-h", "--help")(func)
    return click.version_option(__version__, "--version", message="%(prog)s %(version)s")(func)


def program_group(
    subcommands: dict[str, str], epilog: str, options: bool = True
) -> Callable[[F], Any]:
    """Make the decorated function (its docstring: the program's help) the group of a program
    whose subcommands are each in a module of its own, imported only when it runs
    (:class:`~eda.cli.lazygroup.LazyGroup`: *subcommands* maps name to ``module:attribute``);
    with *options*, the group takes :func:`common_options` (they reach every subcommand
    through the config and ``EDA_*`` variables), else only --version and --help."""
    from eda.cli.lazygroup import LazyGroup

    def decorate(func: F) -> Any:
        func = common_options(func) if options else version_help_options(func)
        return click.group(
            cls=LazyGroup,
            subcommands=subcommands,
            epilog=epilog,
            context_settings={"max_content_width": 100},
        )(func)

    return decorate


def format_option(help: str) -> Callable[[F], F]:
    """--format TEMPLATE (*help* names the fields of the command)."""
    return click.option("--format", "template", metavar="TEMPLATE", help=help)


def json_option(help: str = JSON_HELP) -> Callable[[F], F]:
    """--json: JSON (Lines) even on a terminal."""
    return click.option("--json", "force_json", is_flag=True, help=help)


LOG_HELP = "Directory of the journals (JSON Lines, fsynced)."  # eda-txn's --log


def output_options(format_help: str, json_help: str = JSON_HELP) -> Callable[[F], F]:
    """--format TEMPLATE and --json, as :class:`eda.cli.output.Output` takes them."""

    def decorate(func: F) -> F:
        return format_option(format_help)(json_option(json_help)(func))

    return decorate


def registry_option(func: F) -> F:
    """--registry and --serverless, given to the command as ``registry``, one
    :class:`~eda.cli.common.Registries`."""
    func = click.option(
        "--serverless",
        is_flag=True,
        help="No registry: announce / find instances by mDNS alone.",
    )(func)
    return registries_option(func)


def registries_option(func: F) -> F:
    """--registry alone (for what only a registry can do), given as ``registry``."""

    @functools.wraps(func)
    def registered(*args: Any, registries: tuple[str, ...], **kwargs: Any) -> Any:
        serverless = bool(kwargs.pop("serverless", False))
        return func(*args, registry=Registries(tuple(registries), serverless), **kwargs)

    return click.option(
        "--registry",
        "registries",
        multiple=True,
        metavar="ENDPOINT",
        envvar="EDA_REGISTRY",
        help="Registry to use, e.g. tcp://10.0.0.5:7700 (repeatable; default: cached, then mDNS;"
        f" {SECURE_ENDPOINT}).",
    )(cast(F, registered))


def hwm_option(help: str) -> Callable[[F], F]:
    """--hwm N, the high-water mark of brokerless pub/sub (*help* says of what)."""
    return number_option("--hwm", type=click.IntRange(1), default=10_000, help=help, metavar=None)


def instance_id_option(func: F) -> F:
    """--id ID: the id a registered instance publishes (default: NAME-HOST-PORT)."""
    return click.option(
        "--id", "inst_id", metavar="ID", help="Instance id (default: NAME-HOST-PORT)."
    )(func)


def advertise_options(host_help: str) -> Callable[[F], F]:
    """--host HOST and --id ID: what a registered instance publishes (*host_help* says
    the command's default address)."""

    def decorate(func: F) -> F:
        return click.option("--host", metavar="HOST", help=host_help)(instance_id_option(func))

    return decorate


def health_check_options(interval: float, timeout: float) -> Callable[[F], F]:
    """--check-interval, --check-timeout, --rise and --fall; *interval* and *timeout* are
    the program's defaults (a registered service's command check runs every 5 s, the TCP
    proxy's connect checks every second)."""

    def decorate(func: F) -> F:
        options = [
            seconds_option("--check-interval", type=CHECK_SECONDS, default=interval,
                           help="Period of the health check."),
            seconds_option("--check-timeout", type=CHECK_SECONDS, default=timeout,
                           help="A check running longer fails."),
            number_option("--rise", type=click.IntRange(1), default=2,
                          help="Passing results in a row before an instance is passing again."),
            number_option("--fall", type=click.IntRange(1), default=3,
                          help="Failing results in a row before an instance stops passing."),
        ]  # fmt: skip
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def strategy_option(help: str) -> Callable[[F], F]:
    """--strategy, one of :data:`eda.core.lb.balancer.STRATEGIES` (round-robin by default)."""
    from eda.core.lb.balancer import STRATEGIES

    return click.option(
        "--strategy",
        type=click.Choice(STRATEGIES),
        default="round-robin",
        show_default=True,
        help=help,
    )


def number_option(
    *decls: str, type: Any, default: float | None = None, help: str, metavar: str | None = "N"
) -> Callable[[F], F]:
    """A number (*type*: its range), its default shown."""
    return click.option(
        *decls, type=type, default=default, show_default=default is not None,
        metavar=metavar, help=help,
    )  # fmt: skip


def seconds_option(
    *decls: str, default: float | None = None, help: str, type: Any = SECONDS
) -> Callable[[F], F]:
    """A duration in SECONDS (*type*: its range, more than 0 by default)."""
    return number_option(*decls, type=type, default=default, help=help, metavar="SECONDS")


# -- eda-lb: the options its commands share, each with the words of its command -----------
def heartbeat_option(help: str) -> Callable[[F], F]:
    """--heartbeat SECONDS (1 s by default)."""
    return seconds_option("--heartbeat", default=1.0, help=help)


def retries_option(help: str, most: int = 100, metavar: str | None = "N") -> Callable[[F], F]:
    """--retries N (2 by default, at most *most*)."""
    return number_option(
        "--retries", type=click.IntRange(0, most), default=2, help=help, metavar=metavar
    )


def slow_start_option(default: float, help: str) -> Callable[[F], F]:
    """--slow-start SECONDS: how long an instance that appears ramps its share up."""
    return seconds_option("--slow-start", type=click.FloatRange(0), default=default, help=help)


def request_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A size of requests (1MiB, 64MiB...) in bytes: 1 byte to 256 MiB."""
    from eda.core.bus.retention import parse_size

    try:
        size = parse_size(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None
    if not 0 < size <= 256 << 20:
        raise click.BadParameter("use 1 byte to 256MiB")
    return size


def size_option(name: str, default: str, help: str) -> Callable[[F], F]:
    """An option of a size of requests (:func:`request_size`), given to the command in bytes."""
    return click.option(
        name, default=default, show_default=True, metavar="SIZE", callback=request_size, help=help
    )


class EndpointType(click.ParamType[Endpoint]):
    """An option naming a server to connect to, parsed once into an
    :class:`~eda.core.endpoint.Endpoint` (``tcp://HOST:PORT``, ``HOST:PORT``,
    ``[V6]:PORT``); a wildcard host or port is refused (nothing to connect to)."""

    name = "endpoint"

    def __init__(self, what: str) -> None:
        self.what = what

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Endpoint:
        if isinstance(value, Endpoint):
            return value
        try:
            endpoint = Endpoint.parse(str(value), self.what)
            if endpoint.port == 0 or endpoint.host == "*":
                raise UsageError(
                    f"bad {self.what} endpoint {str(value)[:80]!r}: give the host and port "
                    "to connect to, not a wildcard"
                )
        except UsageError as exc:
            self.fail(str(exc), param, ctx)
        return endpoint


def key_options(func: F) -> F:
    """--key FILE and --trust DIR: this identity's key pair and the trusted keys' directory
    (defaults under ``$XDG_CONFIG_HOME/eda/keys``; see :mod:`eda.core.keys`)."""
    func = click.option(
        "--trust",
        "trust_dir",
        type=click.Path(file_okay=False),
        envvar="EDA_TRUST",
        metavar="DIR",
        help="Directory of trusted public keys, NAME.pub (default: "
        "$XDG_CONFIG_HOME/eda/keys/trusted).",
    )(func)
    return click.option(
        "--key",
        "key_file",
        type=click.Path(dir_okay=False),
        envvar="EDA_KEY",
        metavar="FILE",
        help="This identity's key pair (default: $XDG_CONFIG_HOME/eda/keys/id.key).",
    )(func)


SECURE_ENDPOINT = (
    "with --secure: NAME@tcp://HOST:PORT, NAME the trusted name of its key (eda-keys list)"
)
"""How an endpoint given by the user names its server's key in secure mode: one wording in
every help text (the one rule, :meth:`eda.core.security.Security.pinned`)."""


class SecureMode(NamedTuple):
    """--secure, --key, --trust and (a daemon's) --allow as given, one value for the
    command (:func:`security_options`), which turns secure mode on by :meth:`apply`
    once its own arguments are checked."""

    on: bool = False
    key_file: str | None = None
    trust_dir: str | None = None
    allow: tuple[str, ...] = ()

    def apply(self) -> Any:
        """:func:`apply_security` of these options (the active Security, or None)."""
        return apply_security(self.on, self.key_file, self.trust_dir, self.allow)


def security_options(func: F) -> F:
    """--secure, --key FILE and --trust DIR, given to the command as ``secure``, a
    :class:`SecureMode` (with --allow too when the command has :func:`allow_option`)."""

    @functools.wraps(func)
    def secured(
        *args: Any, secure: bool, key_file: str | None, trust_dir: str | None, **kwargs: Any
    ) -> Any:
        allow = tuple(kwargs.pop("allow", ()) or ())
        return func(*args, secure=SecureMode(secure, key_file, trust_dir, allow), **kwargs)

    wrapped = key_options(cast(F, secured))
    return click.option(
        "--secure",
        is_flag=True,
        envvar="EDA_SECURE",
        help="CURVE encryption and authentication on every connection: only peers whose "
        "key is trusted (eda-keys trust) are talked to.",
    )(wrapped)


def allow_option(func: F) -> F:
    """--allow NAME (repeatable): which trusted keys may call a secure daemon."""
    return click.option(
        "--allow",
        "allow",
        multiple=True,
        metavar="NAME",
        envvar="EDA_ALLOW",
        help="With --secure: admit only these trusted names (eda-keys list; repeatable; "
        "default: every trusted key).",
    )(func)


def apply_security(
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    allow: tuple[str, ...] = (),
) -> Any:
    """Turn secure mode on when asked (the :class:`eda.core.security.Security`, or None).

    --key, --trust and --allow without --secure are a usage error: a user who
    names a key expects encryption, never a silent plain connection.
    """
    if not secure:
        if key_file or trust_dir or allow:
            given = "--key, --trust and --allow are" if allow else "--key and --trust are"
            raise UsageError(f"{given} used with --secure (EDA_SECURE=1)")
        return None
    from pathlib import Path

    from eda.core import security

    active = security.enable(
        Path(key_file) if key_file else None, Path(trust_dir) if trust_dir else None
    )
    active.allow(allow)
    return active


def metrics_option(func: F) -> F:
    """--metrics HOST:PORT: serve Prometheus metrics there (:func:`serve_metrics`)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        from eda.core.metrics import parse_address

        try:
            return parse_address(value)
        except UsageError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return click.option(
        "--metrics",
        "metrics",
        metavar="HOST:PORT",
        callback=parse,
        help="Serve Prometheus metrics on http://HOST:PORT/metrics (':9464': every address; "
        "port 0: any); registrations and announcements then carry metrics=HOST:PORT.",
    )(func)


def serve_metrics(daemon: Any, address: Endpoint | None, say: Callable[[str], None]) -> Any:
    """Serve *daemon*'s /metrics where --metrics says (nothing without it) and *say* where:
    called once the daemon is made and before it registers, so its registration says it."""
    if address is None:
        return None
    from eda.core import metrics

    server = metrics.serve(daemon, address)
    say(f"metrics on {server.url}/metrics")
    return server
