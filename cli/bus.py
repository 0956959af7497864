"""eda-bus: the event bus -- a durable log with replay, confirmed publishing and consumers.

One section per subcommand (serve, migrate, stats, retain, purge, delete-consumer)
(the ``--bus`` option that eda-pub and eda-sub share is :mod:`eda.cli.busopt`'s,
the NATS engine's options :mod:`eda.cli.busnats`'s).  About 600 lines
for a reason: six subcommands with some twenty options and their
tables, whose declarations and help texts are the man page; the logic is in
``eda.core.bus``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.busnats import engine_option, nats_options
from eda.cli.busopt import AUTO as AUTO  # (re-exported: the names eda-pub and eda-sub used)
from eda.cli.busopt import bus_endpoint as bus_endpoint
from eda.cli.busopt import bus_option as bus_option
from eda.cli.busopt import find_endpoint as _endpoint
from eda.cli.busopt import split_bus as split_bus
from eda.cli.common import Context, on_stop_signals, run
from eda.cli.options import (
    SECURE_ENDPOINT,
    apply_security,
    common_options,
    json_option,
    metrics_option,
    security_options,
)
from eda.cli.output import Column, Output, TableView, for_terminal
from eda.cli.watch import watch_options
from eda.core.bus.retention import parse_age, parse_size
from eda.core.errors import UsageError

if TYPE_CHECKING:
    from rich.text import Text

    from eda.core.bus.nats.connect import NatsAuth

EPILOG = """\b
Examples:
  eda-bus serve --data ./bus                  serve a bus, announced by mDNS
  eda-bus serve --data ./bus --fsync always --max-age 7d --max-bytes 10GB
  eda-bus stats                               topics, counts, consumers and their lag
  eda-bus retain --max-age 7d                 remove events older than a week
  eda-bus purge orders.test --yes             remove every stored event of one topic
  eda-bus stats --consumers                   durable consumers, groups and their lag
  eda-bus delete-consumer billing             forget a durable consumer or a group
  eda-bus serve --engine nats://10.0.0.5:4222,nats://10.0.0.6:4222 --replicas 3
  eda-bus migrate --from ./bus --to nats://10.0.0.5:4222
"""

parse_bytes = parse_size  # sizes and ages are parsed in core (eda-lb imports this name)


def _bytes_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_size(value)


def _age_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_age(value)


def _client_limit_options(func: Any) -> Any:
    """Bounds on what clients can make eda-bus serve hold."""
    func = click.option(
        "--max-connections",
        type=click.IntRange(1, 1 << 20),
        metavar="N",
        help="Close new TCP connections beyond N (default: the descriptor limit, less 64).",
    )(func)
    func = click.option(
        "--max-queued",
        "queued_bytes",
        callback=_bytes_option,
        default="512MiB",
        show_default=True,
        metavar="SIZE",
        help="Events queued for all subscribers together, at most.",
    )(func)
    return click.option(
        "--max-client-queued",
        "client_bytes",
        callback=_bytes_option,
        default="64MiB",
        show_default=True,
        metavar="SIZE",
        help="Events queued for one subscriber, at most; one that takes none of them "
        "for 5 s is cut off (it may subscribe again).",
    )(func)


def _retention_options(func: Any) -> Any:
    func = click.option(
        "--max-bytes",
        callback=_bytes_option,
        metavar="SIZE",
        help="Keep at most SIZE of events (e.g. 10GB); the oldest go first.",
    )(func)
    return click.option(
        "--max-age",
        callback=_age_option,
        metavar="AGE",
        help="Remove events stored longer ago than AGE (e.g. 7d, 12h).",
    )(func)


def _bus_option(func: Any) -> Any:
    return click.option(
        "--bus",
        "bus",
        metavar="ENDPOINT",
        help=f"The bus, e.g. tcp://10.0.0.5:5570 (default: EDA_BUS, then mDNS; {SECURE_ENDPOINT}).",
    )(func)


def _timeout_option(func: Any) -> Any:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=5.0,
        show_default=True,
        metavar="SECONDS",
        help="Give up (exit 4) when the bus has not answered after SECONDS.",
    )(func)


@click.group(epilog=EPILOG, context_settings={"max_content_width": 100})
@common_options
def command(config: str | None, interface: str | None, no_mdns: bool, verbose: bool) -> None:
    """The event bus: a durable log of events with replay, confirmed publishing,
    durable and grouped consumers.  eda-pub and eda-sub use it with --bus."""


@command.command(
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
@_retention_options
@click.option(
    "--max-event-bytes",
    type=click.IntRange(1, 1 << 26),
    default=1 << 20,
    show_default=True,
    metavar="N",
    help="Refuse events larger than N bytes.",
)
@_client_limit_options
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
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    acl: str | None,
    http: str | None,
    verbose: bool,
    metrics: Any,
) -> None:
    """Serve the bus: store what publishers send, deliver it to subscribers.

    With --engine nats://..., this is a stateless front on a NATS JetStream
    stream: several fronts can serve the same stream, each found by mDNS."""
    ctx = Context("eda-bus", verbose)
    apply_security(secure, key_file, trust_dir)
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
        mdns=not no_mdns,
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
            interface=discovery.resolve_interface(interface),
            max_message=max(4 << 20, 2 * max_event_bytes + 65536),
        )
    except BaseException:
        engine.close()
        raise
    on_stop_signals(lambda *_: server.stop())
    try:
        from eda.core.metrics import serve as serve_metrics

        serve_metrics(server, metrics)
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


@command.command(
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
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Copy at most N events now; run again to copy the rest.",
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
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Copy an embedded store into a NATS JetStream stream, keeping ids and order.

    Each event is copied once, whatever the stream already holds: run it again
    after an interruption and it copies only the rest ("present": events the
    stream already had).  Into an empty stream, bus sequences are kept too."""
    ctx = Context("eda-bus", verbose)
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


