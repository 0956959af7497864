"""eda-registry watch and browse: streams of changes, of mDNS announcements.

The group (cli/registry.py) imports this module only when one of them runs.
"""

from __future__ import annotations

import time

import click

from eda.cli.common import Context, Exit, Registries, registry_access
from eda.cli.options import (
    SecureMode,
    common_options,
    number_option,
    registry_option,
    seconds_option,
    security_options,
)
from eda.cli.output import Output
from eda.cli.registry import fields_options, local_interface
from eda.cli.registryviews import (
    BROWSE_FIELDS,
    EVENT_FIELDS,
    browse_fields,
    browse_line,
    event_output,
)
from eda.core.errors import UsageError


# -- watch -----------------------------------------------------------------------------------
@click.command(
    epilog="""\b
Examples:
  eda-registry watch orders                          one JSON line per change
  eda-registry watch orders --exec ./reload.sh       run a command per change (event on stdin)
  eda-registry watch --snapshot -C 1                 current instances first, then changes
"""
)
@click.argument("name", required=False)
@click.option(
    "--exec",
    "exec_cmd",
    metavar="CMD",
    help="Run CMD per change, the event JSON on its stdin, EDA_EVENT/EDA_SERVICE set.",
)
@click.option(
    "--snapshot",
    is_flag=True,
    help="First print each current instance (type 'present', snapshot: true).",
)
@number_option("-C", "--count", type=click.IntRange(1), help="Exit 0 after N events.")
@registry_option
@fields_options("{time} {type} {service} {address}", EVENT_FIELDS)
@security_options
@common_options
def watch(
    name: str | None,
    exec_cmd: str | None,
    snapshot: bool,
    count: int | None,
    registry: Registries,
    template: str | None,
    force_json: bool,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Print a line per change (registered, deregistered, expired, health, updated).

    Each event has a stable id (INSTANCE@REVISION), the reason and the full
    instance record.  The watch survives registry restarts and fails over to
    another registry; changes missed meanwhile are reported once, marked
    "resync": true, and nothing already reported is repeated.
    """
    from eda.core.registry.access import changes

    secure.apply()
    out = event_output(ctx, exec_cmd, template, force_json)
    access = registry_access(registry, ctx)
    events = changes(name, access, snapshot=snapshot, warn=ctx.warn)
    try:
        for seen, event in enumerate(events, 1):
            out.items([event])
            if count is not None and seen >= count:
                break
    finally:
        events.close()
    raise Exit(out.finish())


# -- browse -----------------------------------------------------------------------------------
@click.command(
    epilog="""\b
Examples:
  eda-registry browse _http._tcp                     web servers on the LAN, as they come and go
  eda-registry browse _eda-svc._tcp --duration 2     eda instances announced in serverless mode
"""
)
@click.argument("service_type", metavar="TYPE")
@seconds_option("--duration", help="Stop (exit 0) after SECONDS.")
@number_option("-C", "--count", type=click.IntRange(1), help="Exit 0 after N items.")
@fields_options("{event} {name} {address}", BROWSE_FIELDS)
@common_options
def browse(
    service_type: str,
    duration: float | None,
    count: int | None,
    template: str | None,
    force_json: bool,
    ctx: Context,
) -> None:
    """Browse any DNS-SD service TYPE by mDNS, like avahi-browse -r (TYPE: _http._tcp...)."""
    from eda.core.registry.browse import browse as browse_lan
    from eda.core.registry.browse import full_type

    if ctx.no_mdns:
        raise UsageError("browse needs mDNS; drop --no-mdns")
    full_type(service_type)
    deadline = None if duration is None else time.monotonic() + duration
    seen = 0
    out = Output(
        ctx,
        template=template,
        fields=BROWSE_FIELDS,
        force_json=force_json,
        template_fields=browse_fields,
        terminal=browse_line,
    )
    for item in browse_lan(service_type, local_interface(ctx.interface)):
        if item is not None:
            out.items([item])
            seen += 1
            if count is not None and seen >= count:
                return
        if deadline is not None and time.monotonic() >= deadline:
            return
