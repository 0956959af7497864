"""eda-bus stats, retain, purge and delete-consumer: one-shot questions and orders to a bus.

The group (cli/bus.py) imports this module only when one of them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.bus import (
    bus_address_option,
    retention_options,
    timeout_option,
)
from eda.cli.busopt import find_endpoint
from eda.cli.common import Context
from eda.cli.options import (
    SecureMode,
    common_options,
    json_option,
    security_options,
)
from eda.cli.output import Column, Output, TableView, for_terminal
from eda.cli.watch import watch_options
from eda.core.errors import UsageError

if TYPE_CHECKING:
    from rich.text import Text


@click.command(
    epilog="\b\nExamples:\n  eda-bus stats --json | jq .lag\n  eda-bus stats --consumers\n"
    "  eda-bus stats --watch                       live rates, lag; piped: a JSON line a second"
)
@bus_address_option
@timeout_option
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
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Topics, counts, bytes, consumers and their lag."""
    secure.apply()
    endpoint = _endpoint(bus, ctx)
    out = Output(ctx, force_json=force_json)
    view = _consumer_table if only_consumers else _table
    if watch:
        from eda.cli.watch import watch as follow

        follow(out, lambda: _stats_rows(endpoint, timeout, only_consumers), lambda r: [(r, view)],
               key=lambda r: (r["kind"], r.get("topic") or r.get("name")), interval=interval,
               counters=_RATES, title="eda-bus stats")  # fmt: skip
        return
    out.table(_stats_rows(endpoint, timeout, only_consumers), view)


def _endpoint(bus: str | None, ctx: Context) -> Any:
    """The bus's endpoint: --bus, else EDA_BUS, the cache, mDNS (as --interface/--no-mdns say)."""
    return find_endpoint(bus, ctx.interface, ctx.no_mdns, ctx)


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


@click.command(epilog="\b\nExamples:\n  eda-bus retain --max-age 7d --max-bytes 10GB")
@bus_address_option
@retention_options
@timeout_option
@json_option()
@security_options
@common_options
def retain(
    bus: str | None,
    max_age: float | None,
    max_bytes: int | None,
    timeout: float,
    force_json: bool,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Remove the oldest events now: older than --max-age, beyond --max-bytes."""
    secure.apply()
    if max_age is None and max_bytes is None:
        raise UsageError("give --max-age and/or --max-bytes")
    from eda.core.bus.client import request

    msg: dict[str, Any] = {"op": "retain", "max_age": max_age, "max_bytes": max_bytes}
    reply = request(_endpoint(bus, ctx), msg, timeout)
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


@click.command(
    epilog="\b\nExamples:\n  eda-bus purge orders.test          every stored event of one topic"
    "\n  eda-bus purge 'sensors.>' --yes   of every topic under sensors, without asking",
)
@click.argument("pattern")
@click.option("--yes", "-f", "yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@bus_address_option
@timeout_option
@json_option()
@security_options
@common_options
def purge(
    pattern: str,
    yes: bool,
    bus: str | None,
    timeout: float,
    force_json: bool,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Remove every stored event whose topic PATTERN matches (a topic, or a pattern
    with * and >), wherever it is in the log; other topics are untouched.  Sequences
    are not reused, consumers keep their positions and skip the purged events,
    readers are not told of them as lost.  Asks first unless --yes; run it on the
    bus's host.  The NATS engine refuses it (exit 2)."""
    import sys

    from eda.core.errors import EdaError
    from eda.core.topics import validate_pattern

    secure.apply()
    validate_pattern(pattern)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"purge {pattern} removes events for good: give --yes (-f) to run it")
        if not click.confirm(f"Remove every stored event of {pattern}?", err=True):
            raise EdaError("not purged")
    from eda.core.bus.client import request

    msg = {"op": "purge", "pattern": pattern}
    reply = request(_endpoint(bus, ctx), msg, timeout)
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


@click.command(
    "delete-consumer",
    epilog="\b\nExamples:\n  eda-bus delete-consumer billing",
)
@click.argument("name")
@bus_address_option
@timeout_option
@security_options
@common_options
def delete_consumer(
    name: str,
    bus: str | None,
    timeout: float,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Delete durable consumer or group NAME (run it on the bus's host; nobody may be
    subscribed as NAME).  Its position is forgotten: NAME used again starts anew."""
    secure.apply()
    from eda.core.bus.client import request

    endpoint = _endpoint(bus, ctx)
    reply = request(endpoint, {"op": "drop", "name": name}, timeout)
    Output(ctx, terminal=_deleted_line).items([{"deleted": reply.get("deleted", name)}])


def _deleted_line(done: dict[str, Any]) -> Text:
    from rich.text import Text

    return Text(f"deleted {for_terminal(done['deleted'])}")
