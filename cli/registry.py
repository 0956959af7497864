"""eda-registry: the registry center, registration with health checks, lookups and watches.

The subcommands (options, help texts, the core call); how what they find
prints is in ``registryviews.py``, the logic in ``eda.core.registry``.  Over
500 lines for a reason: eight subcommands whose option declarations and help
texts (the man page) are most of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eda.cli.common import Context, Exit, Terminated, registry_access, run
from eda.cli.options import (
    SECONDS,
    SECURE_ENDPOINT,
    apply_security,
    common_options,
    health_check_options,
    metrics_option,
    output_options,
    registries_option,
    registry_option,
    security_options,
    serve_metrics,
)
from eda.cli.output import Output
from eda.cli.registryviews import (
    BROWSE_FIELDS,
    EVENT_FIELDS,
    INSTANCE_FIELDS,
    SERVICE_FIELDS,
    SERVICES_TABLE,
    browse_fields,
    browse_line,
    event_output,
    instance_output,
    print_instances,
)
from eda.core import __version__
from eda.core.errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from eda.core.registry.access import Access


EPILOG_GROUP = """\b
Examples:
  eda-registry serve --data /var/lib/eda/registry --dns 127.0.0.1:8600
  eda-registry register orders --port 8080 --meta version=2 --check tcp
  eda-registry register web --port 8000 -- python3 -m http.server 8000
  eda-registry lookup orders --format '{host}:{port}'
  eda-registry services
  eda-registry watch orders --exec ./reload.sh
  eda-registry browse _http._tcp
  eda-registry lookup orders --secure --registry reg@tcp://10.0.0.5:7700
"""


def _output_options(example: str, fields: tuple[str, ...]) -> Callable[[Any], Any]:
    """--format (with this command's own fields) and --json."""
    return output_options(
        f"Print one line per item from a template, e.g. {example!r}. "
        f"Fields: {', '.join(fields)}; {{meta}} is JSON, {{meta[KEY]}} one value."
    )


@click.group(epilog=EPILOG_GROUP, context_settings={"max_content_width": 100})
@click.version_option(__version__, "--version", message="%(prog)s %(version)s")
@click.help_option("-h", "--help")
def command() -> None:
    """Service registration and discovery for a LAN.

    A registry (`serve`) keeps who runs where; services `register` and
    heartbeat; clients `lookup`, `list` and `watch`.  Registries are found by
    mDNS and replicate with each other.  Without any registry, `register`,
    `lookup` and `watch` work by mDNS alone (serverless mode).
    """


# -- serve ----------------------------------------------------------------------------
@command.command(
    epilog="""\b
Examples:
  eda-registry serve                                  announce by mDNS, listen on port 7700
  eda-registry serve --data /var/lib/eda/registry     keep state across restarts
  eda-registry serve --dns 127.0.0.1:8600             answer orders.service.eda A/SRV
  eda-registry serve --bind tcp://10.0.0.5:7700 --peer tcp://10.0.0.6:7700 --no-mdns
  eda-registry serve --secure --peer reg2@tcp://10.0.0.6:7700   peer named by its trusted key
"""
)
@click.option(
    "--bind",
    default="tcp://*:7700",
    show_default=True,
    metavar="ENDPOINT",
    envvar="EDA_REGISTRY_BIND",
    help="Where to listen for requests (tcp://HOST:PORT, PORT may be '*').",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Persist state here (append-only log + snapshots).",
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    metavar="ENDPOINT",
    help="Another registry to replicate with (repeatable; mDNS finds them too;"
    f" {SECURE_ENDPOINT}).",
)
@click.option(
    "--dns",
    metavar="HOST:PORT",
    help="Also answer DNS for NAME.service.eda here, e.g. 127.0.0.1:8600.",
)
@click.option(
    "--tick",
    type=SECONDS,
    default=0.5,
    show_default=True,
    metavar="SECONDS",
    help="Liveness beacon period on the change stream.",
)
@click.option(
    "--peer-timeout",
    type=SECONDS,
    default=3.0,
    show_default=True,
    metavar="SECONDS",
    help="A peer registry silent this long is considered down.",
)
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="Also serve the HTTP API here (register, heartbeat, lookup, change stream as SSE).",
)
@security_options
@metrics_option
@common_options
def serve(
    bind: str,
    data: str | None,
    peers: tuple[str, ...],
    dns: str | None,
    http: str | None,
    tick: float,
    peer_timeout: float,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
    metrics: Any,
) -> None:
    """Run a registry: accept registrations, expire silent instances, stream changes.

    Announced by mDNS as _eda-registry._tcp; other registries found that way
    (or given with --peer) replicate every change (eventually consistent).
    A --bind port of '*' is remembered (in --data, else in
    $XDG_STATE_HOME/eda/registry.port): restarted with the same command, the
    registry listens where its clients expect it.

    With --secure only trusted keys register, heartbeat, look up, watch and
    replicate; each record carries the key its registrant proved, and only
    that key heartbeats or deregisters it.  The DNS interface stays plain.
    """
    from eda.core.registry.server import Server, Settings, peer_endpoint

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    iface = _iface(interface)
    if iface and bind == "tcp://*:7700":
        bind = f"tcp://{iface}:7700"
    for peer in peers:
        peer_endpoint(peer)  # a usage error before anything starts
    if http:
        from eda.core.registry.http import RegistryHttp, http_address

        http_at = http_address(http)
    settings = Settings(
        bind=bind,
        interface=iface,
        data=data,
        mdns=not no_mdns,
        peers=peers,
        dns=dns,
        tick=tick,
        peer_timeout=peer_timeout,
        remember=True,
    )
    server = Server(settings, log=ctx.debug, warn=ctx.warn)
    try:
        serve_metrics(server, metrics, ctx.warn)
        api = RegistryHttp(server, http_at) if http else None
        server.start()
        extra = f", DNS on {server.dns_address}" if server.dns_address else ""
        extra += f", HTTP on {api.url}" if api else ""
        ctx.warn(
            f"registry {server.id} listening on {server.endpoint} "
            f"(changes on {server.pub_endpoint}{extra})"
        )
        server.serve()
    finally:
        server.close()


