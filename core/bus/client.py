"""Clients of eda-bus: finding the bus, confirmed publishing, subscribing with credit.

One import for every client of the bus protocol, each written in the module
of its subject: :mod:`.link` (where the bus is, its socket, looking again when
it moved, one-shot requests), :mod:`.publisher` (confirmed publishing) and
:mod:`.subscriber` (subscriptions with credit, group members' max_pending).
"""

from __future__ import annotations

from .link import LOOK_AGAIN_AFTER, BusClient, ConfirmTimeout, NoBus, Relocate, find_bus, request
from .publisher import (
    RESEND_AFTER,
    WINDOW_BATCHES,
    WINDOW_BYTES,
    BusPublisher,
    Unconfirmed,
    struct_count,
    struct_seq,
)
from .subscriber import (
    CREDIT,
    GRANT_BYTES,
    GROUP_CREDIT,
    GROUP_PENDING,
    GROUP_PENDING_SLOW,
    BusSubscriber,
    Delivery,
)

__all__ = [
    "CREDIT",
    "GRANT_BYTES",
    "GROUP_CREDIT",
    "GROUP_PENDING",
    "GROUP_PENDING_SLOW",
    "LOOK_AGAIN_AFTER",
    "RESEND_AFTER",
    "WINDOW_BATCHES",
    "WINDOW_BYTES",
    "BusClient",
    "BusPublisher",
    "BusSubscriber",
    "ConfirmTimeout",
    "Delivery",
    "NoBus",
    "Relocate",
    "Unconfirmed",
    "find_bus",
    "request",
    "struct_count",
    "struct_seq",
]
