"""eda-lb: load balancing -- shell commands as services over ZeroMQ, and a TCP proxy."""

from __future__ import annotations

from typing import Any

import click

from eda.cli.common import Context, Terminated, common_options, run
from eda.core.errors import EdaError

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
TCP_STRATEGIES = ("round-robin", "weighted", "least-conn", "random", "p2c")


def _registry_option(func: Any) -> Any:
    from eda.cli.registry import registry_option

    return registry_option(func)


@command.command(
    epilog="""\b
Examples:
  eda-lb tcp --listen 127.0.0.1:8080 web                  proxy to the passing instances of 'web'
  eda-lb tcp --listen :8080 web --strategy least-conn     fewest open connections first
  eda-lb tcp --listen :5432 db --check-interval 0.5 --rise 3 --fall 2
  eda-lb tcp --listen :8080 web --engine haproxy          HAProxy as the data plane
  eda-registry register web --port 8001 -- python3 -m http.server 8001   an instance to proxy to
"""
)
@click.argument("name")
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where to accept connections.")
@click.option(
    "--strategy",
    type=click.Choice(TCP_STRATEGIES),
    default="round-robin",
    show_default=True,
    help="How each new connection picks an instance (weighted: the registry weight).",
)
@click.option(
    "--check-interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Active TCP health check period per instance.",
)
@click.option(
    "--check-timeout",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="A check fails when the connect takes longer.",
)
@click.option(
    "--rise",
    type=click.IntRange(1, 100),
    default=2,
    show_default=True,
    help="Passed checks that bring a down instance back.",
)
@click.option(
    "--fall",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Failed checks that take an instance down.",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 20),
    default=2,
    show_default=True,
    help="Other instances tried when a connect fails (builtin engine).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.01),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="A connect to an instance taking longer is retried elsewhere (builtin engine).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM: stop accepting, let open connections finish for this long.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    metavar="SECONDS",
    help="Close a connection that moved no byte either way this long (0: never).",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    metavar="N",
    help="Data-plane processes (builtin engine)  [default: one per CPU]",
)
@click.option(
    "--max-conn",
    type=click.IntRange(1, 1_000_000),
    default=10000,
    show_default=True,
    metavar="N",
    help="Open connections per data-plane process; more wait in the listen backlog.",
)
@click.option(
    "--engine",
    type=click.Choice(("builtin", "haproxy")),
    default="builtin",
    show_default=True,
    help="builtin: the embedded proxy; haproxy: run HAProxy, configured from the registry.",
)
@_registry_option
@common_options
def tcp(
    name: str,
    listen: str,
    strategy: str,
    check_interval: float,
    check_timeout: float,
    rise: int,
    fall: int,
    retries: int,
    connect_timeout: float,
    drain_timeout: float,
    idle_timeout: float,
    workers: int | None,
    max_conn: int,
    engine: str,
    registries: tuple[str, ...],
    serverless: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Proxy TCP connections on --listen to the passing instances of service NAME.

    Follows the registry (or mDNS in serverless mode) without restart, checks
    every instance with a TCP connect (rise/fall), retries a failed connect on
    another instance, and on SIGTERM stops accepting and lets open
    connections finish (--drain-timeout).  Diagnostics go to stderr.
    """
    import os
    import signal
    import threading

    from eda.cli.registry import _access
    from eda.core.lb import tcp as core
    from eda.core.registry.model import validate_name

    ctx = Context("eda-lb", verbose)
    service = validate_name(name)
    host, port = core.parse_listen(listen)
    access = _access(registries, interface, no_mdns, serverless, ctx)
    settings = core.Settings(
        strategy=strategy,
        retries=retries,
        connect_timeout=connect_timeout,
        max_conns=max_conn,
        idle_timeout=idle_timeout,
        check_interval=check_interval,
        check_timeout=check_timeout,
        rise=rise,
        fall=fall,
        workers=(os.cpu_count() or 1) if workers is None else workers,
    )
    if engine == "haproxy":
        _tcp_haproxy(ctx, service, access, host, port, settings, drain_timeout)
        return
    proxy = core.TcpProxy(host, port, settings, log=ctx.debug, warn=ctx.warn)
    terms = []

    def on_term(signum: int, frame: object) -> None:
        terms.append(signum)
        if len(terms) > 1:
            raise Terminated()
        proxy.drain(drain_timeout)

    try:
        proxy.start()  # forks the data planes before any thread starts
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        where = "{}:{}".format(*proxy.address)
        ctx.warn(f"proxying {where} to {service} ({strategy}, {settings.workers} data plane(s))")

        failed: list[EdaError] = []

        def feed() -> None:
            try:
                for backends in core.follow(service, access, ctx.warn):
                    proxy.set_candidates(backends)
            except EdaError as exc:  # no registry known and mDNS off: nothing to follow
                failed.append(exc)
                proxy.drain(0)

        threading.Thread(target=feed, name="eda-lb-follow", daemon=True).start()
        proxy.run()
        if failed:
            raise failed[0]
        ctx.warn("drained: stopped")
    finally:
        proxy.close()


def _tcp_haproxy(
    ctx: Context,
    service: str,
    access: Any,
    host: str,
    port: int,
    settings: Any,
    drain_timeout: float,
) -> None:
    """--engine haproxy: the same registry following, HAProxy as the data plane."""
    import queue
    import signal
    import threading
    import time

    from eda.core.lb import tcp as core
    from eda.core.lb.haproxy import HaproxyEngine, Server

    updates: queue.Queue[list[core.Backend]] = queue.Queue()
    stop = threading.Event()

    failed: list[EdaError] = []

    def feed() -> None:
        try:
            for backends in core.follow(service, access, ctx.warn):
                updates.put(backends)
        except EdaError as exc:  # no registry known and mDNS off: nothing to follow
            failed.append(exc)
            stop.set()
            updates.put([])

    def on_term(signum: int, frame: object) -> None:
        if stop.is_set():
            raise Terminated()
        stop.set()
        updates.put([])  # wakes the loop below

    engine = HaproxyEngine(
        host,
        port,
        settings.strategy,
        check_interval=settings.check_interval,
        rise=settings.rise,
        fall=settings.fall,
        log=ctx.debug,
        drain_timeout=drain_timeout,
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout or 86400.0 * 365,
    )
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    threading.Thread(target=feed, name="eda-lb-follow", daemon=True).start()

    def servers(backends: list[core.Backend]) -> list[Server]:
        return [Server(b.id, b.host, b.port, b.weight) for b in backends]

    def newest(wait: float) -> list[core.Backend] | None:
        """The newest set once changes pause for 20 ms (a snapshot arrives one by one)."""
        try:
            latest = updates.get(timeout=wait)
        except queue.Empty:
            return None
        settle = time.monotonic() + 0.5  # a flood of changes still gets applied twice a second
        try:
            while time.monotonic() < settle:
                latest = updates.get(timeout=0.02)
        except queue.Empty:
            pass
        return latest

    current = newest(3.0) or []  # the registry's first answer, so HAProxy starts with it
    if failed:
        raise failed[0]
    if stop.is_set():  # SIGTERM before HAProxy even started
        return
    try:
        engine.start(servers(current))
        ctx.warn(f"proxying {host}:{port} to {service} ({settings.strategy}, haproxy)")
        while not stop.is_set():
            latest = newest(1.0)
            if latest is None:
                if not engine.alive():
                    raise EdaError("haproxy stopped unexpectedly")
                continue
            if not stop.is_set() and latest != current:
                current = latest
                engine.update(servers(current))
                ctx.debug(f"{len(current)} instance(s): {', '.join(b.id for b in current)}")
    finally:
        engine.stop(drain=stop.is_set() and not failed)
    if failed:
        raise failed[0]
    ctx.warn("stopped")


def main() -> None:
    run(command, "eda-lb")


if __name__ == "__main__":
    main()
