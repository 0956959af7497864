"""eda-bus: the event bus -- a durable log with replay, confirmed publishing and consumers.

The group and the options its subcommands share; each subcommand lives with
those of its kind, imported only when it runs (:class:`~eda.cli.lazygroup.LazyGroup`):
``busserve.py`` (serve, migrate), ``busadmin.py`` (stats, retain, purge,
delete-consumer).  The ``--bus`` option that eda-pub and eda-sub share is
:mod:`eda.cli.busopt`'s, the NATS engine's options :mod:`eda.cli.busnats`'s; the
logic is in ``eda.core.bus``.
"""

from __future__ import annotations

from typing import Any

import click

from eda.cli.busopt import AUTO as AUTO  # (re-exported: the names eda-pub and eda-sub used)
from eda.cli.busopt import bus_endpoint as bus_endpoint
from eda.cli.busopt import bus_option as bus_option
from eda.cli.busopt import split_bus as split_bus
from eda.cli.common import run
from eda.cli.options import SECURE_ENDPOINT, program_group, seconds_option
from eda.core.bus.retention import parse_age, parse_size

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

parse_bytes = parse_size  # sizes and ages are parsed in core


def bytes_value(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_size(value)


def age_value(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_age(value)


def client_limit_options(func: Any) -> Any:
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
        callback=bytes_value,
        default="512MiB",
        show_default=True,
        metavar="SIZE",
        help="Events queued for all subscribers together, at most; when it holds one back, "
        "subscribers that took nothing queued for 5 s are cut off.",
    )(func)
    return click.option(
        "--max-client-queued",
        "client_bytes",
        callback=bytes_value,
        default="64MiB",
        show_default=True,
        metavar="SIZE",
        help="Events queued for one subscriber, at most; one that takes none of them "
        "for 5 s is cut off (it may subscribe again).",
    )(func)


def retention_options(func: Any) -> Any:
    func = click.option(
        "--max-bytes",
        callback=bytes_value,
        metavar="SIZE",
        help="Keep at most SIZE of events (e.g. 10GB); the oldest go first.",
    )(func)
    return click.option(
        "--max-age",
        callback=age_value,
        metavar="AGE",
        help="Remove events stored longer ago than AGE (e.g. 7d, 12h).",
    )(func)


def bus_address_option(func: Any) -> Any:
    return click.option(
        "--bus",
        "bus",
        metavar="ENDPOINT",
        help=f"The bus, e.g. tcp://10.0.0.5:5570 (default: EDA_BUS, then mDNS; {SECURE_ENDPOINT}).",
    )(func)


def timeout_option(func: Any) -> Any:
    return seconds_option(
        "--timeout", default=5.0,
        help="Give up (exit 4) when the bus has not answered after SECONDS.",
    )(func)  # fmt: skip


SUBCOMMANDS = {
    "serve": "eda.cli.busserve:serve",
    "migrate": "eda.cli.busserve:migrate",
    "stats": "eda.cli.busadmin:stats",
    "retain": "eda.cli.busadmin:retain",
    "purge": "eda.cli.busadmin:purge",
    "delete-consumer": "eda.cli.busadmin:delete_consumer",
}


@program_group(SUBCOMMANDS, EPILOG)
def command(**options: Any) -> None:
    """The event bus: a durable log of events with replay, confirmed publishing,
    durable and grouped consumers.  eda-pub and eda-sub use it with --bus."""


def main() -> None:
    run(command, "eda-bus")


if __name__ == "__main__":
    main()
