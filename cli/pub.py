"""eda-pub: publish events from arguments or stdin lines."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eda.cli.busopt import AUTO, bus_endpoint, bus_option, split_bus
from eda.cli.common import Context, Exit, run
from eda.cli.options import (
    SECURE_ENDPOINT,
    SecureMode,
    common_options,
    hwm_option,
    number_option,
    seconds_option,
    security_options,
)
from eda.cli.output import for_terminal
from eda.cli.secure import secure_reports
from eda.core.errors import EdaError, ExitStatus, InputError, UsageError
from eda.core.topics import validate_topic

if TYPE_CHECKING:
    from eda.core.pubsub import Departure, Outcome

ANNOUNCE_AFTER = 0.5  # a feed still running after this long announces itself
BIND_GRACE = 0.5  # s: with --bind, how long subscribers get to connect before the first event

EPILOG = """\b
Examples:
  eda-pub orders.created '{"id": 7}' --json      one event
  tail -f app.log | eda-pub logs.app             one event per stdin line
  eda-sub 'orders.>' | eda-pub --envelope        re-publish events as printed by eda-sub
  eda-pub -H tenant=acme --wait-subscribers 2 jobs.new run   wait for two subscribers
"""


def _parse_header(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    from eda.core.attributes import check_extension

    headers: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key.isalnum() or not key.isascii():
            raise click.BadParameter(f"{item!r}: use KEY=VALUE with an alphanumeric KEY")
        try:  # the same rules as every event from the network
            check_extension(key, value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        headers[key] = value
    return headers


@click.command(epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("topic", required=False)
@click.argument("messages", nargs=-1)
@click.option(
    "--json", "json_mode", is_flag=True, help="Payloads must be JSON; invalid lines are skipped."
)
@click.option(
    "--envelope", is_flag=True, help="Input lines are CloudEvents as eda-sub prints them."
)
@click.option("-s", "--whole", is_flag=True, help="Send all of stdin as one event.")
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    callback=_parse_header,
    metavar="KEY=VALUE",
    help="Extension attribute added to every event (repeatable).",
)
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="ENDPOINT",
    help="Also listen here, e.g. tcp://*:5555 (repeatable).",
)
@click.option(
    "--connect",
    "connects",
    multiple=True,
    metavar="ENDPOINT",
    help=f"Connect to a subscriber that binds (repeatable; {SECURE_ENDPOINT}).",
)
@click.option(
    "--wait-subscribers",
    type=click.IntRange(0),
    default=0,
    metavar="N",
    help="Wait until N subscribers are connected before sending.",
)
@seconds_option(
    "--wait", "wait_seconds", type=click.FloatRange(0), default=2.0,
    help="Longest wait for subscribers to connect."
)
@seconds_option(
    "--discover-timeout", type=click.FloatRange(0), default=0.15,
    help="How long to listen for subscribers answering the mDNS query."
)
@number_option(
    "--rate", type=click.FloatRange(min=0, min_open=True), help="At most N events per second."
)
@click.option(
    "--progress",
    is_flag=True,
    help="Progress bar on stderr when stdin is a file and stderr a terminal: bytes read, "
    "events sent and, with --bus, confirmed.",
)
@seconds_option(
    "--linger", type=click.FloatRange(0), default=5.0,
    help="Longest wait on exit for every subscriber to confirm the end of the stream."
)
@hwm_option("High-water mark: batches queued per subscriber before dropping.")
@click.option(
    "--block",
    is_flag=True,
    help="Block at the high-water mark instead of dropping (slow subscribers slow the feed).",
)
@bus_option
@click.option(
    "--confirm",
    is_flag=True,
    help="With --bus: exit 0 only once the bus confirmed every event durable (4 on timeout).",
)
@seconds_option(
    "--timeout", "confirm_timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
    help="With --bus --confirm: give up after SECONDS without a confirmation."
)
@security_options
@common_options
def command(
    topic: str | None,
    messages: tuple[str, ...],
    json_mode: bool,
    envelope: bool,
    whole: bool,
    headers: dict[str, str],
    binds: tuple[str, ...],
    connects: tuple[str, ...],
    wait_subscribers: int,
    wait_seconds: float,
    discover_timeout: float,
    rate: float | None,
    progress: bool,
    linger: float,
    hwm: int,
    block: bool,
    bus: str | None,
    confirm: bool,
    confirm_timeout: float,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Publish events on TOPIC: each MESSAGE is one event, or each stdin line.

    Brokerless: running subscribers on the LAN are found by mDNS and this
    publisher connects to them and waits until they are ready, so the first
    event reaches them.  A feed that runs longer than half a second also
    announces itself, so subscribers started later find it.
    """
    interface, no_mdns = ctx.interface, ctx.no_mdns
    bus, rest = split_bus(bus, (topic, *messages) if topic is not None else ())
    topic, messages = (rest[0], rest[1:]) if rest else (None, ())
    if confirm and bus is None:
        bus = AUTO
    if topic is not None:
        validate_topic(topic)
    elif not envelope:
        raise UsageError("missing TOPIC (only --envelope takes the topic from each line)")
    if envelope and json_mode:
        raise UsageError("--envelope and --json exclude each other")
    if messages and (whole or progress):
        raise UsageError("--whole and --progress read stdin; do not give MESSAGE arguments")
    secure.apply()

    from eda.core import discovery

    whole_data = _whole_stdin() if whole else b""  # (refused before any network work)
    pending = None
    iface = None
    if bus is None:
        iface = discovery.resolve_interface(interface)
        if not no_mdns:
            # the question goes out now (or went out as the program started: cli/launch.py);
            # the answers and the settle for newcomers pass while pyzmq is imported
            pending = discovery.discover_soon(
                discovery.SUB_TYPE, interface=iface, timeout=discover_timeout
            )

    from eda.core import codec, feed
    from eda.core.pubsub import Publisher

    def reject(exc: InputError) -> None:
        ctx.warn(f"error: {exc}; skipped")

    if bus is not None:
        endpoint = bus_endpoint(bus, interface, no_mdns, ctx)
        kind = codec.JSON if json_mode else codec.TEXT
        _publish_to_bus(
            ctx, endpoint, topic, messages, kind, envelope, whole_data if whole else None,
            headers, rate, reject,
            confirm_timeout if confirm else linger, confirm,
            relocate=lambda: bus_endpoint(bus, interface, no_mdns), progress=progress,
        )  # fmt: skip
        return

    pub = Publisher(headers=headers, interface=iface, hwm=hwm, block=block)
    pub.on_subscriber = lambda subid: ctx.debug(f"subscriber {subid} ready")
    pub.on_gone = lambda gone: ctx.warn(f"warning: {_gone_text(gone)}")
    refusals = secure_reports(ctx, pub, "subscriber")
    rejected = 0
    failed = False  # some subscriber we knew of did not get (or confirm) everything
    said_nobody = False  # a warning already said that no subscriber is there
    outcome = None
    try:
        for endpoint in binds:
            ctx.debug(f"listening on {pub.bind(endpoint)}")
        for endpoint in connects:
            pub.connect(endpoint, watch=True)
        expected: set[str] = set()
        if pending is not None:
            expected = pub.connect_subscribers(
                discover_timeout, None if envelope and topic is None else topic, pending.result()
            )
            ctx.debug(f"found {len(expected)} subscriber(s) by mDNS")
        # a bound publisher cannot know who will connect: subscribers already retrying
        # a --connect to it (every 0.1 s) or starting now get a short grace period
        grace = min(BIND_GRACE, wait_seconds) if binds and not wait_subscribers else 0.0
        missing = pub.wait_for(
            expected, max(wait_subscribers, len(connects)), wait_seconds, at_least=grace
        )
        short = len(pub.subscribers) < wait_subscribers
        problems = [
            f"subscriber {for_terminal(subid)} (found by mDNS) not ready after"
            f" {wait_seconds:g}s; events sent before it is ready do not reach it"
            for subid in sorted(missing)
        ] + [
            f"subscriber {for_terminal(peer.id)} (found by mDNS) does not answer"
            f" at {for_terminal(peer.endpoint)}; events do not reach it"
            for peer in pub.unreachable
        ]
        _warn_some(ctx, problems, "subscriber(s) found by mDNS were not reached")
        failed = failed or bool(pub.unreachable)
        for endpoint, refused in pub.unready():
            why = "connection refused" if refused else "no answer"
            ctx.warn(
                f"warning: --connect {endpoint}: {why} after {wait_seconds:g}s;"
                " events sent before it answers do not reach it"
            )
            failed = True
        failed = failed or bool(missing)
        if short:
            ctx.warn(f"only {len(pub.subscribers)} subscriber(s) ready after {wait_seconds:g}s")
        if not pub.subscribers and pub.seen_before and not failed:
            ctx.warn(
                f"warning: no subscriber is listening, although {pub.seen_before} were seen"
                " before (they are gone)"
            )
        said_nobody = short or failed or bool(not pub.subscribers and pub.seen_before)
        kind = codec.JSON if json_mode else codec.TEXT
        if messages:
            raw = [m.encode(errors="surrogateescape") for m in messages]
            rejected = feed.send_arguments(pub, topic or "", raw, kind, reject)
        elif whole:
            rejected = feed.send_arguments(pub, topic or "", [whole_data], kind, reject)
        else:
            feeder = feed.Feeder(
                pub, topic, kind=kind, envelope=envelope, rate=rate, on_reject=reject
            )
            bar = None
            if progress:
                bar = _progress_bar(sys.stdin.fileno(), lambda: (pub.total_sent, None))
            try:
                feeder.run(
                    sys.stdin.fileno(),
                    on_read=bar.advance if bar else None,
                    announce_after=None if no_mdns else ANNOUNCE_AFTER,
                    on_announced=lambda: ctx.debug(f"announced as {pub.id} on mDNS"),
                )
                if bar is not None:
                    bar.advance(0)  # the last chunk's events
            finally:
                if bar is not None:
                    bar.stop()
            rejected = feeder.rejected
        ctx.debug(f"sent {pub.total_sent} event(s)")
        started = time.monotonic()
        outcome = pub.finish(linger)
        if pub.evicted:
            ctx.debug(f"forgot {pub.evicted} subscriber id(s) (per-peer bound)")
        linger = max(0.0, linger - (time.monotonic() - started))
    finally:
        pub.close(linger)
    if outcome is not None:
        _report(ctx, outcome)
        one_shot = bool(messages) or whole
        said_nobody = said_nobody or bool(refusals)  # each refusal was an error line
        if one_shot and pub.total_sent and not pub.ever_joined and not said_nobody:
            # publishing to nobody is not an error (as with MQTT), but never silent
            ctx.warn(
                f"warning: no subscriber was found or connected: the {pub.total_sent}"
                " event(s) reached nobody (--wait-subscribers N waits for N)"
            )
    if rejected:
        ctx.warn(f"error: {rejected} input(s) rejected")
        raise Exit(ExitStatus.ERROR)
    if refusals:
        raise Exit(ExitStatus.ERROR)  # (each refusal was reported as it happened)
    if outcome is not None and outcome.lost:
        raise Exit(ExitStatus.LOSS)
    if failed or (short and wait_subscribers) or (outcome is not None and not outcome.clean):
        raise Exit(ExitStatus.TIMEOUT)


