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
from typing import Any

from ..errors import EdaError, NotFoundError, UsageError

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
    if msg.get("op") not in OPS:
        raise ProtocolError(f"unknown operation {msg.get('op')!r}")
    return msg


def error_reply(rid: object, exc: Exception) -> dict[str, Any]:
    code = exc.exit_code if isinstance(exc, EdaError) else 1
    return {"rid": rid, "ok": False, "error": str(exc), "code": code}


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """*reply* when it says ok, else the matching exception."""
    if reply.get("ok"):
        return reply
    code = reply.get("code", 1)
    message = str(reply.get("error", "request refused"))
    if code == 3:
        raise NotFoundError(message)
    raise RemoteError(message, code if isinstance(code, int) else 1)
