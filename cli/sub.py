"""eda-sub: print (or act on) the events matching one or more topic patterns.

Over 500 lines for a reason: one command with two sources (brokerless
publishers, the bus) and four ways to hand events on (JSON Lines, --raw,
--format, --exec), each with the loss and end-of-stream accounting a user
reads on stderr; the receiving is ``eda.core.pubsub`` and ``eda.core.bus``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eda.cli.bus import AUTO, bus_endpoint, bus_option, split_bus
from eda.cli.common import Context, Exit, Terminated, run
from eda.cli.options import apply_security, common_options, output_options, security_options
from eda.cli.output import Output, for_terminal
from eda.cli.secure import secure_reports
from eda.core.attributes import BUS_SEQUENCE
from eda.core.errors import ExitStatus, UsageError
from eda.core.topics import validate_pattern

if TYPE_CHECKING:
    from rich.text import Text

    from eda.core.codec import Batch
    from eda.core.envelope import RecentEvents

EPILOG = """\b
Examples:
  eda-sub 'orders.>' > orders.jsonl              every orders event, as JSON Lines
  eda-sub 'orders.*' -C 10 -W 5 --raw | jq .id   ten payloads, or give up after 5 idle seconds
  eda-sub 'logs.>' --format '{time} {topic} {data}'
  eda-sub 'jobs.*' --exec ./handle.sh            run a command per event (event on its stdin)
  eda-sub --no-mdns --connect tcp://10.0.0.5:5555 'metrics.>'