def _publish_to_bus(
    ctx: Context,
    endpoint: str,
    topic: str | None,
    messages: tuple[str, ...],
    kind: int,
    envelope: bool,
    whole: bytes | None,
    headers: dict[str, str],
    rate: float | None,
    reject: Any,
    timeout: float,
    confirm: bool,
    relocate: Any = None,
    progress: bool = False,
) -> None:
    """Publish through eda-bus: batches pipelined, each kept until the bus confirms it."""
    from eda.core import feed
    from eda.core.bus.client import BusPublisher, ConfirmTimeout

    pub = BusPublisher(endpoint, headers=headers, timeout=timeout, relocate=relocate)
    ctx.debug(f"publishing to the bus at {endpoint} as {pub.pubid}")
    rejected = 0
    bar = None
    try:
        if messages:
            raw = [m.encode(errors="surrogateescape") for m in messages]
            rejected = feed.send_arguments(pub, topic or "", raw, kind, reject)  # type: ignore[arg-type]
        elif whole is not None:
            rejected = feed.send_arguments(pub, topic or "", [whole], kind, reject)  # type: ignore[arg-type]
        else:
            feeder = feed.Feeder(
                pub,  # type: ignore[arg-type]
                topic, kind=kind, envelope=envelope, rate=rate, on_reject=reject,
            )  # fmt: skip
            if progress:
                bar = _progress_bar(sys.stdin.fileno(), lambda: (pub.total_sent, pub.confirmed))
            feeder.run(sys.stdin.fileno(), on_read=bar.advance if bar else None)
            rejected = feeder.rejected
        pub.finish()
        if bar is not None:
            bar.advance(0)  # the confirmations that came in at the end
    except ConfirmTimeout as exc:
        if confirm:
            raise
        ctx.warn(f"warning: {exc}")
    finally:
        if bar is not None:
            bar.stop()
        pub.close()
    ctx.debug(f"{pub.confirmed} event(s) confirmed, {pub.resent} batch(es) sent again")
    _warn_some(ctx, _refusals(pub.refused), "refusal(s)", kind="error")
    if rejected:
        ctx.warn(f"error: {rejected} input(s) rejected")
    if rejected or pub.refused:
        raise Exit(ExitStatus.ERROR)


