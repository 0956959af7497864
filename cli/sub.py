"""eda-sub: print (or act on) the events matching one or more topic patterns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import (
    EXIT_LOSS,
    EXIT_TIMEOUT,
    Context,
    Exit,
    Template,
    common_options,
    output_options,
    run,
    write_stdout,
)
from eda.core.errors import UsageError

if TYPE_CHECKING:
    from eda.core.codec import Batch

EPILOG = """\b
Examples:
  eda-sub 'orders.>' > orders.jsonl              every orders event, as JSON Lines
  eda-sub 'orders.*' -C 10 -W 5 --raw | jq .id   ten payloads, or give up after 5 idle seconds
  eda-sub 'logs.>' --format '{time} {topic} {data}'
  eda-sub 'jobs.*' --exec ./handle.sh            run a command per event (event on its stdin)
  eda-sub --no-mdns --connect tcp://10.0.0.5:5555 'metrics.>'
"""


@click.command(epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("patterns", nargs=-1, required=True)
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
    help="Exit 4 after SECONDS without an event.",
)
@click.option("--raw", is_flag=True, help="Print the payload only, one per line.")
@output_options
@click.option("--strict", is_flag=True, help="Exit 5 as soon as events are lost.")
@click.option(
    "--exec",
    "exec_cmd",
    metavar="CMD",
    help="Run CMD per event, event JSON on its stdin, EDA_TOPIC/EDA_ID set.",
)
@click.option(
    "--hwm",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    help="High-water mark: batches queued before dropping.",
)
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
    if sum([raw, bool(template), force_json]) > 1:
        raise UsageError("choose one of --raw, --json and --format")
    if no_mdns and not (connects or binds):
        raise UsageError("with --no-mdns, give --connect or --bind")

    from eda.core import discovery
    from eda.core.pubsub import Subscriber

    lost = [0]

    def on_loss(source: str, topic: str, n: int) -> None:
        lost[0] += n
        ctx.warn(f"lost {n} events from {source} (topic {topic})")

    iface = discovery.resolve_interface(interface)
    sub = Subscriber(
        list(patterns),
        interface=iface,
        hwm=hwm,
        on_loss=on_loss,
        on_connect=lambda peer: ctx.debug(f"connected to publisher {peer.id} at {peer.endpoint}"),
        on_unreachable=lambda endpoint, refused: ctx.warn(
            f"warning: --connect {endpoint}: {'connection refused' if refused else 'no answer'}"
            " so far; still trying"
        ),
    )
    render = _renderer(raw, template, force_json, exec_cmd)
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
        _loop(sub, render, count, idle_timeout, strict, lost, ctx)
    finally:
        sub.close()


Render = Callable[["Batch"], bytes]


def _loop(
    sub: Any,
    render: Render,
    count: int | None,
    idle_timeout: float | None,
    strict: bool,
    lost: list[int],
    ctx: Context,
) -> None:
    from eda.core import codec

    remaining = count
    last_event = time.monotonic()
    malformed = 0
    while True:
        wait = None if idle_timeout is None else last_event + idle_timeout - time.monotonic()
        if (wait is not None and wait <= 0) or not sub.poll(wait):
            raise Exit(EXIT_TIMEOUT)
        batches = sub.receive()
        if batches:
            last_event = time.monotonic()
            out = []
            for batch in batches:
                if remaining is not None:
                    if remaining == 0:
                        break
                    batch = codec.take([batch], remaining)[0][0]
                try:
                    out.append(render(batch))
                except (ValueError, RecursionError):  # a body unlike what its header says
                    sub.malformed += 1
                    continue
                if remaining is not None:
                    remaining -= batch.size
            write_stdout(b"".join(out))
        if sub.malformed != malformed:
            ctx.warn(f"ignored {sub.malformed - malformed} malformed message(s)")
            malformed = sub.malformed
        if strict and lost[0]:
            raise Exit(EXIT_LOSS)
        if remaining == 0:
            return


def _renderer(raw: bool, template: str | None, force_json: bool, exec_cmd: str | None) -> Render:
    """How one batch becomes bytes on stdout (the --exec and terminal views print themselves)."""
    from eda.core import codec, envelope

    if exec_cmd:
        return _exec_renderer(exec_cmd)
    if raw:

        def render_raw(batch: Batch) -> bytes:
            if batch.kind != codec.ENVELOPE:
                return batch.body + b"\n"
            texts = [envelope.data_text(ev) + "\n" for ev in envelope.batch_to_events(batch)]
            return "".join(texts).encode()

        return render_raw
    if template:
        fmt = Template(template)

        def render_template(batch: Batch) -> bytes:
            lines = [
                fmt.line({**ev, "topic": ev.get("type", ""), "data": envelope.data_text(ev)})
                for ev in envelope.batch_to_events(batch)
            ]
            return "".join(lines).encode()

        return render_template
    if force_json or not sys.stdout.isatty():
        return lambda batch: envelope.batch_to_json_lines(batch).encode()
    return _terminal_renderer()


def _terminal_renderer() -> Render:
    from rich.console import Console
    from rich.text import Text

    from eda.core import envelope

    console = Console(highlight=False)

    def render(batch: Batch) -> bytes:
        for ev in envelope.batch_to_events(batch):
            line = Text()
            line.append(str(ev.get("time", ""))[11:23], style="dim")
            line.append(" ")
            line.append(str(ev.get("type", "")), style="bold cyan")
            line.append(" ")
            line.append(envelope.data_text(ev))
            console.print(line, soft_wrap=True)
        return b""

    return render


def _exec_renderer(cmd: str) -> Render:
    from eda.core import envelope

    def render(batch: Batch) -> bytes:
        for ev in envelope.batch_to_events(batch):
            env = dict(os.environ, EDA_TOPIC=str(ev.get("type", "")), EDA_ID=str(ev.get("id", "")))
            line = json.dumps(ev, separators=(",", ":"), ensure_ascii=False) + "\n"
            result = subprocess.run(cmd, shell=True, input=line.encode(), env=env, check=False)
            if result.returncode:
                sys.stderr.write(
                    f"eda-sub: warning: --exec command exited {result.returncode}"
                    f" for event {ev.get('id')}\n"
                )
        return b""

    return render


def main() -> None:
    run(command, "eda-sub")


if __name__ == "__main__":
    main()