# -- register ------------------------------------------------------------------------
@command.command(
    epilog="""\b
Examples:
  eda-registry register orders --port 8080 --meta version=2 --weight 3
  eda-registry register orders --port 8080 --check 'curl -fs localhost:8080/health'
  eda-registry register orders --port 8081 --check tcp -- python3 -m http.server 8081
  eda-registry register cache --port 6379 --ttl 3 --interval 1 --serverless
  eda-registry register orders --port 8080 --secure --registry reg@tcp://10.0.0.5:7700
"""
)
@click.argument("name")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD [ARGS]...]")
@click.option(
    "--port", type=click.IntRange(1, 65535), required=True, help="Port the instance listens on."
)
@click.option(
    "--host",
    metavar="HOST",
    help="Address to publish (default: this host's address towards the registry).",
)
@click.option("--id", "inst_id", metavar="ID", help="Instance id (default: NAME-HOST-PORT).")
@click.option(
    "--meta",
    "meta",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata (repeatable; sent as DNS-SD TXT, RFC 6763 size limits).",
)
@click.option(
    "--weight",
    type=click.IntRange(0, 65535),
    default=1,
    show_default=True,
    help="Relative weight (SRV weight in DNS answers).",
)
@click.option(
    "--ttl",
    type=SECONDS,
    metavar="SECONDS",
    help="Expire after this long without a heartbeat  [default: 3 x interval, or 6]",
)
@click.option(
    "--interval", type=SECONDS, metavar="SECONDS", help="Heartbeat period  [default: ttl / 3, or 2]"
)
@click.option(
    "--check",
    metavar="CMD|tcp",
    help="Health check: a shell command (0 passing, 1 warning, else critical) or 'tcp'.",
)
@health_check_options(interval=5.0, timeout=2.0)
@registry_option
@security_options
@common_options
def register(
    name: str,
    cmd: tuple[str, ...],
    port: int,
    host: str | None,
    inst_id: str | None,
    meta: tuple[str, ...],
    weight: int,
    ttl: float | None,
    interval: float | None,
    check: str | None,
    check_interval: float,
    check_timeout: float,
    rise: int,
    fall: int,
    registries: tuple[str, ...],
    serverless: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Register NAME while this command runs: heartbeat, check health, deregister on exit.

    With `-- CMD`, run CMD and keep the registration exactly as long as it
    runs; exit with CMD's status.  SIGINT/SIGTERM deregister at once.
    """
    from eda.core.presence import Presence
    from eda.core.registry import access as reg
    from eda.core.registry.keeper import Keeper

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    record = reg.registration(
        name, port, host=host, inst_id=inst_id, meta=meta, weight=weight, ttl=ttl,
        interval=interval,
    )  # fmt: skip
    access = registry_access(registries, interface, no_mdns, serverless, ctx)
    presence = Presence(access, record, log=ctx.debug, warn=ctx.warn, required=True)
    keeper = Keeper(presence, warn=ctx.warn, debug=ctx.debug)
    code = keeper.run(
        cmd, check, check_interval, check_timeout, rise, fall, (KeyboardInterrupt, Terminated)
    )
    if code is not None:
        raise Exit(code)


def _iface(interface: str | None) -> str | None:
    from eda.core.registry.access import resolve_interface

    return resolve_interface(interface)


# -- lookup / list -----------------------------------------------------------------------
def _query(
    op: str,
    name: str | None,
    include_all: bool,
    registries: tuple[str, ...],
    serverless: bool,
    interface: str | None,
    no_mdns: bool,
    ctx: Context,
) -> list[dict[str, Any]]:
    from eda.core.registry.access import query

    found = _ask(
        lambda access: query(op, name, include_all, access),
        registries,
        serverless,
        interface,
        no_mdns,
        ctx,
    )
    return [i.to_dict() for i in found]


T = TypeVar("T")


def _ask(
    fetch: Callable[[Access], list[T]],
    registries: tuple[str, ...],
    serverless: bool,
    interface: str | None,
    no_mdns: bool,
    ctx: Context,
) -> list[T]:
    """*fetch* from the registry (or the LAN), saying what was left out or is down."""
    from eda.core.registry.fetching import fetched

    access = registry_access(registries, interface, no_mdns, serverless, ctx)
    return fetched(fetch, access, ctx.warn)


@command.command(
    epilog="""\b
Examples:
  eda-registry lookup orders                         passing instances (JSON Lines when piped)
  eda-registry lookup orders --all                   every instance with its health status
  curl "http://$(eda-registry lookup orders --format '{host}:{port}' | head -1)/"
"""
)
@click.argument("name")
@click.option("--all", "include_all", is_flag=True, help="Every instance, whatever its health.")
@registry_option
@_output_options("{host}:{port}", INSTANCE_FIELDS)
@security_options
@common_options
def lookup(
    name: str,
    include_all: bool,
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print the passing instances of service NAME; exit 3 if there is none.

    With --secure, each record's key is the one its registrant proved (what a
    client connecting to the instance pins); in serverless mode only instances
    announcing a trusted key are shown (-v says which were not).
    """
    from eda.core.registry.model import validate_name

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    service = validate_name(name)
    out = instance_output(ctx, template, force_json)
    found = _query(
        "lookup",
        service,
        include_all,
        registries,
        serverless,
        interface,
        no_mdns,
        ctx,
    )
    if not found:
        what = "instance" if include_all else "passing instance"
        raise NotFoundError(f"no {what} of service {service!r}")
    print_instances(found, out)


@command.command(
    "list",
    epilog="""\b
Examples:
  eda-registry list                              every service and instance (a table on a tty)
  eda-registry list orders --json | jq -r .status
""",
)
@click.argument("name", required=False)
@registry_option
@_output_options("{service} {address} {status}", INSTANCE_FIELDS)
@security_options
@common_options
def list_(
    name: str | None,
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print every registered instance (of service NAME if given), whatever its health."""
    from eda.core.registry.model import validate_name

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    service = validate_name(name) if name is not None else None
    out = instance_output(ctx, template, force_json)
    found = _query(
        "list",
        service,
        True,
        registries,
        serverless,
        interface,
        no_mdns,
        ctx,
    )
    print_instances(found, out)


@command.command(
    epilog="""\b
Examples:
  eda-registry services                          a table of services on a terminal
  eda-registry services --format '{service} {passing}/{instances}'
  eda-registry services | jq -r 'select(.passing < .instances) | .service'
""",
)
@registry_option
@_output_options("{service} {passing}/{instances}", SERVICE_FIELDS)
@security_options
@common_options
def services(
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print every service name with its instance counts (passing of all registered)."""
    from eda.core.registry.access import services as fetch

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    out = Output(ctx, template=template, fields=SERVICE_FIELDS, force_json=force_json)
    found = _ask(fetch, registries, serverless, interface, no_mdns, ctx)
    out.table(found, SERVICES_TABLE)


@command.command(
    epilog="""\b
Examples:
  eda-registry deregister orders-10-0-0-5-8080    remove a stuck instance
  eda-registry list orders --format '{id} {status}'   find its id first
""",
)
@click.argument("inst_id", metavar="ID")
@registries_option
@security_options
@common_options
def deregister(
    inst_id: str,
    registries: tuple[str, ...],
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Remove instance ID from the registry at once; exit 3 if there is no such instance.

    An operator's fix for a stuck entry.  An instance whose owner still
    heartbeats is registered again by its next heartbeat: stop the owner first.
    With --secure, only the key that registered the instance may remove it
    (--key FILE: the registrant's key); any other is refused, exit 1.
    """
    from eda.core.registry.access import deregister as remove
    from eda.core.registry.model import validate_id

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    inst_id = validate_id(inst_id)
    remove(inst_id, registry_access(registries, interface, no_mdns, False, ctx))
    ctx.debug(f"deregistered {inst_id}")


# -- watch -----------------------------------------------------------------------------------
@command.command(
    epilog="""\b
Examples:
  eda-registry watch orders                          one JSON line per change
  eda-registry watch orders --exec ./reload.sh       run a command per change (event on stdin)
  eda-registry watch --snapshot -C 1                 current instances first, then changes
"""
)
@click.argument("name", required=False)
@click.option(
    "--exec",
    "exec_cmd",
    metavar="CMD",
    help="Run CMD per change, the event JSON on its stdin, EDA_EVENT/EDA_SERVICE set.",
)
@click.option(
    "--snapshot",
    is_flag=True,
    help="First print each current instance (type 'present', snapshot: true).",
)
@click.option("-C", "--count", type=click.IntRange(1), metavar="N", help="Exit 0 after N events.")
@registry_option
@_output_options("{time} {type} {service} {address}", EVENT_FIELDS)
@security_options
@common_options
def watch(
    name: str | None,
    exec_cmd: str | None,
    snapshot: bool,
    count: int | None,
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print a line per change (registered, deregistered, expired, health, updated).

    Each event has a stable id (INSTANCE@REVISION), the reason and the full
    instance record.  The watch survives registry restarts and fails over to
    another registry; changes missed meanwhile are reported once, marked
    "resync": true, and nothing already reported is repeated.
    """
    from eda.core.registry.access import changes

    ctx = Context("eda-registry", verbose)
    apply_security(secure, key_file, trust_dir)
    out = event_output(ctx, exec_cmd, template, force_json)
    access = registry_access(registries, interface, no_mdns, serverless, ctx)
    events = changes(name, access, snapshot=snapshot, warn=ctx.warn)
    try:
        for seen, event in enumerate(events, 1):
            out.items([event])
            if count is not None and seen >= count:
                break
    finally:
        events.close()
    raise Exit(out.finish())


# -- browse -----------------------------------------------------------------------------------
@command.command(
    epilog="""\b
Examples:
  eda-registry browse _http._tcp                     web servers on the LAN, as they come and go
  eda-registry browse _eda-svc._tcp --duration 2     eda instances announced in serverless mode
"""
)
@click.argument("service_type", metavar="TYPE")
@click.option("--duration", type=SECONDS, metavar="SECONDS", help="Stop (exit 0) after SECONDS.")
@click.option("-C", "--count", type=click.IntRange(1), metavar="N", help="Exit 0 after N items.")
@_output_options("{event} {name} {address}", BROWSE_FIELDS)
@common_options
def browse(
    service_type: str,
    duration: float | None,
    count: int | None,
    template: str | None,
    force_json: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Browse any DNS-SD service TYPE by mDNS, like avahi-browse -r (TYPE: _http._tcp...)."""
    from eda.core.registry.browse import browse as browse_lan
    from eda.core.registry.browse import full_type

    if no_mdns:
        raise UsageError("browse needs mDNS; drop --no-mdns")
    full_type(service_type)
    deadline = None if duration is None else time.monotonic() + duration
    seen = 0
    out = Output(
        Context("eda-registry", verbose),
        template=template,
        fields=BROWSE_FIELDS,
        force_json=force_json,
        template_fields=browse_fields,
        terminal=browse_line,
    )
    for item in browse_lan(service_type, _iface(interface)):
        if item is not None:
            out.items([item])
            seen += 1
            if count is not None and seen >= count:
                return
        if deadline is not None and time.monotonic() >= deadline:
            return


def main() -> None:
    run(command, "eda-registry")


if __name__ == "__main__":
    main()
