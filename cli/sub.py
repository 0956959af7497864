"""eda-sub: print (or act on) the events matching one or more topic patterns.

Over 500 lines for a reason: one command with two sources (brokerless
publishers, the bus; both with --everywhere), their options and how they
combine, and four ways to hand events on (JSON Lines, --raw, --format,
--exec).  The loop that receives from the sources, with their loss accounting,
is :mod:`eda.cli.subloop`; the receiving itself is ``eda.core.pubsub`` and
``eda.core.bus``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eda.cli.busopt import AUTO, bus_endpoint, bus_option, split_bus
from eda.cli.common import Context, Exit, Terminated, run
from eda.cli.options import (
    SECURE_ENDPOINT,
    SecureMode,
    common_options,
    hwm_option,
    number_option,
    output_options,
    seconds_option,
    security_options,
)
from eda.cli.output import Output, for_terminal
from eda.cli.secure import secure_reports
from eda.core.attributes import BUS_SEQUENCE, VIA
from eda.core.errors import ExitStatus, UsageError
from eda.core.topics import validate_pattern

if TYPE_CHECKING:
    from rich.text import Text

    from eda.cli import subloop
    from eda.core.codec import Batch

EPILOG = """\b
Examples:
  eda-sub 'orders.>' > orders.jsonl              every orders event, as JSON Lines
  eda-sub 'orders.*' -C 10 -W 5 --raw | jq .id   ten payloads, or give up after 5 idle seconds
  eda-sub 'logs.>' --format '{time} {topic} {data}'
  eda-sub 'jobs.*' --exec ./handle.sh            run a command per event (event on its stdin)
  eda-sub --no-mdns --connect tcp://10.0.0.5:5555 'metrics.>'
  eda-sub --everywhere '>'                       everything on the LAN: brokerless and bus
