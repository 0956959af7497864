"""eda-lb: load balancing -- shell commands as services over ZeroMQ, and a TCP proxy.

One section per subcommand (worker, call, serve) after the helpers they
share; ``stats`` and ``tcp`` are in ``cli/lbstats.py`` and ``cli/lbtcp.py``.
Over 500 lines for a reason: three subcommands with some forty options, whose
declarations and help texts are the man page; the logic is in ``eda.core.lb``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from eda.cli.common import Context, Exit, Terminated, on_stop_signals, registry_access, run
from eda.cli.lbstats import stats
from eda.cli.lbtcp import tcp
from eda.cli.options import (
    SECONDS,
    SECURE_ENDPOINT,
    EndpointType,
    allow_option,
    apply_security,
    common_options,
    metrics_option,
    registry_option,
    security_options,
    serve_metrics,
    strategy_option,
)
from eda.cli.output import Output
from eda.core.errors import ExitStatus

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


# -- shared by the subcommands ------------------------------------------------------------
DRAIN_GRACE = 10.0  # seconds a stopping worker gives running requests (without --timeout)
STRATEGY_HELP = "round-robin, weighted (registry weight), least-conn, random, p2c (two choices)."


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from eda.cli.bus import parse_bytes
    from eda.core.errors import UsageError

    try:
        size = parse_bytes(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None
    if not 0 < size <= 256 << 20:
        raise click.BadParameter("use 1 byte to 256MiB")
    return size


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


def _request_options(func: Any) -> Any:
    """Options worker and call share."""
    func = click.option(
        "--max-request",
        default="1MiB",
        show_default=True,
        metavar="SIZE",
        callback=_size,
        help="Largest request (and reply) body; a bigger one gets one error, the rest go on.",
    )(func)
    func = click.option(
        "--heartbeat",
        type=SECONDS,
        default=1.0,
        show_default=True,
        metavar="SECONDS",
        help="Heartbeat interval; a peer silent for three intervals is dropped.",
    )(func)
    return registry_option(func)


@command.command(
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
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    metavar="N",
    help="Requests run at once (with --persistent: processes kept running).",
)
@click.option(
    "--queue",
    type=click.IntRange(0, 1_000_000),
    default=None,
    metavar="N",
    help="Requests waiting for a free slot before 'busy' is answered [default: 1024].",
)
@click.option(
    "--weight",
    type=click.IntRange(0, 65535),
    default=1,
    show_default=True,
    metavar="N",
    help="Share of the traffic under the weighted strategy (0: drain).",
)
@click.option(
    "--timeout",
    type=SECONDS,
    default=None,
    metavar="SECONDS",
    help="Kill a request's command after this long [default: the caller's timeout].",
)
@click.option(
    "--bind",
    default=None,
    metavar="ENDPOINT",
    help="Where to listen [default: tcp://*:* on --interface's address, or on all].",
)
@click.option(
    "--broker",
    "brokers",
    multiple=True,
    type=PinnedEndpoint("broker"),
    metavar="ENDPOINT",
    help=f"Also serve this broker's backend (repeatable; {SECURE_ENDPOINT}); "
    "brokers of NAME are found anyway.",
)
@click.option("--id", "inst_id", default=None, help="Instance id [default: NAME-HOST-PORT].")
@_request_options
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
    registries: tuple[str, ...],
    serverless: bool,
    allow: tuple[str, ...],
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
    metrics: Any,
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

    ctx = Context("eda-lb", verbose)
    service = validate_name(name)
    security = apply_security(secure, key_file, trust_dir, allow)
    explicit = [pins.given(b, "broker", "--broker", caller=True) for b in brokers]
    # secure mode: brokers found with an untrusted key (or none) are left out, and said so
    reports = SimpleNamespace(security=security, on_ignored=None, on_refused=None)
    secure_reports(ctx, reports, "broker")
    access = registry_access(registries, interface, no_mdns, serverless, ctx)
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


@command.command(
    epilog="""\b
Examples:
  eda-lb call upper hello world                       one request per argument, replies in order
  cat requests.txt | eda-lb call upper --timeout 2    one request per stdin line, pipelined
  eda-lb call upper --strategy least-conn < in.txt    to the instance with the fewest in flight
  eda-lb call upper --unordered --window 500 < in.txt replies as they come, 500 in flight
  eda-lb call upper --via upper hello                 through the broker (eda-lb serve upper)
  eda-lb call upper --connect tcp://10.0.0.5:5000 hi  to a given instance, no lookup
  eda-lb call pay --secure --connect w1@tcp://10.0.0.7:5601 x   secure: w1's trusted key pinned
