"""eda-bus serve and migrate: running the bus, moving its log to another engine.

The group (cli/bus.py) imports this module only when one of them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.bus import (
    client_limit_options,
    retention_options,
)
from eda.cli.busnats import engine_option, nats_options
from eda.cli.common import Context, on_stop_signals
from eda.cli.options import (
    SecureMode,
    common_options,
    metrics_option,
    number_option,
    security_options,
    serve_metrics,
)
from eda.cli.output import Output
from eda.core.errors import UsageError

if TYPE_CHECKING:
    from eda.core.bus.nats.connect import NatsAuth


@click.command(
    epilog="\b\nExamples:\n  eda-bus serve --data ./bus --fsync batch\n"
    "  eda-bus serve --data ./bus --secure --acl bus-acl.toml\n"
    "  eda-bus serve --engine nats://10.0.0.5:4222,nats://10.0.0.6:4222,"
    "nats://10.0.0.7:4222 --replicas 3"
)
@click.option(
    "--engine",
    "engine_urls",
    callback=engine_option,
    metavar="sqlite|nats://HOST:PORT[,...]",
    help="Where events are kept: the embedded store under --data (default), or a NATS "
    "JetStream stream on these servers (needs nats-py: pip install 'eda[nats]').",
)
@click.option(
    "--data",
    "data",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Directory of the embedded store (created if missing); not used with NATS.",
)
@click.option(
    "--fsync",
    type=click.Choice(["always", "batch", "never"]),
    default="batch",
    show_default=True,
    help="always: fsync per batch; batch: group commit; never: leave it to the OS. "
    "Ignored with NATS: its quorum and file store decide.",
)
@click.option(
    "--bind",
    default="tcp://*:0",
    show_default=True,
    metavar="ENDPOINT",
    help="Where clients connect, e.g. tcp://*:5570.",
)
@retention_options
@number_option(
    "--max-event-bytes", type=click.IntRange(1, 1 << 26), default=1 << 20,
    help="Refuse events larger than N bytes."
)
@client_limit_options
@nats_options
@click.option("--name", default="", help="Instance name announced by mDNS.")
@security_options
@click.option(
    "--acl",
    "acl",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="With --secure: what each trusted key may do, a TOML table per trusted name, e.g. "
    '[alice] publish = ["orders.>"] subscribe = [">"] admin = true; [default] for the '
    "names without one (else they may do nothing).  Re-read when it changes.",
)
@metrics_option
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="Also serve HTTP here: POST /events (CloudEvents HTTP binding), GET /events as SSE.",
)
@common_options
def serve(
    engine_urls: list[str] | None,
    data: str | None,
    fsync: str,
    bind: str,
    max_age: float | None,
    max_bytes: int | None,
    max_event_bytes: int,
    client_bytes: int,
    queued_bytes: int,
    max_connections: int | None,
    replicas: int | None,
    stream: str,
    nats_auth: NatsAuth,
    nats_format: str | None,
    name: str,
    secure: SecureMode,
    acl: str | None,
    http: str | None,
    metrics: Any,
    ctx: Context,
) -> None:
    """Serve the bus: store what publishers send, deliver it to subscribers.

    With --engine nats://..., this is a stateless front on a NATS JetStream
    stream: several fronts can serve the same stream, each found by mDNS."""
    secure.apply()
    from eda.core import discovery
    from eda.core.bus.acl import open_acl
    from eda.core.bus.server import BusServer, Settings

    rights = open_acl(acl or None)
    if http:
        from eda.core.bus.http import BusHttp, serve_address

        http_at = serve_address(http, rights is not None)
    engine, where = _open_engine(
        engine_urls, data, fsync, max_age, max_bytes, max_event_bytes, replicas, stream, nats_auth,
        nats_format,
    )
    for line in getattr(engine, "repairs", ()):
        ctx.warn(f"warning: {line}")
    for line in getattr(engine, "changes", ()):
        ctx.warn(line)
    for line in getattr(engine, "warnings", ()):
        ctx.warn(f"warning: {line}")
    settings = Settings(
        bind=bind,
        max_age=max_age,
        max_bytes=max_bytes,
        mdns=not ctx.no_mdns,
        name=name,
        max_connections=max_connections or 0,
        client_bytes=client_bytes,
        queued_bytes=queued_bytes,
        port_file=_port_file(data, getattr(engine, "stream", None)),
        acl=rights,
    )
    try:
        server = BusServer(
            engine,
            settings,
            log=ctx.debug,
            warn=ctx.warn,
            interface=discovery.resolve_interface(ctx.interface),
            max_message=max(4 << 20, 2 * max_event_bytes + 65536),
        )
    except BaseException:
        engine.close()
        raise
    on_stop_signals(lambda *_: server.stop())
    try:
        serve_metrics(server, metrics, ctx.warn)
        api = BusHttp(server, http_at) if http else None
        server.start()
        ctx.warn(
            f"serving {where} on {server.endpoint} (seq {engine.first_seq}..{engine.last_seq})"
            + (f", HTTP on {api.url}" if api else "")
        )
        server.serve()
    finally:
        server.close()


def _port_file(data: str | None, stream: str | None) -> str:
    """Where serve remembers its port: in the data directory, or for a NATS front
    (no directory of its own) in $XDG_STATE_HOME/eda, one file per stream."""
    from eda.core.daemon import port_file

    return port_file(f"bus-nats-{stream}", data)


def _open_engine(
    urls: list[str] | None,
    data: str | None,
    fsync: str,
    max_age: float | None,
    max_bytes: int | None,
    max_event_bytes: int,
    replicas: int | None,
    stream: str,
    auth: NatsAuth,
    nats_format: str | None = None,
) -> tuple[Any, str]:
    """The engine serve uses, and what to call it in messages."""
    if urls is None:
        if data is None:
            raise UsageError("give --data DIR (the embedded store) or --engine nats://HOST:PORT")
        from pathlib import Path

        from eda.core.bus import SQLiteEngine

        engine = SQLiteEngine(
            Path(data) / "bus.db",
            fsync=fsync,  # type: ignore[arg-type]
            max_event_bytes=max_event_bytes,
        )
        return engine, data
    if data is not None:
        raise UsageError("--data is for the embedded store: leave it out with --engine nats://")
    from eda.core.bus.nats import NatsEngine, redact

    nats = NatsEngine(
        urls,
        stream=stream,
        replicas=replicas,
        max_age=max_age,
        max_bytes=max_bytes,
        max_event_bytes=max_event_bytes,
        auth=auth,
        message_format=nats_format,  # type: ignore[arg-type]
    )
    return nats, f"NATS stream {nats.stream} at {redact(','.join(urls))}"


@click.command(
    epilog="\b\nExamples:\n  eda-bus migrate --from ./bus --to nats://10.0.0.5:4222 --replicas 3"
)
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    metavar="DIR",
    help="Directory of the embedded store to copy (stop its eda-bus first).",
)
@click.option(
    "--to",
    "dest",
    required=True,
    callback=engine_option,
    metavar="nats://HOST:PORT[,...]",
    help="The NATS servers of the JetStream stream to copy into.",
)
@nats_options
@number_option(
    "--limit", type=click.IntRange(1), help="Copy at most N events now; run again to copy the rest."
)
@common_options
def migrate(
    source: str,
    dest: list[str] | None,
    replicas: int | None,
    stream: str,
    nats_auth: NatsAuth,
    nats_format: str | None,
    limit: int | None,
    ctx: Context,
) -> None:
    """Copy an embedded store into a NATS JetStream stream, keeping ids and order.

    Each event is copied once, whatever the stream already holds: run it again
    after an interruption and it copies only the rest ("present": events the
    stream already had).  Into an empty stream, bus sequences are kept too."""
    if dest is None:
        raise UsageError("--to takes nats://HOST:PORT[,...]")
    from pathlib import Path

    from eda.core.bus import SQLiteEngine
    from eda.core.bus import nats as nats_engine

    db = Path(source) / "bus.db"
    if not db.is_file():
        raise UsageError(f"no embedded store in {source} (no bus.db)")
    with (
        SQLiteEngine(db) as src,
        nats_engine.NatsEngine(dest, stream=stream, replicas=replicas, auth=nats_auth,
                               message_format=nats_format) as to,  # type: ignore[arg-type]
    ):
        ctx.debug(f"copying {source} (seq {src.first_seq}..{src.last_seq}) into {to.stream}")
        done = nats_engine.migrate(src, to, limit=limit)
        row = {
            "copied": done.copied,
            "present": done.present,
            "stream": to.stream,
            "first_seq": to.first_seq,
            "last_seq": to.last_seq,
            "source_last_seq": src.last_seq,
        }
    Output(ctx).items([row])
