"""eda-registry serve and register: running a registry, staying registered in one.

The long-running subcommands of eda-registry (cli/registry.py, whose group imports
this module only when one of them runs).
"""

from __future__ import annotations

from typing import Any

import click

from eda.cli.common import Context, Exit, Registries, Terminated, registry_access
from eda.cli.options import (
    SECURE_ENDPOINT,
    SecureMode,
    advertise_options,
    common_options,
    health_check_options,
    metrics_option,
    number_option,
    registry_option,
    seconds_option,
    security_options,
    serve_metrics,
)
from eda.cli.registry import local_interface
from eda.core.registry.model import (  # not .protocol: --help imports no zmq
    DEFAULT_MAX_INSTANCES,
    MAX_TICK,
)


# -- serve ----------------------------------------------------------------------------
@click.command(
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
@seconds_option(
    "--dns-idle",
    default=10.0,
    help="Close a DNS-over-TCP connection (--dns) idle this long.",
)
@seconds_option(
    "--tick",
    default=0.5,
    type=click.FloatRange(0, MAX_TICK, min_open=True),
    help=f"Liveness beacon period on the change stream (at most {MAX_TICK:g} s: clients"
    " accept no longer one).",
)
@seconds_option(
    "--peer-timeout", default=3.0, help="A peer registry silent this long is considered down."
)
@number_option(
    "--max-instances",
    type=click.IntRange(1),
    default=DEFAULT_MAX_INSTANCES,
    help="Refuse to register new instances past this many (heartbeats of those held,"
    " and peers' changes, are still taken).",
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
    dns_idle: float,
    http: str | None,
    tick: float,
    peer_timeout: float,
    max_instances: int,
    secure: SecureMode,
    metrics: Any,
    ctx: Context,
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

    secure.apply()
    iface = local_interface(ctx.interface)
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
        mdns=not ctx.no_mdns,
        peers=peers,
        dns=dns,
        dns_idle=dns_idle,
        tick=tick,
        peer_timeout=peer_timeout,
        max_instances=max_instances,
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
@click.command(
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
@advertise_options("Address to publish (default: this host's address towards the registry).")
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
@seconds_option(
    "--ttl", help="Expire after this long without a heartbeat  [default: 3 x interval, or 6]"
)
@seconds_option("--interval", help="Heartbeat period  [default: ttl / 3, or 2]")
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
    registry: Registries,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Register NAME while this command runs: heartbeat, check health, deregister on exit.

    With `-- CMD`, run CMD and keep the registration exactly as long as it
    runs; exit with CMD's status.  SIGINT/SIGTERM deregister at once.
    """
    from eda.core.presence import Presence
    from eda.core.registry import access as reg
    from eda.core.registry.keeper import Keeper

    secure.apply()
    record = reg.registration(
        name, port, host=host, inst_id=inst_id, meta=meta, weight=weight, ttl=ttl,
        interval=interval,
    )  # fmt: skip
    access = registry_access(registry, ctx)
    presence = Presence(access, record, log=ctx.debug, warn=ctx.warn, required=True)
    keeper = Keeper(presence, warn=ctx.warn, debug=ctx.debug)
    code = keeper.run(
        cmd, check, check_interval, check_timeout, rise, fall, (KeyboardInterrupt, Terminated)
    )
    if code is not None:
        raise Exit(code)
