"""eda-registry: the registry center, registration with health checks, lookups and watches.

The group and what its subcommands share; each subcommand lives with those of
its kind and is imported only when it runs (:class:`~eda.cli.lazygroup.LazyGroup`):
``registryserve.py`` (serve, register), ``registryquery.py`` (lookup, list,
services, deregister), ``registrywatch.py`` (watch, browse).  How what they find
prints is in ``registryviews.py``, the logic in ``eda.core.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eda.cli.common import run
from eda.cli.options import output_options, program_group

EPILOG_GROUP = """\b
Examples:
  eda-registry serve --data /var/lib/eda/registry --dns 127.0.0.1:8600
  eda-registry register orders --port 8080 --meta version=2 --check tcp
  eda-registry register web --port 8000 -- python3 -m http.server 8000
  eda-registry lookup orders --format '{host}:{port}'
  eda-registry services
  eda-registry watch orders --exec ./reload.sh
  eda-registry browse _http._tcp
  eda-registry lookup orders --secure --registry reg@tcp://10.0.0.5:7700
"""


def fields_options(example: str, fields: tuple[str, ...]) -> Callable[[Any], Any]:
    """--format (with this command's own fields) and --json."""
    return output_options(
        f"Print one line per item from a template, e.g. {example!r}. "
        f"Fields: {', '.join(fields)}; {{meta}} is JSON, {{meta[KEY]}} one value."
    )


def local_interface(interface: str | None) -> str | None:
    from eda.core.registry.access import resolve_interface

    return resolve_interface(interface)


SUBCOMMANDS = {
    "serve": "eda.cli.registryserve:serve",
    "register": "eda.cli.registryserve:register",
    "lookup": "eda.cli.registryquery:lookup",
    "list": "eda.cli.registryquery:list_",
    "services": "eda.cli.registryquery:services",
    "deregister": "eda.cli.registryquery:deregister",
    "watch": "eda.cli.registrywatch:watch",
    "browse": "eda.cli.registrywatch:browse",
}


@program_group(SUBCOMMANDS, EPILOG_GROUP, options=False)
def command() -> None:
    """Service registration and discovery for a LAN.

    A registry (`serve`) keeps who runs where; services `register` and
    heartbeat; clients `lookup`, `list` and `watch`.  Registries are found by
    mDNS and replicate with each other.  Without any registry, `register`,
    `lookup` and `watch` work by mDNS alone (serverless mode).
    """


def main() -> None:
    run(command, "eda-registry")


if __name__ == "__main__":
    main()
