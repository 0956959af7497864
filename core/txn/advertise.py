"""Who a coordinator or participant is to others: its default name and the endpoint
it is reached at (what it announces, and what ``eda-txn`` prints on start)."""

from __future__ import annotations

import re
import socket

from ..endpoint import Endpoint

WILDCARDS = ("0.0.0.0", "*")


def default_name() -> str:
    """This host's short name, as a coordinator name (letters, digits and ``-``)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]).strip("-")
    return (name or "coordinator")[:50]


def advertised(bound: str, registered_host: str | None, interface: str | None) -> str:
    """The endpoint others reach a daemon bound to *bound* at: *bound* itself unless it
    is a wildcard, else the host it was registered with, else *interface*, else loopback."""
    endpoint = Endpoint.parse(bound, "bound")
    if endpoint.host not in WILDCARDS:
        return bound
    return endpoint.with_host(registered_host or interface or "127.0.0.1").zmq
