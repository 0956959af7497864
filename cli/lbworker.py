"""eda-lb worker: a shell command served as an instance of a service.

The group (cli/lb.py) imports this module only when ``eda-lb worker`` runs.
"""

from __future__ import annotations

from typing import Any

import click

from eda.cli.common import Context, Registries, on_stop_signals, registry_access
from eda.cli.lb import (
    DRAIN_GRACE,
    pinned_endpoints_option,
    request_options,
)
from eda.cli.options import (
    SECURE_ENDPOINT,
    SecureMode,
    allow_option,
    common_options,
    instance_id_option,
    metrics_option,
    number_option,
    seconds_option,
    security_options,
    serve_metrics,
)


@click.command(
    epilog="""\b
Examples:
  eda-lb worker upper -- tr a-z A-Z                          one command per request
  eda-lb worker upper --concurrency 4 -- ./slow.sh           up to 4 requests at once
  eda-lb worker echo --persistent --concurrency 2 -- cat     2 processes, one line per request
  eda-lb worker upper --persistent --with-id -- ./loop.sh    lines 'ID<TAB>request' in and out
  eda-lb worker upper --weight 3 --serverless -- tr a-z A-Z  announced by mDNS, 3x the traffic
  eda-lb worker pay --secure --allow shop -- ./charge.sh     CURVE; only key 'shop' may call
""",
)
@click.argument("name")
@click.argument("cmd", nargs=-1, required=True, metavar="-- COMMAND [ARGS]...")
@click.option(
    "--persistent",
    is_flag=True,
    help="Keep the command running: one request line in, one reply line out, in order "
    "(it must flush each line: stdbuf -oL CMD, sed -u, python3 -u).",
)
@click.option(
    "--with-id",
    is_flag=True,
    help="With --persistent: each line the command reads is 'ID<TAB>request' (ID: the "
    "request id, the same on a retry); a reply line 'ID<TAB>reply' answers request ID, "
    "in any order; any other line answers the oldest request.",
)
@number_option(
    "--concurrency", type=click.IntRange(1, 1024), default=1,
    help="Requests run at once (with --persistent: processes kept running)."
)
@number_option(
    "--queue", type=click.IntRange(0, 1_000_000),
    help="Requests waiting for a free slot before 'busy' is answered [default: 1024]."
)
@number_option(
    "--weight", type=click.IntRange(0, 65535), default=1,
    help="Share of the traffic under the weighted strategy (0: drain)."
)
@seconds_option(
    "--timeout", help="Kill a request's command after this long [default: the caller's timeout]."
)
@click.option(
    "--bind",
    default=None,
    metavar="ENDPOINT",
    help="Where to listen [default: tcp://*:* on --interface's address, or on all].",
)
@pinned_endpoints_option(
    "--broker", "brokers", what="broker",
    help=f"Also serve this broker's backend (repeatable; {SECURE_ENDPOINT}); "
    "brokers of NAME are found anyway.",
)  # fmt: skip
@instance_id_option
@request_options
@allow_option
@security_options
@metrics_option
@common_options
def worker(
    name: str,
    cmd: tuple[str, ...],
    persistent: bool,
    with_id: bool,
    concurrency: int,
    queue: int | None,
    weight: int,
    timeout: float | None,
    bind: str | None,
    brokers: tuple[str, ...],
    inst_id: str | None,
    max_request: int,
    heartbeat: float,
    registry: Registries,
    secure: SecureMode,
    metrics: Any,
    ctx: Context,
) -> None:
    """Serve requests for NAME by running a command: any shell command becomes a service.

    The command sees the request on stdin (with a newline) and its id in
    EDA_REQUEST_ID (the same on a retry); its stdout is the reply.  A
    failure is an error reply saying why ('exit status 3: ' and the last line
    of its stderr, else of its stdout).  With --persistent, one process reads
    one request per line; with --with-id each line is prefixed by its request
    id and a tab.

    Registers with the registry (or by mDNS when there is none) with its
    weight and concurrency, heartbeats, and deregisters on exit.  Brokers of
    NAME (eda-lb serve) are found and served as well.

    With --secure, only trusted keys may call it (--allow: only these names;
    a broker is a caller too), and it serves only brokers whose key it trusts."""
    from types import SimpleNamespace

    from eda.cli.secure import secure_reports
    from eda.core.endpoint import Endpoint
    from eda.core.lb import pins
    from eda.core.lb.brokers import find_brokers
    from eda.core.lb.worker import Worker
    from eda.core.presence import Presence
    from eda.core.registry import access as reg
    from eda.core.registry.model import validate_name

    service = validate_name(name)
    security = secure.apply()
    explicit = [pins.given(b, "broker", "--broker", caller=True) for b in brokers]
    # secure mode: brokers found with an untrusted key (or none) are left out, and said so
    reports = SimpleNamespace(security=security, on_ignored=None, on_refused=None)
    secure_reports(ctx, reports, "broker")
    access = registry_access(registry, ctx)
    server = Worker(
        service,
        list(cmd),
        persistent=persistent,
        with_id=with_id,
        concurrency=concurrency,
        queue=queue,
        max_request=max_request,
        timeout=timeout or 0.0,
        heartbeat=heartbeat,
        weight=weight,
        log=ctx.debug,
        warn=ctx.warn,
        interface=access.interface,
    )
    presence: Any = None
    finder: Any = None
    stopping: list[int] = []  # a signal during start-up must not be lost: serve() checks it

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        server.stop()

    on_stop_signals(stop)
    try:
        serve_metrics(server, metrics, ctx.warn)
        endpoint = server.start(bind or f"tcp://{access.interface or '*'}:*")
        port = Endpoint.parse(endpoint, "worker").port
        ttl = round(3 * heartbeat, 3)
        meta = ["role=worker", f"concurrency={concurrency}"]
        if persistent:
            meta.append("mode=persistent")
        record = reg.registration(
            service, port, inst_id=inst_id, meta=meta, weight=weight, ttl=ttl, interval=heartbeat
        )
        presence = Presence(access, record, log=ctx.debug, warn=ctx.warn)
        inst = presence.start()
        server.inst_id = inst.id
        finder = find_brokers(
            service, access, presence.mode, explicit, heartbeat=heartbeat, warn=ctx.debug,
            on_ignored=reports.on_ignored,
        )  # fmt: skip
        if finder is not None:
            server.follow_brokers(finder)
        how = {"registry": "registered", "mdns": "announced by mDNS", "none": "not registered"}
        where = Endpoint(inst.host, port).zmq if presence.mode != "none" else endpoint
        ctx.warn(f"worker {inst.id} serving {service} on {where} ({how[presence.mode]})")
        server.serve(until=lambda: bool(stopping))
        # stopped (SIGTERM, SIGINT): leave the registry first, then finish what runs
        if presence is not None:
            presence.close()
        server.drain(timeout or DRAIN_GRACE)
    finally:
        if presence is not None:
            presence.close()
        if finder is not None:
            finder.close()
        server.shutdown()
