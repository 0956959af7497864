"""eda-lb tcp: the TCP proxy (built-in data planes or HAProxy) in front of a service's
passing instances; its figures are served for ``eda-lb stats``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Registries, Terminated, on_stop_signals, registry_access
from eda.cli.options import (
    SecureMode,
    common_options,
    health_check_options,
    metrics_option,
    number_option,
    registry_option,
    retries_option,
    seconds_option,
    security_options,
    strategy_option,
)

if TYPE_CHECKING:
    pass


@click.command(
    "tcp",
    epilog="""\b
Examples:
  eda-lb tcp --listen 127.0.0.1:8080 web                  proxy to the passing instances of 'web'
  eda-lb tcp --listen :8080 web --strategy least-conn     fewest open connections first
  eda-lb tcp --listen :5432 db --check-interval 0.5 --rise 3 --fall 2
  eda-lb tcp --listen :8080 web --engine haproxy          HAProxy as the data plane
  eda-registry register web --port 8001 -- python3 -m http.server 8001   an instance to proxy to
""",
)
@click.argument("name")
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where to accept connections.")
@strategy_option("How each new connection picks an instance (weighted: the registry weight).")
@health_check_options(interval=1.0, timeout=1.0)
@retries_option("Other instances tried when a connect fails (builtin engine).", 20, None)
@seconds_option(
    "--connect-timeout", type=click.FloatRange(min=0.01), default=2.0,
    help="A connect to an instance taking longer is retried elsewhere (builtin engine)."
)
@seconds_option(
    "--drain-timeout", type=click.FloatRange(min=0), default=30.0,
    help="On SIGTERM: stop accepting, let open connections finish for this long."
)
@seconds_option(
    "--idle-timeout", type=click.FloatRange(min=0), default=600.0,
    help="Close a connection that moved no byte either way this long (0: never)."
)
@number_option(
    "--workers", type=click.IntRange(0, 256),
    help="Data-plane processes (builtin engine)  [default: one per CPU]"
)
@number_option(
    "--max-conn", type=click.IntRange(1, 1_000_000), default=10000,
    help="Open connections per data-plane process; more wait in the listen backlog."
)
@click.option(
    "--engine",
    type=click.Choice(("builtin", "haproxy")),
    default="builtin",
    show_default=True,
    help="builtin: the embedded proxy; haproxy: run HAProxy, configured from the registry.",
)
@registry_option
@security_options
@metrics_option
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
    registry: Registries,
    secure: SecureMode,
    metrics: Any,
    ctx: Context,
) -> None:
    """Proxy TCP connections on --listen to the passing instances of service NAME.

    Follows the registry (or mDNS in serverless mode) without restart, checks
    every instance with a TCP connect (rise/fall), retries a failed connect on
    another instance, and on SIGTERM stops accepting and lets open
    connections finish (--drain-timeout).  Diagnostics go to stderr.

    With --secure, its ZeroMQ connections (the registry, the stats socket
    eda-lb stats asks) are CURVE-encrypted and authenticated, and it proxies
    only to instances registered or announced under a trusted key; the
    proxied TCP bytes stay as the client and the instance send them.
    """
    import os

    from eda.core.lb import tcp as core
    from eda.core.lb.follow import Follower, HaproxyFollower
    from eda.core.registry.model import validate_name

    service = validate_name(name)
    secure.apply()
    where = core.parse_listen(listen)
    access = registry_access(registry, ctx)
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
    served: list[Any] = []  # the stats socket and its registration, closed at the end

    def serve_figures(figures: Any, engine: str) -> None:
        from eda.core.lb.metrics import proxy_families
        from eda.core.lb.proxystats import PublishedFigures
        from eda.core.metrics import serve_in_thread

        exporter = serve_in_thread(proxy_families(figures), metrics, ctx.warn)
        if exporter is not None:
            served.append(exporter)
            ctx.warn(f"metrics on {exporter.server.url}/metrics")
        served.append(
            PublishedFigures(service, access, figures, engine, log=ctx.debug, warn=ctx.warn).start()
        )

    if engine == "haproxy":
        haproxy = HaproxyFollower(
            service, access, where.host, where.port, settings, drain_timeout,
            log=ctx.debug, warn=ctx.warn,
        )  # fmt: skip

        def started() -> None:
            ctx.warn(
                f"proxying {where} to {service} ({strategy}, haproxy); "
                f"runtime API: {haproxy.engine.socket_path}"
            )
            serve_figures(haproxy.figures, "haproxy")

        def on_stop(signum: int, frame: object) -> None:
            if haproxy.stopping.is_set():
                raise Terminated()
            haproxy.stop()

        on_stop_signals(on_stop)
        try:
            if haproxy.run(started):
                ctx.warn("stopped")
        finally:
            for thing in served:
                thing.close()
        return
    proxy = core.TcpProxy(where, settings, log=ctx.debug, warn=ctx.warn)
    terms = []

    def on_term(signum: int, frame: object) -> None:
        terms.append(signum)
        if len(terms) > 1:
            raise Terminated()
        proxy.drain(drain_timeout)

    try:
        proxy.start()
        on_stop_signals(on_term)
        bound = "{}:{}".format(*proxy.address)
        ctx.warn(f"proxying {bound} to {service} ({strategy}, {settings.workers} data plane(s))")
        follower = Follower(
            service, access, proxy.set_candidates, lambda: proxy.drain(0), warn=ctx.warn
        )
        follower.start()
        serve_figures(proxy.figures, "builtin")
        proxy.run()
        follower.check()
        ctx.warn("drained: stopped")
    finally:
        for thing in served:
            thing.close()
        proxy.close()