"""


@click.command(epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("patterns", nargs=-1)
@click.option(
    "--connect",
    "connects",
    multiple=True,
    metavar="ENDPOINT",
    help=f"Connect to a publisher that binds (repeatable; {SECURE_ENDPOINT}).",
)
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="ENDPOINT",
    help="Listen here for publishers, e.g. tcp://*:5556 (repeatable).",
)
@number_option("-C", "--count", type=click.IntRange(1), help="Exit 0 after N events.")
@seconds_option(
    "-W", "--timeout", "idle_timeout", type=click.FloatRange(min=0, min_open=True),
    help="Exit 4 after SECONDS without an event (time spent writing output does not count)."
)
@click.option("--raw", is_flag=True, help="Print the payload only, one per line.")
@output_options("Print one line per item from a template, e.g. '{time} {topic} {data}'.")
@click.option("--strict", is_flag=True, help="Exit 5 as soon as events are lost.")
@click.option(
    "--exec",
    "exec_cmd",
    metavar="CMD",
    help="Run CMD per event, event JSON on its stdin, EDA_TOPIC/EDA_ID set; exit 1 at the end "
    "if any run failed.",
)
@hwm_option("High-water mark: batches queued before dropping (at most about 64 MiB in all).")
@bus_option
@click.option(
    "--everywhere",
    is_flag=True,
    help="Brokerless publishers and the bus (found as --bus finds it, or at --bus ENDPOINT) "
    "as one stream; each event says where it came from (edavia: direct or bus, {via} in "
    "--format). A bus not found is a warning. --from-start, --from-seq, --since and --last "
    "apply to the bus.",
)
@click.option(
    "--from-start", is_flag=True, help="With --bus: replay every stored event, then live."
)
@number_option("--from-seq", type=click.IntRange(1), help="With --bus: start at bus sequence N.")
@click.option(
    "--since",
    metavar="TIME",
    help="With --bus: start at events stored since TIME: RFC 3339 (2026-11-01T00:00Z), unix "
    "seconds, or an age ago (90s, 30m, 1h, 2d, 1w).",
)
@number_option("--last", type=click.IntRange(0), help="With --bus: the last N events, then live.")
@click.option(
    "--until-end",
    is_flag=True,
    help="With --bus: exit 0 at the end of what is stored (from the start chosen, else the "
    "first stored event) instead of going on live.",
)
@click.option(
    "--durable",
    metavar="NAME",
    help="With --bus: resume where consumer NAME left off; acknowledged once written out.",
)
@click.option(
    "--group", metavar="NAME", help="With --bus: share the events with the other members of NAME."
)
@number_option(
    "--max-pending", type=click.IntRange(1, 1 << 20),
    help="With --group: hold at most N events delivered and not acknowledged, so the others "
    "get the rest (default 1 with --exec, else 100)."
)
@click.option(
    "--reset",
    is_flag=True,
    help="With --durable: move the existing consumer to --from-start, --from-seq, --since or "
    "--last (on the bus's host only).",
)
@security_options
@common_options
def command(
    patterns: tuple[str, ...],
    connects: tuple[str, ...],
    binds: tuple[str, ...],
    count: int | None,
    idle_timeout: float | None,
    raw: bool,
    template: str | None,
    force_json: bool,
    strict: bool,
    exec_cmd: str | None,
    hwm: int,
    bus: str | None,
    everywhere: bool,
    from_start: bool,
    from_seq: int | None,
    since: str | None,
    last: int | None,
    until_end: bool,
    durable: str | None,
    group: str | None,
    max_pending: int | None,
    reset: bool,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Print every event whose topic matches a PATTERN.

    Patterns are dot-separated; '*' matches one token and a final '>' one or
    more, e.g. 'orders.*' or 'orders.>'.  Publishers on the LAN are found by
    mDNS, including those that start later.  Output is JSON Lines (CloudEvents)
    when stdout is not a terminal, a coloured view when it is.
    """
    if not patterns and bus is None:
        raise UsageError("missing PATTERN")
    if sum([raw, bool(template), force_json]) > 1:
        raise UsageError("choose one of --raw, --json and --format")
    bus, patterns = split_bus(bus, patterns)
    from eda.core.bus.startat import start_spec

    start = start_spec(from_start, from_seq, since, last)
    if everywhere and (durable or group or until_end):
        # a consumer that acknowledges, or a dump with an end, is the bus's alone
        raise UsageError("--everywhere excludes --durable, --group and --until-end (use --bus)")
    if until_end and (durable or group):
        raise UsageError("--until-end excludes --durable and --group")
    if until_end and start is None:
        start = "start"  # a dump of what is stored: from its beginning unless told
    if reset and (not durable or start is None):
        raise UsageError("--reset needs --durable NAME and one of --from-start, --from-seq, "
                         "--since, --last")  # fmt: skip
    if (start is not None or durable or group or everywhere) and bus is None:
        bus = AUTO
    secure.apply()
    if bus is not None:
        if not patterns:
            raise UsageError("missing PATTERN")
        if durable and group:
            raise UsageError("--durable and --group exclude each other")
        if max_pending is not None and not group:
            raise UsageError("--max-pending needs --group NAME")
        for pattern in patterns:  # a usage error here, as without --bus, not the bus's refusal
            validate_pattern(pattern)
    brokerless = bus is None or everywhere
    if brokerless and ctx.no_mdns and not (connects or binds):
        raise UsageError("with --no-mdns, give --connect or --bind")
    fields = {BUS_SEQ} if bus is not None else set()
    if everywhere:
        fields |= {VIA, "via"}
    output = _output(ctx, template, force_json, exec_cmd, fields)
    slow = output.mode == "exec"  # --exec: slow per event

    from eda.cli import subloop

    sources: list[subloop.Source] = []
    status: int = ExitStatus.OK
    try:
        if brokerless:
            direct = _brokerless(ctx, list(patterns), hwm, ctx.interface, raw, output, everywhere)
            sources.append(direct)
            _listen(ctx, direct, binds, connects, ctx.no_mdns, alone=not everywhere)
        if bus is not None:
            on_bus = _bus(
                ctx, bus, ctx.interface, ctx.no_mdns, list(patterns), start, durable, group, raw,
                output, strict, everywhere, until_end, reset, max_pending,
            )  # fmt: skip
            if on_bus is not None:  # (None: --until-end, and nothing stored from there)
                sources.append(on_bus)
        if sources:
            subloop.run(sources, count, idle_timeout, strict, ctx, slow)
    except Exit as exc:
        status = exc.code
    except Terminated:  # SIGTERM: what arrived is written; leave cleanly
        pass
    finally:
        for source in sources:
            source.close()
    if output.finish() and status == ExitStatus.OK:
        status = ExitStatus.ERROR
    if status:
        raise Exit(status)


def _brokerless(
    ctx: Context,
    patterns: list[str],
    hwm: int,
    interface: str | None,
    raw: bool,
    output: Output,
    everywhere: bool,
) -> subloop.Brokerless:
    """Events straight from publishers (found by mDNS, or connected or bound as told)."""
    from eda.cli import subloop
    from eda.core import discovery
    from eda.core.envelope import RecentEvents
    from eda.core.pubsub import Subscriber

    lost = [0]

    def on_loss(source: str, topic: str, n: int) -> None:
        lost[0] += n
        ctx.warn(f"lost {n} events from {for_terminal(source)} (topic {for_terminal(topic)})")

    sub = Subscriber(
        patterns,
        interface=discovery.resolve_interface(interface),
        hwm=hwm,
        on_loss=on_loss,
        on_connect=lambda peer: ctx.debug(
            f"connected to publisher {for_terminal(peer.id)} at {for_terminal(peer.endpoint)}"
        ),
        on_unreachable=lambda endpoint, refused: ctx.warn(
            f"warning: --connect {endpoint}: {'connection refused' if refused else 'no answer'}"
            " so far; still trying"
        ),
    )
    render = _batch_renderer(raw, output, DIRECT if everywhere else None)
    return subloop.Brokerless(sub, render, RecentEvents(), ctx, lost)


