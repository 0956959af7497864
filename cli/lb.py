"""eda-lb: load balancing -- shell commands as services over ZeroMQ, and a TCP proxy."""

from __future__ import annotations

import click

from eda.cli.common import common_options, run

EPILOG = """\b
Examples:
  eda-lb worker upper -- tr a-z A-Z                 each request is fed to the command
  eda-lb call upper hello world                     one request per argument, replies in order
  cat requests.txt | eda-lb call upper --timeout 2  one request per stdin line, pipelined
  eda-lb serve upper --strategy least-conn          an optional broker, found by mDNS
  eda-lb tcp --listen 127.0.0.1:8080 web            TCP proxy to registered service 'web'
  eda-lb stats upper                                per-instance requests, errors, latency
"""


@click.group(epilog=EPILOG, context_settings={"max_content_width": 100})
@common_options
def command(config: str | None, interface: str | None, no_mdns: bool, verbose: bool) -> None:
    """Load balancing: any shell command becomes a service over ZeroMQ (worker, call,
    serve), and a TCP proxy that follows the registry (tcp)."""


# -- worker, call (request/reply, brokerless) ---------------------------------------------


# -- serve, stats (the broker) -------------------------------------------------------------


# -- tcp (the TCP proxy) -------------------------------------------------------------------


def main() -> None:
    run(command, "eda-lb")


if __name__ == "__main__":
    main()