def _refusals(refused: list[tuple[Any, str]]) -> list[str]:
    """One line per reason the bus gave for refusing batches (an ACL refuses every batch
    of a topic: a long input must not print a line per batch)."""
    by_reason: dict[str, list[Any]] = {}
    for what, why in refused:
        by_reason.setdefault(why, []).append(what)
    lines = []
    for why, batches in by_reason.items():
        if len(batches) == 1:
            what = str(batches[0])
        else:
            topics = sorted({b.topic for b in batches})
            shown = ", ".join(topics[:3]) + (f" and {len(topics) - 3} more" * (len(topics) > 3))
            what = f"{len(batches)} batches ({sum(b.events for b in batches)} events) of {shown}"
        lines.append(f"the bus refused {what}: {for_terminal(why)}")
    return lines


SHOWN_PROBLEMS = 5  # forged announcements must not flood a one-shot command's stderr


def _warn_some(ctx: Context, problems: list[str], summary: str, kind: str = "warning") -> None:
    """The first few *problems* as warnings (or errors), then one line counting the rest."""
    for text in problems[:SHOWN_PROBLEMS]:
        ctx.warn(f"{kind}: {text}")
    if len(problems) > SHOWN_PROBLEMS:
        ctx.warn(f"{kind}: {len(problems) - SHOWN_PROBLEMS} more {summary} (see -v)")
        for text in problems[SHOWN_PROBLEMS:]:
            ctx.debug(f"{kind}: {text}")