def _listen(
    ctx: Context,
    source: subloop.Brokerless,
    binds: tuple[str, ...],
    connects: tuple[str, ...],
    no_mdns: bool,
    alone: bool,
) -> None:
    """Bind, connect and announce as told.  *alone*: the only source, so once every
    explicit publisher refused this key (and nothing else can come), exit 1."""
    sub = source.sub
    refusals = secure_reports(ctx, sub, "publisher")
    for endpoint in binds:
        ctx.debug(f"listening on {sub.bind(endpoint)} as {sub.subid}")
    for endpoint in connects:
        sub.connect(endpoint, watch=True)
    if not no_mdns:
        sub.bind_for_announce()
        sub.announce(
            sub.matcher.patterns,
            on_ready=lambda: ctx.debug(f"announced as {sub.subid} on mDNS"),
        )
        ctx.debug(f"listening on {sub.endpoints[0]} as {sub.subid}")
    if alone and connects and not binds and no_mdns:
        # only explicit publishers: once every one of them refused this key, nothing
        # can ever arrive (an error, exit 1, not a wait)
        source.give_up = lambda: len(refusals) >= len(connects)


def _bus(
    ctx: Context,
    bus: str,
    interface: str | None,
    no_mdns: bool,
    patterns: list[str],
    start: Any,
    durable: str | None,
    group: str | None,
    raw: bool,
    output: Output,
    strict: bool,
    everywhere: bool,
    until_end: bool,
    reset: bool,
    max_pending: int | None,
) -> subloop.Bus | None:
    """Events from eda-bus: replay from *start*, then live; acknowledged once written out.

    With *until_end*, only up to the last event stored when it starts (None: there
    is nothing from *start*).  With *everywhere*, a bus that is not found is a
    warning, and it is looked for again on a thread (brokerless events go on).
    """
    from eda.cli import subloop
    from eda.core.bus.client import GROUP_PENDING_SLOW, BusSubscriber
    from eda.core.bus.finder import BusFinder
    from eda.core.errors import EdaError

    def find() -> str:
        return bus_endpoint(bus, interface, no_mdns)

    finder: BusFinder | None = None
    endpoint: str | None
    if everywhere:
        try:
            endpoint = bus_endpoint(bus, interface, no_mdns, ctx)
        except UsageError:
            raise
        except EdaError as exc:
            ctx.warn(f"warning: {exc} (brokerless events only until a bus is found)")
            endpoint = None
        finder = BusFinder(find, endpoint)
    else:
        endpoint = bus_endpoint(bus, interface, no_mdns, ctx)

    matcher = None
    end = 0  # with until_end: the last bus sequence to deliver
    if until_end:
        assert endpoint is not None
        start, end = _stored_range(endpoint, patterns, start)
        if start["seq"] > end:  # nothing stored from there
            return None
        # every topic is read, and the matching ones kept here: reaching bus sequence
        # *end* then tells that nothing matching is left before it
        from eda.core.topics import Matcher

        matcher, patterns = Matcher(patterns), [">"]

    # --exec is slow per event: take few at a time, so heartbeats keep going and a
    # group's other members get the rest (a member holds one job: the next goes to a free one)
    slow = output.mode == "exec"

    def connect(endpoint: str) -> BusSubscriber:
        return BusSubscriber(
            endpoint, patterns, start=start, durable=durable, group=group,
            credit=64 if slow else None, relocate=finder.relocate if finder else find,
            reset=reset, max_pending=max_pending or (GROUP_PENDING_SLOW if slow else None),
        )  # fmt: skip

    render = _bus_renderer(raw, output, BUS if everywhere else None)
    return subloop.Bus(
        connect, endpoint, render, ctx, durable=durable, strict=strict, slow=slow,
        matcher=matcher, end=end, finder=finder,
    )  # fmt: skip