"""


@click.command(epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("patterns", nargs=-1)
@click.option(
    "--connect",
    "connects",
    multiple=True,
    metavar="ENDPOINT",
    help="Connect to a publisher that binds (repeatable).",
)
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="ENDPOINT",
    help="Listen here for publishers, e.g. tcp://*:5556 (repeatable).",
)
@click.option("-C", "--count", type=click.IntRange(1), metavar="N", help="Exit 0 after N events.")
@click.option(
    "-W",
    "--timeout",
    "idle_timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Exit 4 after SECONDS without an event (time spent writing output does not count).",
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
@click.option(
    "--hwm",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    help="High-water mark: batches queued before dropping (at most about 64 MiB in all).",
)
@bus_option
@click.option(
    "--from-start", is_flag=True, help="With --bus: replay every stored event, then live."
)
@click.option(
    "--from-seq", type=click.IntRange(1), metavar="N", help="With --bus: start at bus sequence N."
)
@click.option(
    "--since",
    metavar="TIME",
    help="With --bus: start at events stored since TIME: RFC 3339 (2026-11-01T00:00Z), unix "
    "seconds, or an age ago (90s, 30m, 1h, 2d, 1w).",
)
@click.option(
    "--last", type=click.IntRange(0), metavar="N", help="With --bus: the last N events, then live."
)
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
@click.option(
    "--max-pending",
    type=click.IntRange(1, 1 << 20),  # the bus's MAX_CREDIT
    metavar="N",
    help="With --group: hold at most N events delivered and not acknowledged, so the others "
    "get the rest (default 1 with --exec, else 100).",
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
    from_start: bool,
    from_seq: int | None,
    since: str | None,
    last: int | None,
    until_end: bool,
    durable: str | None,
    group: str | None,
    max_pending: int | None,
    reset: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Print every event whose topic matches a PATTERN.

    Patterns are dot-separated; '*' matches one token and a final '>' one or
    more, e.g. 'orders.*' or 'orders.>'.  Publishers on the LAN are found by
    mDNS, including those that start later.  Output is JSON Lines (CloudEvents)
    when stdout is not a terminal, a coloured view when it is.
    """
    ctx = Context("eda-sub", verbose)
    if not patterns and bus is None:
        raise UsageError("missing PATTERN")
    if sum([raw, bool(template), force_json]) > 1:
        raise UsageError("choose one of --raw, --json and --format")
    bus, patterns = split_bus(bus, patterns)
    start = _bus_start(from_start, from_seq, since, last)
    if until_end and (durable or group):
        raise UsageError("--until-end excludes --durable and --group")
    if until_end and start is None:
        start = "start"  # a dump of what is stored: from its beginning unless told
    if reset and (not durable or start is None):
        raise UsageError("--reset needs --durable NAME and one of --from-start, --from-seq, "
                         "--since, --last")  # fmt: skip
    if (start is not None or durable or group) and bus is None:
        bus = AUTO
    apply_security(secure, key_file, trust_dir)
    if bus is not None:
        if not patterns:
            raise UsageError("missing PATTERN")
        if durable and group:
            raise UsageError("--durable and --group exclude each other")
        if max_pending is not None and not group:
            raise UsageError("--max-pending needs --group NAME")
        for pattern in patterns:  # a usage error here, as without --bus, not the bus's refusal
            validate_pattern(pattern)
        output = _output(ctx, template, force_json, exec_cmd, {BUS_SEQ})
        endpoint = bus_endpoint(bus, interface, no_mdns, ctx)
        _subscribe_bus(
            ctx, endpoint, list(patterns), start, durable, group, count, idle_timeout, raw, output,
            strict, relocate=lambda: bus_endpoint(bus, interface, no_mdns), until_end=until_end,
            reset=reset, max_pending=max_pending,
        )  # fmt: skip
        return
    if no_mdns and not (connects or binds):
        raise UsageError("with --no-mdns, give --connect or --bind")
    output = _output(ctx, template, force_json, exec_cmd)

    from eda.core import discovery
    from eda.core.envelope import RecentEvents
    from eda.core.pubsub import Subscriber

    lost = [0]

    def on_loss(source: str, topic: str, n: int) -> None:
        lost[0] += n
        ctx.warn(f"lost {n} events from {for_terminal(source)} (topic {for_terminal(topic)})")

    iface = discovery.resolve_interface(interface)
    sub = Subscriber(
        list(patterns),
        interface=iface,
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
    refusals = secure_reports(ctx, sub, "publisher")
    status: int = ExitStatus.OK
    try:
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
        loop = _Loop(sub, _batch_renderer(raw, output), RecentEvents(), ctx)
        if connects and not binds and no_mdns:
            # only explicit publishers: once every one of them refused this key, nothing
            # can ever arrive (an error, exit 1, not a wait)
            loop.give_up = lambda: len(refusals) >= len(connects)
        loop.run(count, idle_timeout, strict, lost)
    except Exit as exc:
        status = exc.code
    except Terminated:  # SIGTERM: what arrived is written; leave cleanly
        pass
    finally:
        sub.close()
    if output.finish() and status == ExitStatus.OK:
        status = ExitStatus.ERROR
    if status:
        raise Exit(status)


def _bus_start(from_start: bool, from_seq: int | None, since: str | None, last: int | None) -> Any:
    """The starting point of a bus subscription (None: live, or a durable's position)."""
    given = [from_start, from_seq is not None, since is not None, last is not None]
    if sum(given) > 1:
        raise UsageError("choose one of --from-start, --from-seq, --since and --last")
    if from_start:
        return "start"
    if from_seq is not None:
        return {"seq": from_seq}
    if last is not None:
        return {"last": last}
    if since is not None:
        from datetime import UTC, datetime

        if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhdwSMHDW]\s*", since):  # an age: that long ago
            from eda.core.bus.retention import parse_age

            try:
                return {"time": max(time.time() - parse_age(since), 0.0)}
            except UsageError:
                raise UsageError(f"bad --since {since!r}: an age must be positive") from None
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            try:
                return {"time": float(since)}
            except ValueError:
                raise UsageError(
                    f"bad --since {since!r}: use RFC 3339 (2026-11-01T00:00Z), unix seconds"
                    " or an age (30m, 1h, 2d)"
                ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return {"time": when.timestamp()}
    return None


def _subscribe_bus(
    ctx: Context,
    endpoint: str,
    patterns: list[str],
    start: Any,
    durable: str | None,
    group: str | None,
    count: int | None,
    idle_timeout: float | None,
    raw: bool,
    output: Output,
    strict: bool = False,
    relocate: Any = None,
    until_end: bool = False,
    reset: bool = False,
    max_pending: int | None = None,
) -> None:
    """Events from eda-bus: replay from *start*, then live; acknowledged once written out.

    With *until_end*, only up to the last event stored when it starts, then return.
    """
    from eda.core.bus.client import GROUP_PENDING_SLOW, BusSubscriber
    from eda.core.errors import EdaError

    matcher = None
    end = 0  # with until_end: the last bus sequence to deliver
    if until_end:
        start, end = _stored_range(endpoint, patterns, start)
        if start["seq"] > end:  # nothing stored from there
            output.finish()
            return
        # every topic is read, and the matching ones kept here: reaching bus sequence
        # *end* then tells that nothing matching is left before it
        from eda.core.topics import Matcher

        matcher, patterns = Matcher(patterns), [">"]

    # --exec is slow per event: take few at a time, so heartbeats keep going and a
    # group's other members get the rest (a member holds one job: the next goes to a free one)
    slow = output.mode == "exec"
    sub = BusSubscriber(
        endpoint, patterns, start=start, durable=durable, group=group,
        credit=64 if slow else None, relocate=relocate, reset=reset,
        max_pending=max_pending or (GROUP_PENDING_SLOW if slow else None),
    )  # fmt: skip
    limit = 16 if slow else 1 << 16
    render = _bus_renderer(raw, output)
    status: int = ExitStatus.OK
    remaining = count
    reported_lost = 0
    warned = False
    try:
        sub.subscribe()
        ctx.debug(f"subscribed to the bus at {endpoint}")
        idle_since = time.monotonic()
        while remaining != 0:
            left = None if idle_timeout is None else idle_since + idle_timeout - time.monotonic()
            got = sub.receive(limit) if left is not None and left <= 0 else None
            if not got and (left is None or left > 0) and sub.poll(left):
                got = sub.receive(limit)
            if sub.errors:
                raise EdaError(f"the bus refused: {for_terminal(sub.errors[0])}")
            if sub.resumed is not None and durable is not None and not warned:
                _warn_resumed(ctx, durable, patterns, *sub.resumed)
                warned = True
            if sub.lost > reported_lost:
                ctx.warn(
                    f"lost {sub.lost - reported_lost} events (removed by the bus's retention"
                    " before they were delivered)"
                )
                reported_lost = sub.lost
                if strict:
                    raise Exit(ExitStatus.LOSS)
            if got and matcher is not None:
                reached = sub.last >= end
                got = [d for d in got if d.busseq <= end and matcher(d.batch.topic)]
                if remaining is not None and got:
                    got, remaining = _take(got, remaining)
                if got:
                    render(got)
                if reached:
                    break
                idle_since = time.monotonic()
            elif got:
                if remaining is not None:
                    got, remaining = _take(got, remaining)
                with sub.busy() if slow else contextlib.nullcontext():  # a job may outlast 5 s
                    render(got)
                top = got[-1]
                sub.ack(top.busseq + top.batch.size - 1)
                idle_since = time.monotonic()
            elif left is not None and left <= 0:
                ctx.warn(f"no event for {idle_timeout:g} s (-W/--timeout): exiting with status 4")
                raise Exit(ExitStatus.TIMEOUT)
    except Exit as exc:
        status = exc.code
    except Terminated:
        pass
    finally:
        sub.close()
    if sub.malformed:
        ctx.warn(f"ignored {sub.malformed} malformed message(s)")
    if output.finish() and status == ExitStatus.OK:
        status = ExitStatus.ERROR
    if status:
        raise Exit(status)


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


def _warn_resumed(
    ctx: Context, name: str, patterns: list[str], at: int, old: list[str], asked: bool
) -> None:
    """A durable that already existed resumes at its position: say what was not done."""
    shown = for_terminal(name)
    if asked:
        ctx.warn(
            f"durable {shown!r} exists: resuming at seq {at}, the start asked for is ignored"
            f" (to move it: eda-sub --bus --durable {shown} --reset --from-seq N|--since T"
            "|--from-start, on the bus's host)"
        )
    if old != patterns:
        ctx.warn(
            f"durable {shown!r} had patterns {for_terminal(' '.join(old))}: now"
            f" {for_terminal(' '.join(patterns))} (resuming at seq {at})"
        )


def _take(deliveries: list[Any], n: int) -> tuple[list[Any], int]:
    out = []
    for d in deliveries:
        if n <= 0:
            break
        if d.batch.size > n:
            from eda.core import codec

            (part,), _ = codec.take([d.batch], n)
            d = d._replace(batch=part)
        out.append(d)
        n -= d.batch.size
    return out, n


def _bus_renderer(raw: bool, output: Output) -> Callable[[list[Any]], None]:
    """As :func:`_batch_renderer`, each event also carrying its bus sequence (edabusseq)."""
    from eda.cli.output import json_text
    from eda.core import codec, envelope

    if raw and output.mode != "exec":
        return lambda ds: output.data(b"".join([envelope.batch_payloads(d.batch) for d in ds]))

    if output.mode == "json":

        def json_lines(ds: list[Any]) -> None:
            out: list[str] = []
            for d in ds:
                seq = d.busseq
                if d.batch.kind == codec.ENVELOPE:  # may carry an edabusseq of another bus
                    out.extend(
                        json_text({**ev, BUS_SEQ: seq + i}) + "\n"
                        for i, ev in enumerate(envelope.batch_to_events(d.batch))
                    )
                    continue
                lines = envelope.batch_to_json_lines(d.batch).split("\n")
                out.extend(
                    [f'{line[:-1]},"{BUS_SEQ}":{seq + i}}}\n' for i, line in enumerate(lines[:-1])]
                )
            output.text("".join(out))

        return json_lines

    def items(ds: list[Any]) -> None:
        output.items(
            {**ev, BUS_SEQ: d.busseq + i}
            for d in ds
            for i, ev in enumerate(envelope.batch_to_events(d.batch))
        )

    return items


BUS_SEQ = BUS_SEQUENCE  # the attribute eda-sub --bus adds: the event's sequence on the bus

# what --format may name: the event's attributes, {topic} (= {type}) and {ext[NAME]}
FORMAT_FIELDS = frozenset({"topic", "ext"})


class _Loop:
    """Receive, drop copies, count, render; report malformed input at most once a second."""

    def __init__(
        self, sub: Any, render: Callable[[list[Batch]], None], recent: RecentEvents, ctx: Context
    ) -> None:
        self.sub = sub
        self.render = render
        self.recent = recent
        self.ctx = ctx
        self.reported_malformed = 0
        self.reported_copies = 0
        self.reported_evicted = 0
        self.reported_unaccounted = 0
        self.give_up: Callable[[], bool] = lambda: False  # nothing more can come: exit 1

    def run(
        self, count: int | None, idle_timeout: float | None, strict: bool, lost: list[int]
    ) -> None:
        """Until *count* events are out, *idle_timeout* passed without one, or a loss with
        *strict*."""
        from eda.core import codec

        remaining = count
        # the idle clock restarts once output is written: time blocked on a slow
        # reader is not time without events
        idle_since = time.monotonic()
        try:
            while True:
                fresh = self._next(idle_since, idle_timeout)
                if fresh is None:
                    self.ctx.warn(
                        f"no event for {idle_timeout:g} s (-W/--timeout): exiting with status 4"
                    )
                    raise Exit(ExitStatus.TIMEOUT)
                if fresh:
                    if remaining is not None:
                        fresh, remaining = codec.take(fresh, remaining)
                    self.render(fresh)
                    idle_since = time.monotonic()
                self._report()
                if strict and lost[0]:
                    raise Exit(ExitStatus.LOSS)
                if self.give_up():
                    raise Exit(ExitStatus.ERROR)
                if remaining == 0:
                    return
        finally:
            self._report(final=True)

    def _next(self, idle_since: float, idle_timeout: float | None) -> list[Batch] | None:
        """New events, after blocking until a message arrives; None once idle too long."""
        if idle_timeout is None:
            self.sub.poll(None)
            return self._fresh()
        left = idle_since + idle_timeout - time.monotonic()
        if left > 0 and self.sub.poll(left):
            return self._fresh()
        if self.give_up():
            raise Exit(ExitStatus.ERROR)
        # out of time: what is already queued still counts (and restarts the clock)
        return self._fresh() or None

    def _fresh(self) -> list[Batch]:
        """The events waiting now, without copies of events delivered before."""
        return [piece for batch in self.sub.receive() for piece in self.recent.fresh(batch)]

    def _report(self, final: bool = False) -> None:
        malformed = self.sub.malformed - self.reported_malformed
        if malformed and (final or self.ctx.due("malformed")):
            self.ctx.warn(f"ignored {malformed} malformed message(s)")
            self.reported_malformed = self.sub.malformed
        copies = self.recent.dropped - self.reported_copies
        if copies and self.ctx.verbose and (final or self.ctx.due("copies")):
            self.ctx.debug(f"dropped {copies} event(s) delivered before (a loop or a copy)")
            self.reported_copies = self.recent.dropped
        evicted = getattr(self.sub, "evicted", 0) - self.reported_evicted
        if evicted and self.ctx.verbose and (final or self.ctx.due("evicted")):
            self.ctx.debug(f"forgot {evicted} publisher id(s) or stream(s) (per-peer bound)")
            self.reported_evicted += evicted
        unknown = getattr(self.sub, "unaccounted", 0) - self.reported_unaccounted
        if unknown and (final or self.ctx.due("unaccounted")):
            self.ctx.warn(
                f"warning: cannot tell whether {unknown} event(s) arrived: their streams"
                " were forgotten (more publishers and topics than a subscriber follows)"
            )
            self.reported_unaccounted += unknown


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
    return {**event, "topic": event.get("type", ""), "data": data_text(event), "ext": ext}


def _terminal_line(event: dict[str, Any]) -> Text:
    from rich.text import Text

    from eda.core.envelope import data_text

    line = Text()
    line.append(for_terminal(str(event.get("time", ""))[11:23]), style="dim")
    line.append(" ")
    line.append(for_terminal(event.get("type", "")), style="bold cyan")
    line.append(" ")
    if "data_base64" in event:
        line.append("(base64) ", style="dim")
    line.append(for_terminal(data_text(event)))
    return line


def _batch_renderer(raw: bool, output: Output) -> Callable[[list[Batch]], None]:
    """How batches reach stdout: the fast paths (--raw, JSON Lines) work per batch."""
    from eda.core import envelope

    if raw and output.mode != "exec":
        return lambda batches: output.data(b"".join([envelope.batch_payloads(b) for b in batches]))
    if output.mode == "json":
        return lambda batches: output.text(
            "".join([envelope.batch_to_json_lines(b) for b in batches])
        )
    return lambda batches: output.items(ev for b in batches for ev in envelope.batch_to_events(b))


def main() -> None:
    run(command, "eda-sub")


if __name__ == "__main__":
    main()
