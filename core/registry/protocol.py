"""The registry's wire protocol: JSON messages over ZeroMQ.

Requests go to the registry's ROUTER socket from a DEALER, one JSON object
per message: ``{"op": ..., "rid": ...}`` plus the operation's fields; the
reply echoes ``rid`` and carries ``ok`` (and ``error``/``code`` when false).
Operations: ``hello``, ``register``, ``heartbeat`` (carries the full record,
so a registry that lost its state re-learns it), ``deregister``, ``lookup``,
``list`` and ``snapshot``.

Changes stream from an XPUB socket: frames ``[b"ev.<service>.", event]``,
plus ``[b"tick", {"registry": id, "seq": n}]`` every tick and whenever a
subscriber joins, which tells a watcher (or a peer registry) that its
subscription is live and that the registry is still there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import EdaError, NotFoundError, UsageError
from .model import Instance, InvalidRecord, from_dict, validate_name

REGISTRY_TYPE = "_eda-registry._tcp.local."
MAX_MESSAGE = 65536
EVENTS = b"ev."
TICK = b"tick"
OPS = ("hello", "register", "heartbeat", "deregister", "lookup", "list", "snapshot")


class ProtocolError(UsageError):
    """A message on the registry socket is not a valid request."""


class RemoteError(EdaError):
    """The registry refused a request; ``exit_code`` follows the registry's code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code if code in (1, 2, 3) else 1


def event_topic(service: str) -> bytes:
    return EVENTS + service.encode() + b"."


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def decode(frame: bytes) -> dict[str, Any]:
    """A request or reply object; :class:`ProtocolError` when it is not one."""
    try:
        msg = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("malformed request: not JSON") from None
    except RecursionError:  # e.g. 64 KiB of '[': the decoder recurses per level
        raise ProtocolError("malformed request: JSON nested too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed request: not a JSON object")
    return msg


def decode_request(frame: bytes) -> dict[str, Any]:
    msg = decode(frame)
    op = msg.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown operation {str(op)[:40]!r}")
    return msg


MAX_RID = 2**63 - 1
MAX_RID_TEXT = 64


@dataclass(frozen=True)
class Request:
    """One request, validated: every field typed and within its limits."""

    op: str
    rid: int | str | None = None
    instance: Instance | None = None  # register, heartbeat
    id: str = ""  # deregister
    service: str | None = None  # lookup (required), list and snapshot (optional)
    all: bool = False  # lookup: every instance, not only passing ones
    owned: bool = False  # snapshot: only the instances this registry owns


def request_id(msg: dict[str, Any]) -> int | str | None:
    """The request's ``rid`` if it is one a reply can safely echo, else None."""
    rid = msg.get("rid")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) and 0 <= rid <= MAX_RID:
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_RID_TEXT and rid.isprintable():
        return rid
    return None


def _flag(msg: dict[str, Any], key: str) -> bool:
    value = msg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"malformed request: {key!r} must be true or false")
    return value


def parse_request(frame: bytes) -> Request:
    """Decode and validate *frame* once, at the edge.

    :class:`ProtocolError` for anything that is not a well-formed request
    (counted as malformed), :class:`~.model.InvalidRecord` for a well-formed
    request whose record is refused (the client's mistake, answered as such).
    """
    return request_from(decode_request(frame))


def request_from(msg: dict[str, Any]) -> Request:
    """The typed request in *msg* (a JSON object with a known ``op``); see :func:`parse_request`."""
    if msg.get("rid") is not None and request_id(msg) is None:
        raise ProtocolError("malformed request: rid must be a small integer or short string")
    op = str(msg["op"])
    safe_rid = request_id(msg)
    if op in ("register", "heartbeat"):
        if not isinstance(msg.get("instance"), dict):
            raise ProtocolError(f"malformed request: {op} needs an instance object")
        return Request(op, safe_rid, instance=from_dict(msg["instance"]))
    if op == "deregister":
        inst_id = msg.get("id")
        if not isinstance(inst_id, str) or not 0 < len(inst_id) <= 63:
            raise InvalidRecord("deregister needs an instance id")
        return Request(op, safe_rid, id=inst_id)
    service = msg.get("service")
    if op == "lookup" or service is not None:
        service = validate_name(service)
    return Request(op, safe_rid, service=service, all=_flag(msg, "all"), owned=_flag(msg, "owned"))


def error_reply(rid: int | str | None, exc: Exception) -> dict[str, Any]:
    code = exc.exit_code if isinstance(exc, EdaError) else 1
    return {"rid": rid, "ok": False, "error": str(exc), "code": code}


def printable(text: str, limit: int = 300) -> str:
    """*text* cut to *limit* characters, control characters escaped (it came from a peer)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """*reply* when it says ok, else the matching exception."""
    if reply.get("ok"):
        return reply
    code = reply.get("code", 1)
    error = reply.get("error")
    message = printable(error if isinstance(error, str) else "request refused")
    if code == 3:
        raise NotFoundError(message)
    raise RemoteError(message, code if isinstance(code, int) else 1)