def _stored_range(endpoint: str, patterns: list[str], start: Any) -> tuple[dict[str, int], int]:
    """Where *start* is for *patterns*, and the last bus sequence stored now.

    The bus answers a subscription with both; this one takes no event (no credit).
    """
    from eda.core.bus.client import request
    from eda.core.errors import EdaError

    reply = request(endpoint, {"op": "sub", "patterns": patterns, "from": start, "credit": 0})
    first, last = reply.get("from"), reply.get("last")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (first, last)):
        raise EdaError("the bus answered a subscription without its range")
    assert isinstance(first, int) and isinstance(last, int)
    return {"seq": max(first, 1)}, last


def _bus_renderer(raw: bool, output: Output, via: str | None) -> Callable[[list[Any]], None]:
    """As :func:`_batch_renderer`, each event also carrying its bus sequence (edabusseq)."""
    from eda.core import envelope

    if raw and output.mode != "exec":
        return lambda ds: output.data(b"".join([envelope.batch_payloads(d.batch) for d in ds]))
    stamp = {} if via is None else {VIA: via}

    if output.mode == "json":

        def json_lines(ds: list[Any]) -> None:
            lines = envelope.bus_json_lines
            output.text("".join([line for d in ds for line in lines(d.busseq, d.batch, stamp)]))

        return json_lines

    def items(ds: list[Any]) -> None:
        output.items(
            {**ev, BUS_SEQ: d.busseq + i, **stamp}
            for d in ds
            for i, ev in enumerate(envelope.batch_to_events(d.batch))
        )

    return items


BUS_SEQ = BUS_SEQUENCE  # the attribute eda-sub --bus adds: the event's sequence on the bus
# --everywhere: where each event came from (the edavia attribute, {via} in --format)
DIRECT, BUS = "direct", "bus"

# what --format may name: the event's attributes, {topic} (= {type}) and {ext[NAME]}
FORMAT_FIELDS = frozenset({"topic", "ext"})


def _output(
    ctx: Context,
    template: str | None,
    force_json: bool,
    exec_cmd: str | None,
    extra_fields: frozenset[str] | set[str] = frozenset(),
) -> Output:
    from eda.core.attributes import CORE_ATTRIBUTES

    return Output(
        ctx,
        template=template,
        fields=CORE_ATTRIBUTES | FORMAT_FIELDS | extra_fields,
        force_json=force_json,
        exec_cmd=exec_cmd,
        exec_env=lambda ev: {"EDA_TOPIC": ev.get("type", ""), "EDA_ID": ev.get("id", "")},
        template_fields=_template_fields,
        terminal=_terminal_line,
    )


def _template_fields(event: dict[str, Any]) -> dict[str, Any]:
    from eda.core.attributes import CORE_ATTRIBUTES
    from eda.core.envelope import data_text

    ext = {k: v for k, v in event.items() if k not in CORE_ATTRIBUTES}
    topic, data, via = event.get("type", ""), data_text(event), event.get(VIA, "")
    return {**event, "topic": topic, "data": data, "ext": ext, "via": via}


def _terminal_line(event: dict[str, Any]) -> Text:
    from rich.text import Text

    from eda.core.envelope import data_text

    line = Text()
    line.append(for_terminal(str(event.get("time", ""))[11:23]), style="dim")
    line.append(" ")
    if VIA in event:  # --everywhere
        line.append(f"{for_terminal(str(event[VIA])):6} ", style="magenta")
    line.append(for_terminal(event.get("type", "")), style="bold cyan")
    line.append(" ")
    if "data_base64" in event:
        line.append("(base64) ", style="dim")
    line.append(for_terminal(data_text(event)))
    return line


def _batch_renderer(raw: bool, output: Output, via: str | None) -> Callable[[list[Batch]], None]:
    """How batches reach stdout: the fast paths (--raw, JSON Lines) work per batch.

    *via*: each event also says where it came from (--everywhere)."""
    from eda.core import envelope

    if raw and output.mode != "exec":
        return lambda batches: output.data(b"".join([envelope.batch_payloads(b) for b in batches]))
    if output.mode == "json" and via is None:
        return lambda batches: output.text(
            "".join([envelope.batch_to_json_lines(b) for b in batches])
        )
    if output.mode == "json":
        # a newline only ends a line (JSON escapes the others): each line gains the attribute
        tail = f',"{VIA}":"{via}"}}\n'
        return lambda batches: output.text(
            "".join([envelope.batch_to_json_lines(b) for b in batches]).replace("}\n", tail)
        )
    if via is None:
        return lambda batches: output.items(
            ev for b in batches for ev in envelope.batch_to_events(b)
        )
    return lambda batches: output.items(
        {**ev, VIA: via} for b in batches for ev in envelope.batch_to_events(b)
    )


def main() -> None:
    run(command, "eda-sub")


if __name__ == "__main__":
    main()