@command.command(
    epilog="\b\nExamples:\n  eda-bus stats --json | jq .lag\n  eda-bus stats --consumers\n"
    "  eda-bus stats --watch                       live rates, lag; piped: a JSON line a second"
)
@_bus_option
@_timeout_option
@json_option()
@click.option(
    "--consumers",
    "only_consumers",
    is_flag=True,
    help="Only the durable consumers and groups: patterns, next sequence, lag, held.",
)
@watch_options
@security_options
@common_options
def stats(
    bus: str | None,
    timeout: float,
    force_json: bool,
    only_consumers: bool,
    watch: bool,
    interval: float,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    verbose: bool,
) -> None:
    """Topics, counts, bytes, consumers and their lag."""
    ctx = Context("eda-bus", verbose)
    apply_security(secure, key_file, trust_dir)
    endpoint = _endpoint(bus, interface, no_mdns, ctx)
    out = Output(ctx, force_json=force_json)
    view = _consumer_table if only_consumers else _table
    if watch:
        from eda.cli.watch import watch as follow

        follow(out, lambda: _stats_rows(endpoint, timeout, only_consumers), lambda r: [(r, view)],
               key=lambda r: (r["kind"], r.get("topic") or r.get("name")), interval=interval,
               counters=_RATES, title="eda-bus stats")  # fmt: skip
        return
    out.table(_stats_rows(endpoint, timeout, only_consumers), view)


# what --watch gives a rate of (and its column): stored events and bytes, consumers' progress
_RATES = {"events": "events/s", "bytes": "bytes/s", "next": "consumed/s"}


def _stats_rows(endpoint: Any, timeout: float, only_consumers: bool) -> list[dict[str, Any]]:
    from eda.core.bus.client import request

    reply = request(endpoint, {"op": "stats"}, timeout)
    s = reply["stats"] if isinstance(reply.get("stats"), dict) else {}
    rows: list[dict[str, Any]] = [
        {
            "kind": "bus",
            "events": s.get("events"),
            "bytes": s.get("bytes"),
            "file_bytes": s.get("file_bytes"),
            "first_seq": s.get("first_seq"),
            "last_seq": s.get("last_seq"),
        }
    ]
    for topic, t in sorted((s.get("topics") or {}).items()):
        rows.append({"kind": "topic", "topic": topic, **(t if isinstance(t, dict) else {})})
    for c in s.get("consumers") or []:
        if isinstance(c, dict):
            rows.append({**c, "consumer": c.get("kind"), "kind": "consumer"})
    if only_consumers:
        rows = [r for r in rows if r["kind"] == "consumer"]
    return rows


def _counts(r: dict[str, Any], *keys: str) -> list[Any]:
    return [None if r.get(k) is None else str(r.get(k)) for k in keys]


def _consumer_cells(r: dict[str, Any]) -> list[Any]:
    patterns = r.get("patterns")
    shown = " ".join(str(x) for x in patterns) if isinstance(patterns, list) else ""
    return [r.get("consumer"), r.get("name"), shown, *_counts(r, "next", "lag", "held")]


def _cells(r: dict[str, Any]) -> list[Any]:
    name = r.get("topic") or r.get("name") or ""
    if r["kind"] == "bus":
        first, last = r.get("first_seq"), r.get("last_seq")
        empty = not r.get("events") or not isinstance(last, int) or last < (first or 0)
        name = "empty" if empty else f"seq {first}..{last}"
    kind = r["kind"] if r["kind"] != "consumer" else str(r.get("consumer"))
    return [kind, name, *_counts(r, "events", "bytes", "next", "lag", "held")]


# counts are never cut: the least needed columns go first on a narrow terminal
_consumer_table = TableView(
    (
        Column("kind", priority=2),
        Column("name"),
        Column("patterns", priority=3, wrap=True),
        Column("next", priority=1, numeric=True),
        Column("lag", numeric=True),
        Column("held", priority=4, numeric=True),
    ),
    _consumer_cells,
)
_table = TableView(
    (
        Column("kind"),
        Column("name"),
        Column("events", numeric=True),
        Column("bytes", priority=2, numeric=True),
        Column("next", priority=3, numeric=True),
        Column("lag", priority=1, numeric=True),
        Column("held", priority=4, numeric=True),
    ),
    _cells,
)


