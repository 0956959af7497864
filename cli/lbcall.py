"""eda-lb call: requests to a service, replies in order (one-shot or a stream of lines).

The group (cli/lb.py) imports this module only when ``eda-lb call`` runs.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from eda.cli.common import Context, Exit, Registries, registry_access
from eda.cli.lb import (
    STRATEGY_HELP,
    pinned_endpoints_option,
    request_options,
)
from eda.cli.options import (
    SECURE_ENDPOINT,
    SecureMode,
    common_options,
    number_option,
    retries_option,
    seconds_option,
    security_options,
    slow_start_option,
    strategy_option,
)
from eda.cli.output import Output
from eda.core.errors import ExitStatus


@click.command(
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
@seconds_option(
    "--timeout", default=10.0,
    help="Time for each request, retries included (each attempt gets an equal share of the "
    "time left)."
)
@retries_option("Attempts on other instances after a timeout or a dead instance (same request id).")
@number_option(
    "--window", type=click.IntRange(1, 100_000), default=100, help="Requests in flight at once."
)
@click.option("--unordered", is_flag=True, help="Print replies as they come, not in input order.")
@click.option(
    "--via",
    default=None,
    metavar="BROKER",
    help="Go through the broker(s) registered as service BROKER (eda-lb serve) instead.",
)
@pinned_endpoints_option(
    "--connect", "endpoints", what="instance",
    help=f"Call this instance (repeatable; {SECURE_ENDPOINT}) instead of looking NAME up.",
)  # fmt: skip
@slow_start_option(
    2.0, "Ramp up the share of an instance that appears or comes back over this long."
)
@request_options
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
    registry: Registries,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Send requests to the instances of NAME and print the replies.

    Each argument is one request; without arguments, each stdin line is one,
    pipelined.  Requests are balanced over the live instances; one that times
    out or whose instance dies is retried on another.

    A failed request (an error reply, or no answer after its retries) is
    reported on stderr with its input; the exit status is then 1 (4 if every
    failure was a timeout); -v names the instance each attempt went to
    ("request N sent to ENDPOINT").  With no live instance (none found, none that
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

    validate_name(name)
    secure.apply()
    given = [pins.given(e, "instance", "--connect") for e in endpoints]
    out = Output(ctx)

    def failed(seq: int, line: bytes, reason: str) -> None:
        if caller.summary.no_instance and seq == caller.summary.unsent:
            return  # the first request not sent: the final error says it
        text = printable(line.decode(errors="replace"), 200)
        ctx.error(f"request {seq + 1} failed: {printable(reason)}; input: {text}")

    def sent(seq: int, endpoint: str) -> None:
        ctx.debug(f"request {seq + 1} sent to {endpoint}")

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
        sent=sent if ctx.verbose else None,
    )
    caller.pool.what = "broker" if via else "worker"
    secure_reports(ctx, caller, caller.pool.what)
    finder: Any = None
    try:
        if given:
            caller.use((e.zmq, 1) for e in given)
        else:
            access = registry_access(registry, ctx)
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
