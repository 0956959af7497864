"""eda-lb: load balancing -- shell commands as services over ZeroMQ, and a TCP proxy.

The group and what its subcommands share; each subcommand is in a module of its
own, imported only when it runs (:class:`~eda.cli.lazygroup.LazyGroup`):
``lbworker.py``, ``lbcall.py``, ``lbserve.py``, ``lbstats.py``, ``lbtcp.py``.
The logic is in ``eda.core.lb``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from eda.cli.common import run
from eda.cli.options import (
    EndpointType,
    heartbeat_option,
    program_group,
    registry_option,
    size_option,
)

EPILOG = """\b
Examples:
  eda-lb worker upper -- tr a-z A-Z                 each request is fed to the command
  eda-lb call upper hello world                     one request per argument, replies in order
  cat requests.txt | eda-lb call upper --timeout 2  one request per stdin line, pipelined
  eda-lb serve upper --strategy least-conn          an optional broker, found by mDNS
  eda-lb tcp --listen 127.0.0.1:8080 web            TCP proxy to registered service 'web'
  eda-lb stats upper                                per-instance requests, errors, latency
"""


SUBCOMMANDS = {
    "worker": "eda.cli.lbworker:worker",
    "call": "eda.cli.lbcall:call",
    "serve": "eda.cli.lbserve:serve",
    "stats": "eda.cli.lbstats:stats",
    "tcp": "eda.cli.lbtcp:tcp",
}


@program_group(SUBCOMMANDS, EPILOG)
def command(**options: Any) -> None:
    """Load balancing: any shell command becomes a service over ZeroMQ (worker, call,
    serve), and a TCP proxy that follows the registry (tcp)."""


# -- shared by the subcommands ------------------------------------------------------------
DRAIN_GRACE = 10.0  # seconds a stopping worker gives running requests (without --timeout)
STRATEGY_HELP = "round-robin, weighted (registry weight), least-conn, random, p2c (two choices)."


class PinnedEndpoint(click.ParamType[str]):
    """An endpoint to connect to (as :class:`EndpointType` reads it), in secure mode
    preceded by the name its server's key is trusted under: ``NAME@tcp://HOST:PORT``.
    The value is the text normalized; :func:`eda.core.lb.pins.given` pins the key."""

    name = "endpoint"

    def __init__(self, what: str) -> None:
        self.endpoint = EndpointType(what)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        name, at, text = str(value).rpartition("@")
        return name + at + self.endpoint.convert(text, param, ctx).zmq


def pinned_endpoints_option(*decls: str, what: str, help: str) -> Callable[[Any], Any]:
    """A repeatable option of endpoints of *what* to connect to (:class:`PinnedEndpoint`)."""
    return click.option(
        *decls, multiple=True, type=PinnedEndpoint(what), metavar="ENDPOINT", help=help
    )


def request_options(func: Any) -> Any:
    """Options worker and call share."""
    func = size_option(
        "--max-request",
        "1MiB",
        "Largest request (and reply) body; a bigger one gets one error, the rest go on.",
    )(func)
    func = heartbeat_option("Heartbeat interval; a peer silent for three intervals is dropped.")(
        func
    )
    return registry_option(func)


def main() -> None:
    run(command, "eda-lb")


if __name__ == "__main__":
    main()
