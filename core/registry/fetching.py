"""What a client asks of the registry, and what it says of the answer: records
left out as invalid, and a registry that is down (which must not pass for an
empty one: `eda-registry list` and `lookup` say so, and nothing found is an
error then, not "not found")."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .access import Access
from .client import RegistryUnavailable

T = TypeVar("T")


def fetched(
    fetch: Callable[[Access], list[T]], access: Access, warn: Callable[[str], None]
) -> list[T]:
    """*fetch(access)*, warning of what was left out or where the answer came from
    instead; RegistryUnavailable when the registry is down and the LAN has nothing."""
    found = fetch(access)
    if access.dropped:
        warn(f"warning: left out {access.dropped} invalid record(s) from the registry")
    if access.registry_down:
        if not found:
            raise RegistryUnavailable(
                f"{access.registry_down}, and nothing on the LAN answered by mDNS"
                " either; start the registry, or use --serverless to ask the LAN only"
            )
        warn(
            f"warning: {access.registry_down}; showing what the LAN announces by mDNS"
            " (serverless mode), which may be incomplete"
        )
    return found