def _whole_stdin() -> bytes:
    """All of stdin for -s; empty stdin is an error (there is no event to send)."""
    data = sys.stdin.buffer.read()
    if not data:
        raise EdaError("stdin is empty: -s/--whole has no event to send")
    return data


def _gone_text(gone: Departure) -> str:
    return (
        f"subscriber {gone.subid} is gone (connection lost, not back within"
        f" {gone.after:.0f}s): it missed the {gone.sent_after} event(s) sent since,"
        f" and any of the {gone.sent_before} before that still queued for it"
    )


def _report(ctx: Context, outcome: Outcome) -> None:
    """Say which subscribers lost events or did not confirm the end of the stream."""
    for subid, n in sorted(outcome.lost.items()):
        ctx.warn(f"warning: subscriber {subid} lost {n} event(s)")
    for subid, n in sorted(outcome.unconfirmed.items()):
        ctx.warn(
            f"warning: subscriber {subid} did not confirm receipt within the linger"
            f" (of {n} event(s) published since it joined, those it subscribes to may be lost)"
        )
    # (subscribers that went away were reported by on_gone as it happened)


def _progress_bar(fd: int, counts: Callable[[], tuple[int, int | None]]) -> Any:
    """A rich progress bar on a terminal stderr for a regular file on *fd*, else None.

    Beside the bytes read of the file, it shows the events sent and, through
    the bus, those it confirmed: *counts* returns both (None: no confirmations).
    """
    import stat

    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or not sys.stderr.isatty():
        return None  # (no progress into a pipe or a log: not even a blank line)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    def events() -> str:
        sent, confirmed = counts()
        return f"{sent} events sent" + ("" if confirmed is None else f", {confirmed} confirmed")

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(bar_width=20),  # (room for the counts on 80 columns)
        DownloadColumn(),
        TextColumn("{task.fields[events]}", markup=False),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("eda-pub", total=info.st_size, events=events())
    bar.start()

    class _Bar:
        def advance(self, n: int) -> None:
            bar.update(task, advance=n, events=events())

        def stop(self) -> None:
            bar.stop()

    return _Bar()


def main() -> None:
    run(command, "eda-pub")


if __name__ == "__main__":
    main()
