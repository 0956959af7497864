"""eda-pub: publish events from arguments or stdin lines."""

from __future__ import annotations

import json
import os
import select
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import EXIT_ERROR, EXIT_TIMEOUT, Context, Exit, common_options, run
from eda.core.errors import InputError, UsageError
from eda.core.topics import validate_topic

if TYPE_CHECKING:
    from eda.core.pubsub import Publisher

CHUNK = 1 << 17
ANNOUNCE_AFTER = 0.5  # a feed still running after this long announces itself

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
    headers: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key.isalnum() or not key.isascii():
            raise click.BadParameter(f"{item!r}: use KEY=VALUE with an alphanumeric KEY")
        if key in ("specversion", "id", "source", "type", "time", "datacontenttype", "data"):
            raise click.BadParameter(f"{key!r} is a CloudEvents core attribute")
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
    help="Connect to a subscriber that binds (repeatable).",
)
@click.option(
    "--wait-subscribers",
    type=click.IntRange(0),
    default=0,
    metavar="N",
    help="Wait until N subscribers are connected before sending.",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(0),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait for subscribers to connect.",
)
@click.option(
    "--discover-timeout",
    type=click.FloatRange(0),
    default=0.15,
    show_default=True,
    metavar="SECONDS",
    help="How long to listen for subscribers answering the mDNS query.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="N",
    help="At most N events per second.",
)
@click.option("--progress", is_flag=True, help="Progress bar on stderr when stdin is a file.")
@click.option(
    "--linger",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait on exit for queued events to leave.",
)
@click.option(
    "--hwm",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    help="High-water mark: batches queued per subscriber before dropping.",
)
@click.option(
    "--block",
    is_flag=True,
    help="Block at the high-water mark instead of dropping (slow subscribers slow the feed).",
)
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
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Publish events on TOPIC: each MESSAGE is one event, or each stdin line.

    Brokerless: running subscribers on the LAN are found by mDNS and this
    publisher connects to them and waits until they are ready, so the first
    event reaches them.  A feed that runs longer than half a second also
    announces itself, so subscribers started later find it.
    """
    ctx = Context("eda-pub", verbose)
    if topic is not None:
        validate_topic(topic)
    elif not envelope:
        raise UsageError("missing TOPIC (only --envelope takes the topic from each line)")
    if envelope and json_mode:
        raise UsageError("--envelope and --json exclude each other")
    if messages and (whole or progress):
        raise UsageError("--whole and --progress read stdin; do not give MESSAGE arguments")

    from eda.core import codec, discovery
    from eda.core.pubsub import Publisher

    iface = discovery.resolve_interface(interface)
    pub = Publisher(headers=headers, interface=iface, hwm=hwm, block=block)
    rejected = 0
    try:
        for endpoint in binds:
            ctx.debug(f"listening on {pub.bind(endpoint)}")
        for endpoint in connects:
            pub.connect(endpoint)
        expected: set[str] = set()
        if not no_mdns:
            expected = pub.connect_subscribers(discover_timeout)
            ctx.debug(f"found {len(expected)} subscriber(s) by mDNS")
        want = max(wait_subscribers, len(connects))
        missing = pub.wait_for(expected, want, wait_seconds)
        short = len(pub.subscribers) < wait_subscribers
        if missing or short:
            ctx.warn(f"only {len(pub.subscribers)} subscriber(s) ready after {wait_seconds:g}s")
        kind = codec.JSON if json_mode else codec.TEXT
        if messages:
            rejected = _send_arguments(pub, ctx, validate_topic(topic or ""), messages, kind)
        elif whole:
            body = sys.stdin.buffer.read()
            if json_mode and not _valid_json(body):
                ctx.warn("error: stdin is not valid JSON; nothing sent")
                rejected = 1
            elif body or not json_mode:
                pub.send(topic or "", body, 1, kind)
        else:
            feeder = _Feeder(pub, ctx, topic, kind, envelope, rate, no_mdns)
            feeder.run(progress)
            rejected = feeder.rejected
        ctx.debug(f"sent {pub.total_sent} event(s)")
    finally:
        pub.close(linger)
    if rejected:
        ctx.warn(f"error: {rejected} input(s) rejected")
        raise Exit(EXIT_ERROR)
    if (missing or short) and wait_subscribers:
        raise Exit(EXIT_TIMEOUT)


def _valid_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def _send_arguments(
    pub: Publisher, ctx: Context, topic: str, messages: tuple[str, ...], kind: int
) -> int:
    rejected = 0
    good: list[bytes] = []
    for number, message in enumerate(messages, 1):
        raw = message.encode(errors="surrogateescape")
        if kind == 1 and not _valid_json(raw):
            ctx.warn(f"error: argument {number}: invalid JSON, skipped")
            rejected += 1
            continue
        if kind == 1:
            raw = json.dumps(json.loads(raw), separators=(",", ":")).encode()
        good.append(raw)
    if any(b"\n" in m for m in good):
        for m in good:
            pub.send(topic, m, 1, kind)
    elif good:
        pub.send(topic, b"\n".join(good), len(good), kind)
    return rejected


class _Feeder:
    """Reads stdin in large chunks and sends every complete line, batch by batch."""

    def __init__(
        self,
        pub: Publisher,
        ctx: Context,
        topic: str | None,
        kind: int,
        envelope: bool,
        rate: float | None,
        no_mdns: bool,
    ) -> None:
        self.pub = pub
        self.ctx = ctx
        self.topic = topic
        self.kind = kind
        self.envelope = envelope
        self.rate = rate
        self.no_mdns = no_mdns
        self.rejected = 0
        self.lineno = 0
        self._next_send = time.monotonic()
        self._announce_timer: threading.Timer | None = None

    def run(self, progress: bool) -> None:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
        bar: Any = None
        if progress and stat.S_ISREG(mode):
            bar = _progress_bar(os.fstat(fd).st_size)
        if not self.no_mdns:
            self._start_announcing()
        pending = b""
        try:
            while True:
                if not stat.S_ISREG(mode):
                    while not select.select([fd], [], [], 0.1)[0]:
                        self.pub.service()
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                if bar is not None:
                    bar.advance(len(chunk))
                data = pending + chunk if pending else chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                pending = data[cut + 1 :]
                self.lines(data[:cut])
                self.pub.service()
            if pending:
                self.lines(pending)
        finally:
            if bar is not None:
                bar.stop()
            if self._announce_timer is not None:
                self._announce_timer.cancel()

    def _start_announcing(self) -> None:
        self.pub.bind_for_announce()
        topics = [self.topic] if self.topic else []

        def ready() -> None:
            self.ctx.debug(f"announced as {self.pub.pubid} on mDNS")

        self._announce_timer = threading.Timer(
            ANNOUNCE_AFTER, self.pub.announce, args=(topics, ready)
        )
        self._announce_timer.daemon = True
        self._announce_timer.start()

    def lines(self, body: bytes) -> None:
        """Send the complete lines in *body* (no trailing newline)."""
        if self.envelope or self.kind != 0 or self.rate:
            self._checked_lines(body.split(b"\n"))
            return
        # fast path: plain text lines go out as they were read
        if b"\n\n" in body or body[:1] == b"\n" or body[-1:] == b"\n":
            parts = [line for line in body.split(b"\n") if line]
            if not parts:
                return
            body = b"\n".join(parts)
        elif not body:
            return
        self.pub.send(self.topic or "", body, body.count(b"\n") + 1)

    def _checked_lines(self, lines: list[bytes]) -> None:
        from eda.core.envelope import parse_envelope

        pub = self.pub
        good: list[bytes] = []
        current_topic = self.topic or ""
        for line in lines:
            self.lineno += 1
            if not line.strip():
                continue
            try:
                if self.envelope:
                    topic, raw = parse_envelope(
                        line, self.lineno, self.topic, pub.source, pub.next_envelope_id
                    )
                    if topic != current_topic and good:
                        self._send(current_topic, good)
                        good = []
                    current_topic = topic
                    good.append(raw)
                elif self.kind == 1:
                    try:
                        value = json.loads(line)
                    except ValueError as exc:
                        raise InputError(f"invalid JSON: {exc}", self.lineno) from None
                    good.append(json.dumps(value, separators=(",", ":")).encode())
                else:
                    good.append(line)
            except InputError as exc:
                self.rejected += 1
                self.ctx.warn(f"error: {exc}; skipped")
            if self.rate:
                self._send(current_topic, good)
                good = []
        if good:
            self._send(current_topic, good)

    def _send(self, topic: str, payloads: list[bytes]) -> None:
        if not payloads:
            return
        from eda.core import codec

        if self.rate:
            self._pace()
        kind = codec.ENVELOPE if self.envelope else self.kind
        self.pub.send(topic, b"\n".join(payloads), len(payloads), kind)

    def _pace(self) -> None:
        assert self.rate
        now = time.monotonic()
        if self._next_send > now:
            time.sleep(self._next_send - now)
        self._next_send = max(self._next_send, now) + 1.0 / self.rate


def _progress_bar(total: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("eda-pub", total=total)
    bar.start()

    class _Bar:
        def advance(self, n: int) -> None:
            bar.advance(task, n)

        def stop(self) -> None:
            bar.stop()

    return _Bar()


def main() -> None:
    run(command, "eda-pub")


if __name__ == "__main__":
    main()
