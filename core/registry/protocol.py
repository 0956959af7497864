"""The registry's wire protocol: JSON messages over ZeroMQ.

Requests go to the registry's ROUTER socket from a DEALER, one JSON object
per message: ``{"op": ..., "rid": ...}`` plus the operation's fields; the
reply echoes ``rid`` and carries ``ok`` (and ``error``/``code`` when false).
Operations: ``hello``, ``register``, ``heartbeat`` (carries the full record,
so a registry that lost its state re-learns it), ``deregister`` (``operator``: true when
an operator, not the owner, removes it), ``lookup``,
``list`` and ``snapshot``.

Changes stream from an XPUB socket: frames ``[b"ev.<service>.", event]``,
plus ``[b"tick", {"registry": id, "seq": n}]`` every tick and whenever a
subscriber joins, which tells a watcher (or a peer registry) that its
subscription is live and that the registry is still there.

The framing every eda daemon shares (JSON objects, ``rid``, error replies,
size limit) is :mod:`eda.core.reqrep`'s; this module adds the registry's
operations and validates each into a typed :class:`Request`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import reqrep
from ..errors import ProtocolError as ProtocolError
from ..reqrep import MAX_MESSAGE as MAX_MESSAGE
from ..reqrep import RemoteError as RemoteError
from ..reqrep import check_rid, request_id
from ..reqrep import decode as decode
from ..reqrep import encode as encode
from .model import MAX_TICK as MAX_TICK
from .model import Instance, InvalidRecord, Records, from_dict, validate_id, validate_name

REGISTRY_TYPE = "_eda-registry._tcp.local."
EVENTS = b"ev."
TICK = b"tick"
OPS = ("hello", "register", "heartbeat", "deregister", "lookup", "list", "snapshot")


def event_topic(service: str) -> bytes:
    return EVENTS + service.encode() + b"."


def decode_request(frame: bytes) -> dict[str, Any]:
    """*frame* as a JSON object naming one of the registry's :data:`OPS`."""
    return reqrep.decode_request(frame, OPS)


@dataclass(frozen=True)
class Request:
    """One request, validated: every field typed and within its limits."""

    op: str
    rid: int | str | None = None
    instance: Instance | None = None  # register, heartbeat
    sent: tuple[str, float] | None = None  # heartbeat: the registrant's clock (.lateness)
    id: str = ""  # deregister
    service: str | None = None  # lookup (required), list and snapshot (optional)
    all: bool = False  # lookup: every instance, not only passing ones
    owned: bool = False  # snapshot: only the instances this registry owns
    operator: bool = False  # deregister: by an operator, not by the instance's owner


def _flag(msg: dict[str, Any], key: str) -> bool:
    value = msg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"malformed request: {key!r} must be true or false")
    return value


def _sent(msg: dict[str, Any]) -> tuple[str, float] | None:
    """A heartbeat's ``sent``: {"clock": name (1-64 characters), "at": seconds}, or none."""
    sent = msg.get("sent")
    if sent is None:
        return None
    clock, at = (sent.get("clock"), sent.get("at")) if isinstance(sent, dict) else (None, None)
    if (
        not isinstance(clock, str)
        or not 0 < len(clock) <= 64
        or isinstance(at, bool)
        or not isinstance(at, int | float)
        or not math.isfinite(at)
    ):
        raise ProtocolError("malformed request: 'sent' must be {clock: name, at: seconds}")
    return clock, float(at)


def parse_request(frame: bytes) -> Request:
    """Decode and validate *frame* once, at the edge.

    :class:`ProtocolError` for anything that is not a well-formed request
    (counted as malformed), :class:`~.model.InvalidRecord` for a well-formed
    request whose record is refused (the client's mistake, answered as such).
    """
    return request_from(decode_request(frame))


def request_from(msg: dict[str, Any], records: Records | None = None) -> Request:
    """The typed request in *msg* (a JSON object with a known ``op``); see :func:`parse_request`.

    *records* validates the record a registration or heartbeat carries (the
    daemon's, which remembers what it validated: :class:`~.model.Records`)."""
    check_rid(msg)
    op = str(msg["op"])
    safe_rid = request_id(msg)
    if op in ("register", "heartbeat"):
        record = msg.get("instance")
        if not isinstance(record, dict):
            raise ProtocolError(f"malformed request: {op} needs an instance object")
        inst = from_dict(record) if records is None else records.from_dict(record)
        return Request(op, safe_rid, instance=inst, sent=_sent(msg))
    if op == "deregister":
        if "id" not in msg:
            raise InvalidRecord("deregister needs an instance id")
        inst_id = validate_id(msg["id"])
        return Request(op, safe_rid, id=inst_id, operator=_flag(msg, "operator"))
    service = msg.get("service")
    if op == "lookup" or service is not None:
        service = validate_name(service)
    return Request(op, safe_rid, service=service, all=_flag(msg, "all"), owned=_flag(msg, "owned"))