""",
)
@click.argument("name")
@click.argument("requests", nargs=-1)
@strategy_option(STRATEGY_HELP)
@click.option(
    "--timeout",
    type=SECONDS,
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Time for each request, retries included (each attempt gets an equal share of the "
    "time left).",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 100),
    default=2,
    show_default=True,
    metavar="N",
    help="Attempts on other instances after a timeout or a dead instance (same request id).",
)
@click.option(
    "--window",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    metavar="N",
    help="Requests in flight at once.",
)
@click.option("--unordered", is_flag=True, help="Print replies as they come, not in input order.")
@click.option(
    "--via",
    default=None,
    metavar="BROKER",
    help="Go through the broker(s) registered as service BROKER (eda-lb serve) instead.",
)
@click.option(
    "--connect",
    "endpoints",
    multiple=True,
    type=PinnedEndpoint("instance"),
    metavar="ENDPOINT",
    help=f"Call this instance (repeatable; {SECURE_ENDPOINT}) instead of looking NAME up.",
)
@click.option(
    "--slow-start",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Ramp up the share of an instance that appears or comes back over this long.",
)
@_request_options
@security_options
@common_options
def call(
    name: str,
    requests: tuple[str, ...],
    strategy: str,
    timeout: float,
    retries: int,
    window: int,
    unordered: bool,
    via: str | None,
    endpoints: tuple[str, ...],
    slow_start: float,
    max_request: int,
    heartbeat: float,
    registries: tuple[str, ...],
    serverless: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Send requests to the instances of NAME and print the replies.

    Each argument is one request; without arguments, each stdin line is one,
    pipelined.  Requests are balanced over the live instances; one that times
    out or whose instance dies is retried on another.

    A failed request (an error reply, or no answer after its retries) is
    reported on stderr with its input; the exit status is then 1 (4 if every
    failure was a timeout).  With no live instance (none found, none that
    answers, or all gone for a whole --timeout), call stops with one error
    and exit status 3: the requests already sent are reported, the rest are
    not sent.

    With --secure, each instance's key is pinned (from its registry record or
    announcement; NAME@ENDPOINT for --connect): instances with a key not
    trusted are left out (a warning), and one refusing this caller's key is
    never sent a request; when every one refuses it, one error line each and
    exit status 1."""
    from eda.cli.secure import secure_reports
    from eda.core.lb import pins
    from eda.core.lb.caller import Caller, lookup_endpoints
    from eda.core.registry.model import validate_name
    from eda.core.reqrep import printable

    ctx = Context("eda-lb", verbose)
    validate_name(name)
    apply_security(secure, key_file, trust_dir)
    given = [pins.given(e, "instance", "--connect") for e in endpoints]
    out = Output(ctx)

    def failed(seq: int, line: bytes, reason: str) -> None:
        if caller.summary.no_instance and seq == caller.summary.unsent:
            return  # the first request not sent: the final error says it
        text = printable(line.decode(errors="replace"), 200)
        ctx.error(f"request {seq + 1} failed: {printable(reason)}; input: {text}")

    closed: list[Exit] = []

    def write(data: bytes) -> None:
        try:
            out.data(data)
        except Exit as exc:  # stdout closed (| head): stop now, quietly
            closed.append(exc)
            caller.stop()

    caller = Caller(
        out=write,
        failed=failed,
        strategy=strategy,
        timeout=timeout,
        retries=retries,
        window=window,
        unordered=unordered,
        heartbeat=heartbeat,
        max_request=max_request,
        slow_start=slow_start,
        log=ctx.debug,
        warn=ctx.warn,
    )
    caller.pool.what = "broker" if via else "worker"
    secure_reports(ctx, caller, caller.pool.what)
    finder: Any = None
    try:
        if given:
            caller.use((e.zmq, 1) for e in given)
        else:
            access = registry_access(registries, interface, no_mdns, serverless, ctx)
            target = validate_name(via) if via else name
            finder, found = lookup_endpoints(
                target, access, via=bool(via), on_ignored=caller.on_ignored
            )
            caller.use(found)
            finder.start()
            caller.follow(finder)
        if requests:
            caller.feed(r.encode(errors="surrogateescape") for r in requests)
        else:
            caller.feed_fd(sys.stdin.fileno())
        summary = caller.run()
        if closed:
            raise closed[0]
    finally:
        if finder is not None:
            finder.close()
        caller.close()
    ctx.debug(
        f"{summary.ok} answered, {summary.failed} failed, {summary.retried} retried, "
        f"{summary.busy} busy, {summary.dropped_instances} instance(s) dropped; latency "
        f"p50 {caller.percentile(0.5):.3f} ms, p99 {caller.percentile(0.99):.3f} ms"
    )
    if summary.refused:  # every instance refused this key: each was an error line
        raise Exit(ExitStatus.ERROR)
    if summary.no_instance:
        where = f"service {via or name!r}" if not given else ", ".join(e.zmq for e in given)
        parts = [f"{summary.ok} answered", f"{summary.failed} failed"] if summary.sent else []
        if summary.unsent is not None:
            parts.append(f"input from line {summary.unsent + 1} on not sent")
        rest = f" ({', '.join(parts)})" if parts else ""
        wait = summary.no_instance_for
        ctx.error(f"no live instance of {printable(where)} for {wait:.2g} s{rest}")
        raise Exit(ExitStatus.NOT_FOUND)
    if summary.failed:
        ctx.error(f"{summary.failed} request(s) failed")
        raise Exit(ExitStatus.TIMEOUT if summary.timed_out == summary.failed else ExitStatus.ERROR)


