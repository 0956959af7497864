"""eda-registry: the registry center, registration with health checks, lookups and watches.

Over 500 lines for a reason: eight subcommands, their option declarations and
help texts (the man page) and their terminal views; the logic is in
``eda.core.registry``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eda.cli.common import Context, Exit, Terminated, registry_access, run
from eda.cli.options import (
    SECONDS,
    common_options,
    health_check_options,
    output_options,
    registries_option,
    registry_option,
)
from eda.cli.output import Output, for_terminal
from eda.core import __version__
from eda.core.errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table
    from rich.text import Text

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
"""


INSTANCE_FIELDS = (
    "service", "id", "host", "port", "address", "weight", "meta", "status", "ttl", "interval",
    "registered", "heartbeat", "registry", "rev",
)  # fmt: skip
EVENT_FIELDS = (
    *INSTANCE_FIELDS, "type", "reason", "time", "seq", "instance", "snapshot", "resync",
)  # fmt: skip
BROWSE_FIELDS = (
    "event", "name", "type", "domain", "host", "addresses", "address", "port", "txt", "time",
)  # fmt: skip


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
    help="Another registry to replicate with (repeatable; mDNS finds them too).",
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
@common_options
def serve(
    bind: str,
    data: str | None,
    peers: tuple[str, ...],
    dns: str | None,
    tick: float,
    peer_timeout: float,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Run a registry: accept registrations, expire silent instances, stream changes.

    Announced by mDNS as _eda-registry._tcp; other registries found that way
    (or given with --peer) replicate every change (eventually consistent).
    """
    from eda.core.registry.client import check_endpoint
    from eda.core.registry.server import Server, Settings

    ctx = Context("eda-registry", verbose)
    iface = _iface(interface)
    if iface and bind == "tcp://*:7700":
        bind = f"tcp://{iface}:7700"
    for peer in peers:
        check_endpoint(peer)
    settings = Settings(
        bind=bind,
        interface=iface,
        data=data,
        mdns=not no_mdns,
        peers=peers,
        dns=dns,
        tick=tick,
        peer_timeout=peer_timeout,
    )
    server = Server(settings, log=ctx.debug, warn=ctx.warn)
    try:
        server.start()
        extra = f", DNS on {server.dns_address}" if server.dns_address else ""
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
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Register NAME while this command runs: heartbeat, check health, deregister on exit.

    With `-- CMD`, run CMD and keep the registration exactly as long as it
    runs; exit with CMD's status.  SIGINT/SIGTERM deregister at once.
    """
    from eda.core.registry import access as reg
    from eda.core.registry.keeper import Keeper

    ctx = Context("eda-registry", verbose)
    record = reg.registration(
        name, port, host=host, inst_id=inst_id, meta=meta, weight=weight, ttl=ttl,
        interval=interval,
    )  # fmt: skip
    access = registry_access(registries, interface, no_mdns, serverless, ctx)
    client = reg.connect_for_registration(access, record["interval"])
    inst = reg.finish(record, client, access.interface)
    keeper = Keeper(
        inst,
        client,
        access.interface,
        warn=ctx.warn,
        debug=ctx.debug,
        # fell back to mDNS only: move to a registry as soon as one appears
        find_registry=(
            None
            if client is not None or serverless
            else (lambda: reg.answering_registry(access, inst.interval))
        ),
    )
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
    from eda.core.registry.client import RegistryUnavailable

    access = registry_access(registries, interface, no_mdns, serverless, ctx)
    found = fetch(access)
    if access.dropped:
        ctx.warn(f"warning: left out {access.dropped} invalid record(s) from the registry")
    if access.registry_down:
        # a registry that is down must not pass for an empty one: what mDNS found
        # is shown with a warning; nothing found is an error, not "not found"
        if not found:
            raise RegistryUnavailable(
                f"{access.registry_down}, and nothing on the LAN answered by mDNS"
                " either; start the registry, or use --serverless to ask the LAN only"
            )
        ctx.warn(
            f"warning: {access.registry_down}; showing what the LAN announces by mDNS"
            " (serverless mode), which may be incomplete"
        )
    return found


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
@common_options
def lookup(
    name: str,
    include_all: bool,
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print the passing instances of service NAME; exit 3 if there is none."""
    from eda.core.registry.model import validate_name

    ctx = Context("eda-registry", verbose)
    service = validate_name(name)
    out = _instance_output(ctx, template, force_json)
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
    _print_instances(found, out)


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
@common_options
def list_(
    name: str | None,
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print every registered instance (of service NAME if given), whatever its health."""
    from eda.core.registry.model import validate_name

    ctx = Context("eda-registry", verbose)
    service = validate_name(name) if name is not None else None
    out = _instance_output(ctx, template, force_json)
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
    _print_instances(found, out)


SERVICE_FIELDS = ("service", "instances", "passing")


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
@common_options
def services(
    registries: tuple[str, ...],
    serverless: bool,
    template: str | None,
    force_json: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print every service name with its instance counts (passing of all registered)."""
    from eda.core.registry.access import services as fetch

    ctx = Context("eda-registry", verbose)
    out = Output(ctx, template=template, fields=SERVICE_FIELDS, force_json=force_json)
    found = _ask(fetch, registries, serverless, interface, no_mdns, ctx)
    out.table(found, _services_table)


def _services_table(found: list[dict[str, Any]]) -> Table:
    """Services as a table: a service with failing instances shows its count in colour."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold")
    table.add_column("SERVICE", overflow="fold")
    table.add_column("INSTANCES", no_wrap=True, justify="right")
    table.add_column("PASSING", no_wrap=True, justify="right")
    for item in found:
        passing, total = item["passing"], item["instances"]
        style = "green" if passing == total else "yellow" if passing else "red"
        table.add_row(
            Text(for_terminal(item["service"])),
            Text(str(total)),
            Text(f"{passing}/{total}", style=style),
        )
    return table


@command.command(
    epilog="""\b
Examples:
  eda-registry deregister orders-10-0-0-5-8080    remove a stuck instance
  eda-registry list orders --format '{id} {status}'   find its id first
""",
)
@click.argument("inst_id", metavar="ID")
@registries_option
@common_options
def deregister(
    inst_id: str,
    registries: tuple[str, ...],
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Remove instance ID from the registry at once; exit 3 if there is no such instance.

    An operator's fix for a stuck entry.  An instance whose owner still
    heartbeats is registered again by its next heartbeat: stop the owner first.
    """
    from eda.core.registry.access import deregister as remove
    from eda.core.registry.model import validate_id

    ctx = Context("eda-registry", verbose)
    inst_id = validate_id(inst_id)
    remove(inst_id, registry_access(registries, interface, no_mdns, False, ctx))
    ctx.debug(f"deregistered {inst_id}")


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    fields = dict(record)
    fields["address"] = _address(record.get("host"), record.get("port"))
    return fields


def _address(host: object, port: object) -> str:
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _instance_output(ctx: Context, template: str | None, force_json: bool) -> Output:
    """How instances print; a --format naming an unknown field is refused at once."""
    return Output(
        ctx,
        template=template,
        fields=INSTANCE_FIELDS,
        force_json=force_json,
        template_fields=_fields,
    )


def _print_instances(found: list[dict[str, Any]], out: Output) -> None:
    """One table of them all on a terminal, else one item each."""
    out.table(found, lambda rows: _table(rows, out.width))


STATUS_COLOURS = {"passing": "green", "warning": "yellow", "critical": "red"}


def _table(found: list[dict[str, Any]], width: int) -> RenderableType:
    """Instances as a table; every peer-supplied string is escaped and shown as plain Text.

    The address column never wraps or shrinks (an address cut at the edge of
    the terminal is a wrong address); metadata and instance ids fold instead.
    A terminal too narrow for every column gets one block per instance.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold")
    addresses = [for_terminal(f"{r.get('host')}:{r.get('port')}") for r in found]
    widest = max(map(len, addresses), default=7)
    table.add_column("SERVICE", overflow="fold")
    table.add_column("INSTANCE", overflow="fold")
    table.add_column("ADDRESS", no_wrap=True, min_width=widest)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("WEIGHT", no_wrap=True)
    table.add_column("META", overflow="fold")
    table.add_column("LAST SEEN", no_wrap=True)
    now = time.time()
    for r, address in zip(found, addresses, strict=True):
        status = for_terminal(r.get("status"))
        beat = r.get("heartbeat")
        seen = f"{now - beat:.1f}s ago" if isinstance(beat, (int, float)) and beat else "-"
        meta = r.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        table.add_row(
            Text(for_terminal(r.get("service"))),
            Text(for_terminal(r.get("id"))),
            Text(address),
            Text(status, style=STATUS_COLOURS.get(status, "")),
            Text(for_terminal(r.get("weight"))),
            Text(" ".join(for_terminal(f"{k}={v}") for k, v in meta.items())),
            Text(seen),
        )
    if _table_width(table) <= width:
        return table
    blocks = []
    for row in zip(*(column.cells for column in table.columns), strict=True):
        block = Text()
        for column, cell in zip(table.columns, row, strict=True):
            block.append(f"{column.header:<11}", style="bold")
            block.append_text(cell if isinstance(cell, Text) else Text(str(cell)))
            block.append("\n")
        blocks.append(block)
    return Group(*blocks)


def _table_width(table: Any) -> int:
    """The narrowest width at which every column shows: no-wrap columns whole,
    folding ones at least as wide as their header (rich would drop them instead)."""
    width = 0
    for column in table.columns:
        cells = [len(getattr(c, "plain", str(c))) for c in column.cells]
        if column.no_wrap:
            width += max([len(str(column.header)), *cells])
        else:
            width += max(len(str(column.header)), 8)
    return width + 2 * len(table.columns)


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
    out = _event_output(ctx, exec_cmd, template, force_json)
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


EVENT_COLOURS = {
    "registered": "green",
    "deregistered": "yellow",
    "expired": "red",
    "health": "magenta",
}


def _event_output(
    ctx: Context, exec_cmd: str | None, template: str | None, force_json: bool
) -> Output:
    return Output(
        ctx,
        template=template,
        fields=EVENT_FIELDS,
        force_json=force_json,
        exec_cmd=exec_cmd,
        exec_env=_event_env,
        template_fields=_event_fields,
        terminal=lambda event: _event_line(event, EVENT_COLOURS),
    )


def _event_env(event: dict[str, Any]) -> dict[str, Any]:
    inst = event.get("instance") or {}
    return {
        "EDA_EVENT": event.get("type"),
        "EDA_SERVICE": event.get("service"),
        "EDA_INSTANCE": inst.get("id"),
        "EDA_EVENT_ID": event.get("id"),
    }


def _event_line(event: dict[str, Any], colours: dict[str, str]) -> Any:
    """One change as rich Text: peer strings escaped, never read as markup."""
    from rich.text import Text

    inst = event.get("instance")
    inst = inst if isinstance(inst, dict) else {}
    kind = for_terminal(event.get("type"))
    line = Text()
    line.append(for_terminal(str(event.get("time", ""))[11:23]), style="dim")
    line.append(" ")
    line.append(f"{kind:<12}", style=colours.get(kind, "cyan"))
    line.append(
        " "
        + for_terminal(
            f"{inst.get('service')}/{inst.get('id')} {inst.get('host')}:{inst.get('port')} "
            f"{inst.get('status')}"
        )
    )
    line.append("  " + for_terminal(event.get("reason", "")), style="dim")
    return line


def _event_fields(event: dict[str, Any]) -> dict[str, Any]:
    fields = _fields(event["instance"])
    fields.update({k: v for k, v in event.items() if k != "instance"})
    fields["instance"] = event["instance"].get("id")
    return fields


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
        template_fields=_browse_fields,
        terminal=_browse_line,
    )
    for item in browse_lan(service_type, _iface(interface)):
        if item is not None:
            out.items([item])
            seen += 1
            if count is not None and seen >= count:
                return
        if deadline is not None and time.monotonic() >= deadline:
            return


def _browse_fields(item: dict[str, Any]) -> dict[str, Any]:
    fields = dict(item)
    addresses = item.get("addresses") or []
    fields["address"] = _address(addresses[0], item.get("port")) if addresses else ""
    return fields


def _browse_line(item: dict[str, Any]) -> Text:
    """One browse item for a terminal: best address first, TXT as key=value, all escaped."""
    addresses = item.get("addresses") or []
    where = f"{addresses[0]}:{item.get('port', '')}" if addresses else ""
    others = f" (also {', '.join(addresses[1:])})" if len(addresses) > 1 else ""
    txt = " ".join(f"{k}={v}" for k, v in (item.get("txt") or {}).items())
    from rich.text import Text

    return Text(for_terminal(f"{item['event']:<8} {item['name']}  {where}{others}  {txt}".rstrip()))


def main() -> None:
    run(command, "eda-registry")


if __name__ == "__main__":
    main()
