"""eda-registry lookup, list, services and deregister: one-shot questions to the registry.

What a deploy script or a shell loop runs; the group (cli/registry.py) imports this
module only when one of these subcommands runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eda.cli.common import Context, Registries, registry_access
from eda.cli.options import (
    SecureMode,
    common_options,
    registries_option,
    registry_option,
    security_options,
)
from eda.cli.output import Output
from eda.cli.registry import fields_options
from eda.cli.registryviews import (
    INSTANCE_FIELDS,
    INSTANCES_TABLE,
    SERVICE_FIELDS,
    SERVICES_TABLE,
    instance_output,
    passing,
    print_instances,
)
from eda.cli.watch import watch_options
from eda.core.errors import NotFoundError

if TYPE_CHECKING:
    from eda.core.registry.access import Access


# -- lookup / list -----------------------------------------------------------------------
def _query(
    op: str, name: str | None, include_all: bool, registry: Registries, ctx: Context
) -> list[dict[str, Any]]:
    from eda.core.registry.access import query

    found = _ask(lambda access: query(op, name, include_all, access), registry, ctx)
    return [i.to_dict() for i in found]


T = TypeVar("T")


def _ask(fetch: Callable[[Access], list[T]], registry: Registries, ctx: Context) -> list[T]:
    """*fetch* from the registry (or the LAN), saying what was left out or is down."""
    from eda.core.registry.fetching import fetched

    access = registry_access(registry, ctx)
    return fetched(fetch, access, ctx.warn)


@click.command(
    epilog="""\b
Examples:
  eda-registry lookup orders                         passing instances (JSON Lines when piped)
  eda-registry lookup orders --all                   every instance with its health status
  curl "http://$(eda-registry lookup orders --format '{host}:{port}' | head -1)/"
"""
)
@click.argument("name")
@click.option("--all", "include_all", is_flag=True, help="Every instance, whatever its health.")
@registry_option
@fields_options("{host}:{port}", INSTANCE_FIELDS)
@security_options
@common_options
def lookup(
    name: str,
    include_all: bool,
    registry: Registries,
    template: str | None,
    force_json: bool,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Print the passing instances of service NAME; exit 3 if there is none.

    With --secure, each record's key is the one its registrant proved (what a
    client connecting to the instance pins); in serverless mode only instances
    announcing a trusted key are shown (-v says which were not).
    """
    from eda.core.registry.model import validate_name

    secure.apply()
    service = validate_name(name)
    out = instance_output(ctx, template, force_json)
    found = _query("lookup", service, include_all, registry, ctx)
    if not found:
        what = "instance" if include_all else "passing instance"
        raise NotFoundError(f"no {what} of service {service!r}")
    print_instances(found, out)


@click.command(
    "list",
    epilog="""\b
Examples:
  eda-registry list                              every service and instance (a table on a tty)
  eda-registry list orders --json | jq -r .status
  eda-registry list --watch                      live: instances and their health
""",
)
@click.argument("name", required=False)
@registry_option
@fields_options("{service} {address} {status}", INSTANCE_FIELDS)
@watch_options
@security_options
@common_options
def list_(
    name: str | None,
    registry: Registries,
    template: str | None,
    force_json: bool,
    watch: bool,
    interval: float,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Print every registered instance (of service NAME if given), whatever its health."""
    from eda.core.registry.model import validate_name

    secure.apply()
    service = validate_name(name) if name is not None else None
    out = instance_output(ctx, template, force_json)

    def found() -> list[dict[str, Any]]:
        return _query("list", service, True, registry, ctx)

    if watch:
        from eda.cli.watch import watch as follow

        follow(out, found, lambda rows: [(rows, INSTANCES_TABLE)], key=lambda r: r.get("id"),
               interval=interval, title="eda-registry list", summary=passing)  # fmt: skip
        return
    print_instances(found(), out)


@click.command(
    epilog="""\b
Examples:
  eda-registry services                          a table of services on a terminal
  eda-registry services --format '{service} {passing}/{instances}'
  eda-registry services | jq -r 'select(.passing < .instances) | .service'
""",
)
@registry_option
@fields_options("{service} {passing}/{instances}", SERVICE_FIELDS)
@security_options
@common_options
def services(
    registry: Registries,
    template: str | None,
    force_json: bool,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Print every service name with its instance counts (passing of all registered)."""
    from eda.core.registry.access import services as fetch

    secure.apply()
    out = Output(ctx, template=template, fields=SERVICE_FIELDS, force_json=force_json)
    found = _ask(fetch, registry, ctx)
    out.table(found, SERVICES_TABLE)


@click.command(
    epilog="""\b
Examples:
  eda-registry deregister orders-10-0-0-5-8080    remove a stuck instance
  eda-registry list orders --format '{id} {status}'   find its id first
""",
)
@click.argument("inst_id", metavar="ID")
@registries_option
@security_options
@common_options
def deregister(
    inst_id: str,
    registry: Registries,
    secure: SecureMode,
    ctx: Context,
) -> None:
    """Remove instance ID from the registry at once; exit 3 if there is no such instance.

    An operator's fix for a stuck entry.  An instance whose owner still
    heartbeats is registered again by its next heartbeat: stop the owner first.
    With --secure, only the key that registered the instance may remove it
    (--key FILE: the registrant's key); any other is refused, exit 1.
    """
    from eda.core.registry.access import deregister as remove
    from eda.core.registry.model import validate_id

    secure.apply()
    inst_id = validate_id(inst_id)
    remove(inst_id, registry_access(registry, ctx))
    ctx.debug(f"deregistered {inst_id}")