# -- serve (the broker) --------------------------------------------------------------------
@command.command(
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
@click.option(
    "--heartbeat",
    type=SECONDS,
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Heartbeat period towards workers (each worker's own is learnt); a worker silent "
    "for 3 of its periods is dropped.",
)
@click.option(
    "--queue",
    type=click.IntRange(0),
    default=10_000,
    show_default=True,
    metavar="N",
    help="Requests waiting for a free worker at most (a caller takes half at most); "
    "beyond, callers get 'busy'.",
)
@click.option(
    "--queue-bytes",
    default="64MiB",
    show_default=True,
    metavar="SIZE",
    callback=_size,
    help="Bytes of the requests waiting at most; beyond, callers get 'busy'.",
)
@click.option(
    "--max-request",
    default="1MiB",
    show_default=True,
    metavar="SIZE",
    callback=_size,
    help="Largest request body; a larger one gets one error reply, the rest go on.",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 100),
    default=2,
    show_default=True,
    metavar="N",
    help="Re-sends of a request whose worker died, to other workers.",
)
@click.option(
    "--pipeline",
    type=click.IntRange(1, 10_000),
    default=None,
    metavar="N",
    help="Requests sent ahead to each worker slot [default: as many as each worker says "
    "it takes: its concurrency, times 256 for a persistent worker, which pipelines "
    "requests into its processes].",
)
@click.option(
    "--eject-after",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    metavar="N",
    help="Requests in a row that fail at a worker (time out, or an error reply) eject it "
    "for a while.",
)
@click.option(
    "--eject-time",
    type=SECONDS,
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="First ejection; each next one doubles, up to 30 s.",
)
@click.option(
    "--slow-start",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="A worker joining others ramps its share up over this long (0: off).",
)
@click.option(
    "--panic",
    type=click.FloatRange(0, 100),
    default=50.0,
    show_default=True,
    metavar="PERCENT",
    help="Below this share of healthy workers, balance over all of them.",
)
@click.option(
    "--drain",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM/SIGINT: answer new requests 'busy' (callers retry elsewhere) and let "
    "the running ones finish this long.",
)
@click.option("--host", metavar="HOST", help="Address to publish (default: this host's).")
@click.option("--id", "inst_id", metavar="ID", help="Instance id (default: NAME-HOST-PORT).")
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
    registries: tuple[str, ...],
    serverless: bool,
    allow: tuple[str, ...],
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
    metrics: Any,
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

    ctx = Context("eda-lb", verbose)
    service = validate_name(name)
    apply_security(secure, key_file, trust_dir, allow)
    access = registry_access(registries, interface, no_mdns, serverless, ctx)
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


# stats and tcp, each in a module of its own (cli/lbstats.py, cli/lbtcp.py)
command.add_command(stats)
command.add_command(tcp)


def main() -> None:
    run(command, "eda-lb")


if __name__ == "__main__":
    main()
