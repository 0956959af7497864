"""``--bus [ENDPOINT]``, the option eda-pub and eda-sub share, and where it leads.

Its own small module so that a one-shot ``eda-pub``/``eda-sub`` does not import
eda-bus's whole command line (six subcommands, their options and tables) to
parse one option (issue 20: start-up of commands in shell loops).
"""

from __future__ import annotations

from typing import Any

import click

from eda.cli.common import Context
from eda.cli.options import SECURE_ENDPOINT

AUTO = "auto"  # --bus without an endpoint: EDA_BUS, the cache, then mDNS


def bus_option(func: Any) -> Any:
    """``--bus [ENDPOINT]`` for eda-pub and eda-sub."""
    return click.option(
        "--bus",
        "bus",
        is_flag=False,
        flag_value=AUTO,
        default=None,
        metavar="[ENDPOINT]",
        help="Go through an eda-bus (found by EDA_BUS or mDNS, or at ENDPOINT tcp://HOST:PORT;"
        f" {SECURE_ENDPOINT}).",
    )(func)


def split_bus(bus: str | None, args: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """``--bus TOPIC ...``: click took the first argument as the endpoint; give it back.

    A value that looks like an endpoint (``://``, or ``HOST:PORT``) is one,
    checked here (a bare ``HOST:PORT`` is refused: endpoints are tcp://HOST:PORT
    everywhere), never a topic or a pattern.
    """
    if bus is None or bus == AUTO:
        return bus, args
    _, colon, port = bus.rpartition(":")
    if "://" in bus or (colon and port.isascii() and port.isdigit()):
        from eda.core.reqrep import client_endpoint

        name, at, endpoint = bus.rpartition("@")  # secure mode: NAME@tcp://HOST:PORT
        return name + at + client_endpoint(endpoint, "bus").zmq, args
    return AUTO, (bus, *args)


def bus_endpoint(bus: str, interface: str | None, no_mdns: bool, ctx: Context | None = None) -> str:
    return find_endpoint(None if bus == AUTO else bus, interface, no_mdns, ctx)


def find_endpoint(
    bus: str | None, interface: str | None, no_mdns: bool, ctx: Context | None = None
) -> str:
    """The bus's endpoint; with *ctx*, announced buses skipped are reported (secure mode)."""
    from types import SimpleNamespace

    from eda.cli.secure import secure_reports
    from eda.core import discovery, security
    from eda.core.bus.client import find_bus

    reports = SimpleNamespace(security=security.active(), on_ignored=None, on_refused=None)
    if ctx is not None:
        secure_reports(ctx, reports, "bus")
    found = find_bus(bus, interface=discovery.resolve_interface(interface), use_mdns=not no_mdns,
                     on_ignored=reports.on_ignored)  # fmt: skip
    return found.zmq
