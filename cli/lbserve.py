"""eda-lb serve: the optional broker between callers and workers.

The group (cli/lb.py) imports this module only when ``eda-lb serve`` runs.
"""

from __future__ import annotations

from typing import Any

import click

from eda.cli.common import Context, Registries, Terminated, registry_access
from eda.cli.options import (
    SecureMode,
    advertise_options,
    allow_option,
    common_options,
    heartbeat_option,
    metrics_option,
    number_option,
    registry_option,
    retries_option,
    seconds_option,
    security_options,
    serve_metrics,
    size_option,
    slow_start_option,
    strategy_option,
)


# -- serve (the broker) --------------------------------------------------------------------
@click.command(
    epilog="""\b
Examples:
  eda-lb serve upper                                 a broker for service 'upper'
  eda-lb serve upper --strategy least-conn           the worker with fewest requests in flight
  eda-lb serve upper --bind tcp://*:7801 --backend tcp://*:7802   fixed ports
  eda-lb call upper --via upper hello                a caller going through it
"""
)
@click.argument("name")
@click.option(
    "--bind",
    default="tcp://*:*",
    show_default=True,
    metavar="ENDPOINT",
    help="Where callers connect (tcp://HOST:PORT, PORT may be '*').",
)
@click.option(
    "--backend",
    default="tcp://*:*",
    show_default=True,
    metavar="ENDPOINT",
    help="Where workers connect (tcp://HOST:PORT, PORT may be '*').",
)
@strategy_option("How a worker is chosen for each request.")
@heartbeat_option(
    "Heartbeat period towards workers (each worker's own is learnt); a worker silent "
    "for 3 of its periods is dropped."
)
@number_option(
    "--queue", type=click.IntRange(0), default=10_000,
    help="Requests waiting for a free worker at most (a caller takes half at most); "
    "beyond, callers get 'busy'."
)
@size_option(
    "--queue-bytes", "64MiB", "Bytes of the requests waiting at most; beyond, callers get 'busy'."
)
@size_option(
    "--max-request",
    "1MiB",
    "Largest request body; a larger one gets one error reply, the rest go on.",
)
@retries_option("Re-sends of a request whose worker died, to other workers.")
@number_option(
    "--pipeline", type=click.IntRange(1, 10_000),
    help="Requests sent ahead to each worker slot [default: as many as each worker says "
    "it takes: its concurrency, times 256 for a persistent worker, which pipelines "
    "requests into its processes]."
)
@number_option(
    "--eject-after", type=click.IntRange(1), default=5,
    help="Requests in a row that fail at a worker (time out, or an error reply) eject it "
    "for a while."
)
@seconds_option(
    "--eject-time", default=1.0, help="First ejection; each next one doubles, up to 30 s."
)
@slow_start_option(0.0, "A worker joining others ramps its share up over this long (0: off).")
@click.option(
    "--panic",
    type=click.FloatRange(0, 100),
    default=50.0,
    show_default=True,
    metavar="PERCENT",
    help="Below this share of healthy workers, balance over all of them.",
)
@seconds_option(
    "--drain", type=click.FloatRange(0), default=5.0,
    help="On SIGTERM/SIGINT: answer new requests 'busy' (callers retry elsewhere) and let "
    "the running ones finish this long."
)
@advertise_options("Address to publish (default: this host's).")
@registry_option
@allow_option
@security_options
@metrics_option
@common_options
def serve(
    name: str,
    bind: str,
    backend: str,
    strategy: str,
    heartbeat: float,
    queue: int,
    queue_bytes: int,
    max_request: int,
    retries: int,
    pipeline: int | None,
    eject_after: int,
    eject_time: float,
    slow_start: float,
    panic: float,
    drain: float,
    host: str | None,
    inst_id: str | None,
    registry: Registries,
    secure: SecureMode,
    metrics: Any,
    ctx: Context,
) -> None:
    """Run a broker for service NAME: workers of NAME connect to it, callers send it
    requests (`eda-lb call NAME` with its via option), and it balances each
    request over the ready workers, within each one's concurrency.

    It registers as an instance of NAME with meta role=broker (registry, else
    mDNS), so that workers and callers find it.  A worker silent for 3
    heartbeats is dropped and its requests in flight are re-sent to another
    worker with the same request id.

    Ports bound as '*' (the default) are remembered in $XDG_STATE_HOME/eda
    (lb-NAME.port, lb-NAME.backend.port): restarted with the same command,
    the broker listens where callers and workers expect it.

    With --secure, both ports admit trusted keys only (with --allow, only
    these names: callers and workers alike).
    """
    from eda.core.lb.broker import Broker, Settings
    from eda.core.presence import Presence
    from eda.core.registry import access as reg
    from eda.core.registry.model import validate_name

    service = validate_name(name)
    secure.apply()
    access = registry_access(registry, ctx)
    if access.interface:
        bind, backend = (
            e.replace("tcp://*:", f"tcp://{access.interface}:") for e in (bind, backend)
        )
    settings = Settings(
        service=service, bind=bind, backend=backend, strategy=strategy, heartbeat=heartbeat,
        queue=queue, queue_bytes=queue_bytes, max_request=max_request, retries=retries,
        pipeline=pipeline or 0, eject_after=eject_after, eject_base=eject_time,
        slow_start=slow_start, panic=panic, remember=True,
    )  # fmt: skip
    broker = Broker(settings, log=ctx.debug, warn=ctx.warn, interface=access.interface)
    presence = None
    try:
        serve_metrics(broker, metrics, ctx.warn)
        broker.start()
        interval = max(0.2, min(heartbeat, 2.0))
        record = reg.registration(
            service, broker.port, host=host, inst_id=inst_id, interval=interval,
            meta=("role=broker", f"backend={broker.backend_port}"),
        )  # fmt: skip
        presence = Presence(access, record, log=ctx.debug, warn=ctx.warn)
        inst = presence.start()
        broker.id = inst.id
        how = {"registry": "registered", "mdns": "announced by mDNS", "none": "not registered"}
        ctx.warn(
            f"broker {inst.id} for {service} listening on {broker.endpoint} (callers), "
            f"{broker.backend_endpoint} (workers) ({how[presence.mode]})"
        )
        try:
            broker.serve()
        except (KeyboardInterrupt, Terminated):
            presence.close()  # no new caller finds us
            ctx.debug(f"draining: {len(broker.pending)} request(s) pending")
            broker.drain(drain)
            raise
    finally:
        if presence is not None:
            presence.close()
        broker.close()