@command.command(epilog="\b\nExamples:\n  eda-bus retain --max-age 7d --max-bytes 10GB")
@_bus_option
@_retention_options
@_timeout_option
@json_option()
@security_options
@common_options
def retain(
    bus: str | None,
    max_age: float | None,
    max_bytes: int | None,
    timeout: float,
    force_json: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    verbose: bool,
) -> None:
    """Remove the oldest events now: older than --max-age, beyond --max-bytes."""
    ctx = Context("eda-bus", verbose)
    apply_security(secure, key_file, trust_dir)
    if max_age is None and max_bytes is None:
        raise UsageError("give --max-age and/or --max-bytes")
    from eda.core.bus.client import request

    msg: dict[str, Any] = {"op": "retain", "max_age": max_age, "max_bytes": max_bytes}
    reply = request(_endpoint(bus, interface, no_mdns, ctx), msg, timeout)
    done = {k: reply.get(w) for k, w in (("removed", "events"), ("bytes", "bytes"),
                                         ("first_seq", "first_seq"))}  # fmt: skip
    Output(ctx, force_json=force_json, terminal=_retained_line).items([done])


def _retained_line(done: dict[str, Any]) -> Text:
    """What retain did, in words (a terminal)."""
    from rich.text import Text

    removed, size, first = (for_terminal(done.get(k)) for k in ("removed", "bytes", "first_seq"))
    if not done.get("removed"):
        return Text("removed nothing")
    return Text(f"removed {removed} events ({size} bytes); the log now starts at seq {first}")


@command.command(
    epilog="\b\nExamples:\n  eda-bus purge orders.test          every stored event of one topic"
    "\n  eda-bus purge 'sensors.>' --yes   of every topic under sensors, without asking",
)
@click.argument("pattern")
@click.option("--yes", "-f", "yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@_bus_option
@_timeout_option
@json_option()
@security_options
@common_options
def purge(
    pattern: str,
    yes: bool,
    bus: str | None,
    timeout: float,
    force_json: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    verbose: bool,
) -> None:
    """Remove every stored event whose topic PATTERN matches (a topic, or a pattern
    with * and >), wherever it is in the log; other topics are untouched.  Sequences
    are not reused, consumers keep their positions and skip the purged events,
    readers are not told of them as lost.  Asks first unless --yes; run it on the
    bus's host.  The NATS engine refuses it (exit 2)."""
    import sys

    from eda.core.errors import EdaError
    from eda.core.topics import validate_pattern

    ctx = Context("eda-bus", verbose)
    apply_security(secure, key_file, trust_dir)
    validate_pattern(pattern)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"purge {pattern} removes events for good: give --yes (-f) to run it")
        if not click.confirm(f"Remove every stored event of {pattern}?", err=True):
            raise EdaError("not purged")
    from eda.core.bus.client import request

    msg = {"op": "purge", "pattern": pattern}
    reply = request(_endpoint(bus, interface, no_mdns, ctx), msg, timeout)
    done = {"pattern": pattern, **{k: reply.get(k) for k in ("events", "bytes", "topics")}}
    Output(ctx, force_json=force_json, terminal=_purged_line).items([done])


def _purged_line(done: dict[str, Any]) -> Text:
    """What purge did, in words (a terminal)."""
    from rich.text import Text

    if not done.get("events"):
        return Text(f"no stored event of {for_terminal(done['pattern'])}: purged nothing")
    topics = ", ".join(for_terminal(t) for t in done.get("topics") or [])
    events, size = for_terminal(done.get("events")), for_terminal(done.get("bytes"))
    return Text(f"purged {events} events ({size} bytes) of {topics}")


@command.command(
    "delete-consumer",
    epilog="\b\nExamples:\n  eda-bus delete-consumer billing",
)
@click.argument("name")
@_bus_option
@_timeout_option
@security_options
@common_options
def delete_consumer(
    name: str,
    bus: str | None,
    timeout: float,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    verbose: bool,
) -> None:
    """Delete durable consumer or group NAME (run it on the bus's host; nobody may be
    subscribed as NAME).  Its position is forgotten: NAME used again starts anew."""
    ctx = Context("eda-bus", verbose)
    apply_security(secure, key_file, trust_dir)
    from eda.core.bus.client import request

    reply = request(_endpoint(bus, interface, no_mdns, ctx), {"op": "drop", "name": name}, timeout)
    Output(ctx, terminal=_deleted_line).items([{"deleted": reply.get("deleted", name)}])


def _deleted_line(done: dict[str, Any]) -> Text:
    from rich.text import Text

    return Text(f"deleted {for_terminal(done['deleted'])}")


def main() -> None:
    run(command, "eda-bus")


if __name__ == "__main__":
    main()
