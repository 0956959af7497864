"""eda-lb stats: the per-instance figures of a service's brokers, workers and TCP proxies.

Gathering them is ``eda.core.lb.stats`` (brokers, workers) and
``eda.core.lb.proxystats`` (TCP proxies); this module renders them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Exit, Registries, registry_access
from eda.cli.options import (
    SecureMode,
    common_options,
    output_options,
    registry_option,
    seconds_option,
    security_options,
)
from eda.cli.output import Column, Output, TableView, for_terminal
from eda.cli.watch import watch_options
from eda.core.errors import ExitStatus

if TYPE_CHECKING:
    pass


# -- the fields ----------------------------------------------------------------------------
STATS_FIELDS = (
    "service", "source", "instance", "state", "requests", "errors", "inflight", "concurrency",
    "weight", "p50_ms", "p90_ms", "p99_ms",
)  # fmt: skip
# the TCP proxy's figures per instance (eda-lb tcp, either engine), as HAProxy's show stat
PROXY_FIELDS = (
    "service", "source", "instance", "state", "weight", "sessions", "sessions_total",
    "bytes_in", "bytes_out", "connect_errors", "address",
)  # fmt: skip
ALL_STATS_FIELDS = tuple(dict.fromkeys((*STATS_FIELDS, *PROXY_FIELDS)))


@click.command(
    "stats",
    epilog="""\b
Examples:
  eda-lb stats upper                        a table on a terminal, JSON Lines when piped
  eda-lb stats upper --json | jq -r 'select(.state != "healthy") | .instance'
  eda-lb stats upper --format '{instance} {requests} {p99_ms}'
  eda-lb stats web                          a TCP proxy's (eda-lb tcp web) per-instance counters
  eda-lb stats upper --watch                live: requests/s, latency, health per instance
""",
)
@click.argument("name")
@seconds_option("--timeout", default=2.0, help="How long to wait for each instance's answer.")
@output_options(
    f"One line per instance, e.g. '{{instance}} {{p99_ms}}'. Fields: {', '.join(STATS_FIELDS)}; "
    f"of a TCP proxy: {', '.join(PROXY_FIELDS[4:])}."
)
@registry_option
@watch_options
@security_options
@common_options
def stats(
    name: str,
    timeout: float,
    template: str | None,
    force_json: bool,
    watch: bool,
    interval: float,
    registry: Registries,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Per-instance figures of service NAME: requests, errors, in flight, latency
    percentiles (ms) and state (healthy, ejected, slow-start, dead).

    If a broker for NAME runs, it is asked (its workers as it sees them);
    else each worker instance is asked for its own figures.  Every TCP proxy
    of NAME (eda-lb tcp, either engine) is asked too: per instance, sessions
    open and in total, bytes in (from clients) and out, connect errors, health
    state (up, down) and weight, as HAProxy's show stat.  Exit 3 when NAME
    has no instance, 1 when an instance did not answer.
    """
    from types import SimpleNamespace

    from eda.cli.secure import secure_reports
    from eda.core.registry.model import validate_name

    service = validate_name(name)
    security = secure.apply()
    out = Output(ctx, template=template, fields=ALL_STATS_FIELDS, force_json=force_json)
    access = registry_access(registry, ctx)
    # secure mode: instances with an untrusted key (or none) are left out, the others'
    # keys pinned; one refusing this key is an error line
    reports = SimpleNamespace(security=security, on_ignored=None, on_refused=None)
    refusals = secure_reports(ctx, reports, "instance")
    if watch:  # each snapshot asks again; it ends when no instance answers (exit 1)
        from eda.cli.watch import watch as follow

        def snapshot() -> list[dict[str, Any]]:
            rows, failed = _gather(ctx, service, access, reports, refusals, timeout)
            if failed and not rows:
                from eda.core.errors import EdaError

                raise EdaError(f"no instance of service {service!r} answered")  # exit 1
            return rows

        follow(out, snapshot, _views, key=lambda r: (r["source"], r["instance"]),
               counters=_RATES, interval=interval, title=f"eda-lb stats {service}")  # fmt: skip
        return
    rows, failed = _gather(ctx, service, access, reports, refusals, timeout)
    for shown, view in _views(rows):
        if shown or (view is _stats_table and not rows):
            out.table(shown, view)
    if failed:
        raise Exit(ExitStatus.ERROR)


# what --watch gives a rate of (and its column)
_RATES = {"requests": "req/s", "errors": "err/s", "sessions_total": "sessions/s",
          "bytes_in": "in B/s", "bytes_out": "out B/s"}  # fmt: skip


def _views(rows: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], TableView]]:
    """The rows of brokers and workers in one table each, the TCP proxies' in theirs."""
    proxied = [r for r in rows if r["source"].startswith("proxy ")]
    return [([r for r in rows if not r["source"].startswith("proxy ")], _stats_table),
            (proxied, _proxy_table)]  # fmt: skip


def _gather(
    ctx: Context, service: str, access: Any, reports: Any, refusals: Any, timeout: float
) -> tuple[list[dict[str, Any]], int]:
    """The rows of every instance of *service* that answered, and how many did not."""
    from eda.core.errors import NotFoundError
    from eda.core.lb.pins import usable
    from eda.core.lb.stats import ask_stats
    from eda.core.registry.access import lookup

    found = usable(lookup(service, access), reports.on_ignored)
    brokers = [i for i in found if i.meta.get("role") == "broker"]
    chosen = brokers or [i for i in found if i.meta.get("role") == "worker"]
    chosen += [i for i in found if i.meta.get("role") == "proxy"]
    if not chosen:
        raise NotFoundError(f"no broker, worker or TCP proxy of service {service!r}")
    if len(chosen) > MAX_ASKED:  # anyone can announce instances by mDNS
        ctx.warn(f"warning: {len(chosen)} instances found: asking the first {MAX_ASKED}")
        chosen = chosen[:MAX_ASKED]
    from eda.core.endpoint import Endpoint

    endpoints = {Endpoint(i.host, i.port).zmq: i for i in chosen}
    answers = ask_stats(endpoints, timeout, on_refused=reports.on_refused)
    rows: list[dict[str, Any]] = []
    failed = 0
    for endpoint, answer in answers.items():
        inst = endpoints[endpoint]
        if isinstance(answer, str):
            failed += 1
            if endpoint not in refusals:  # (a refusal was its error line)
                ctx.warn(f"warning: {inst.id} at {endpoint}: {answer}")
            continue
        if inst.meta.get("role") == "proxy":
            rows += _proxy_rows(service, inst.id, answer)
            continue
        found_rows = _stats_rows(service, inst.id, answer, broker=bool(brokers))
        if not found_rows and brokers:
            ctx.warn(f"warning: broker {inst.id} has no worker")
        rows += found_rows
    return rows, failed


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if value == value and abs(value) != float("inf") else None


def _entries(value: object) -> list[dict[str, Any]]:
    """The objects of a list in a peer's answer (anything else in it left out)."""
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _stats_rows(
    service: str, source_id: str, answer: dict[str, Any], *, broker: bool
) -> list[dict[str, Any]]:
    """Rows of one T answer: a broker's workers, or a worker itself."""
    rows = []
    for entry in _entries(answer.get("instances") if broker else [answer]):
        row: dict[str, Any] = {
            "service": service,
            "source": source_id if broker else "direct",
            "instance": str(entry.get("id", source_id))[:128],
            "state": str(entry.get("state", "healthy"))[:32],
        }
        for key in STATS_FIELDS[4:9]:
            row[key] = _number(entry.get(key))
        latency = entry.get("latency_ms")
        for key in STATS_FIELDS[9:]:
            row[key] = _number(latency.get(key[:3])) if isinstance(latency, dict) else None
        rows.append(row)
    return rows


def _proxy_rows(service: str, source_id: str, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a TCP proxy's T answer (core/lb/proxystats.py): one per instance."""
    rows = []
    for entry in _entries(answer.get("backends")):
        address = entry.get("address")
        row: dict[str, Any] = {
            "service": service,
            "source": f"proxy {source_id}",
            "instance": str(entry.get("id", ""))[:128],
            "state": str(entry.get("state", "unknown"))[:32],
        }
        for key in PROXY_FIELDS[4:10]:
            row[key] = _number(entry.get(key))
        row["address"] = str(address)[:64] if isinstance(address, str) else None
        rows.append(row)
    return rows


MAX_ASKED = 1024  # instances stats asks at most


STATE_COLOURS = {
    "healthy": "green", "up": "green", "slow-start": "yellow", "ejected": "red",
    "down": "red", "dead": "dim", "gone": "dim", "maint": "dim",
}  # fmt: skip


def _figures_view(
    fields: tuple[str, ...], priority: dict[str, int], group: Callable[[dict[str, Any]], str]
) -> TableView:
    """A table of figures: *fields* as columns (the least needed, by *priority*, go
    first on a narrow terminal, never a number cut), one table per *group*; every
    peer-supplied string escaped and shown as plain Text."""

    def cells(r: dict[str, Any]) -> list[Any]:
        from rich.text import Text

        out: list[Any] = []
        for key in fields:
            value = r[key]
            style = STATE_COLOURS.get(str(value), "") if key == "state" else ""
            out.append(Text("—" if value is None else for_terminal(value), style=style))
        return out

    columns = tuple(
        Column(key, priority=priority.get(key, 0), numeric=key not in TEXT_FIELDS) for key in fields
    )
    return TableView(columns, cells, group=group)


TEXT_FIELDS = ("instance", "state", "address")
# one table per source (a broker, or the workers asked directly)
_stats_table = _figures_view(
    STATS_FIELDS[2:],
    {"inflight": 2, "concurrency": 5, "weight": 4, "p50_ms": 3, "p90_ms": 6, "p99_ms": 1},
    lambda r: (
        "each worker asked directly" if r["source"] == "direct" else f"via broker {r['source']}"
    ),
)
# one table per TCP proxy
_PROXY_PRIORITY = {
    "weight": 4, "sessions_total": 2, "bytes_in": 3, "bytes_out": 3, "connect_errors": 1,
    "address": 5,
}  # fmt: skip
_proxy_table = _figures_view(PROXY_FIELDS[2:], _PROXY_PRIORITY, lambda r: str(r["source"]))
