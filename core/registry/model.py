"""The registration record and its validation.

A record says where one instance of a service listens and how it is doing.
Its fields travel as JSON between clients and registries and as DNS-SD TXT
strings in serverless mode, so metadata obeys the RFC 6763 size advice: each
``key=value`` string fits in 255 bytes and all of them together in
:data:`META_TOTAL_LIMIT` bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

MAX_TICK = 5.0  # s: the longest tick (--tick) a registry may have; a client accepts no longer one

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
HOST_RE = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")
META_ITEM_LIMIT = 255  # RFC 6763 6.1: one TXT string is at most 255 bytes
META_TOTAL_LIMIT = 1300  # RFC 6763 6.2: keep the whole TXT record under ~1300 bytes
META_KEY_LIMIT = 64
# serverless TXT keys (k: secure mode's public key)
RESERVED_META = frozenset({"svc", "id", "w", "st", "ttl", "iv", "h", "rv", "k"})
MAX_TTL = 86400.0
DEFAULT_MAX_INSTANCES = 100_000  # eda-registry serve --max-instances
# Revisions are JSON-safe integers (a larger one once stopped the daemon at its next
# snapshot); bumps saturate here rather than grow past what every reader accepts.
MAX_REV = 2**53 - 1
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: any later time cannot be printed
REGISTRY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{0,64}$")


class InvalidRecord(UsageError):
    """A registration is malformed (bad name, port, metadata...); it is refused."""


@dataclass
class Instance:
    """One registered instance of a service."""

    service: str
    id: str
    host: str
    port: int
    weight: int = 1
    meta: dict[str, str] = field(default_factory=dict)
    status: str = PASSING
    ttl: float = 6.0
    interval: float = 2.0
    registered: float = 0.0  # unix time of the first registration
    heartbeat: float = 0.0  # unix time of the last heartbeat the registry saw
    registry: str = ""  # id of the registry that receives its heartbeats
    rev: int = 0  # bumped by the owning registry on every change
    # secure mode: the registrant's CURVE public key (Z85) as its registry's handshake
    # proved it (never as a client claims it); "" when registered in plain mode
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON sends it: :func:`dataclasses.asdict`'s answer, written out
        (asdict copies each value through a generic recursion: 40x slower, and a lookup
        answers with every instance of a service)."""
        return {
            "service": self.service, "id": self.id, "host": self.host, "port": self.port,
            "weight": self.weight, "meta": dict(self.meta), "status": self.status,
            "ttl": self.ttl, "interval": self.interval, "registered": self.registered,
            "heartbeat": self.heartbeat, "registry": self.registry, "rev": self.rev,
            "key": self.key,
        }  # fmt: skip

    def copy(self) -> Instance:
        """A new record with the same fields (*meta* shared: records never change it)."""
        twin = object.__new__(Instance)
        twin.__dict__.update(self.__dict__)
        return twin

    def same_registration(self, other: Instance) -> bool:
        """True when *other* differs at most in health, times, owner and revision."""
        return (
            self.service == other.service
            and self.host == other.host
            and self.port == other.port
            and self.weight == other.weight
            and self.meta == other.meta
            and self.ttl == other.ttl
            and self.interval == other.interval
            and self.key == other.key
        )


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidRecord("missing service name")
    lowered = name.lower()
    if not NAME_RE.fullmatch(lowered):
        raise InvalidRecord(
            f"bad service name {_short(name)}: use 1-63 letters, digits and '-' (a DNS label)"
        )
    return lowered


def validate_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRecord(f"bad port {_short(port)}: use 1-65535")
    return port


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate from JSON "\ud800": not UTF-8 text
        raise InvalidRecord("metadata must be valid UTF-8 text") from None


def validate_meta(meta: object) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise InvalidRecord("metadata must be an object of strings")
    if len(meta) > META_TOTAL_LIMIT // 2:  # each item costs at least 2 bytes ("k=" + length)
        raise InvalidRecord(
            f"metadata has {len(meta)} items; keep it under {META_TOTAL_LIMIT} bytes"
        )
    total = 0
    out: dict[str, str] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRecord("metadata keys and values must be strings")
        if not key or len(key) > META_KEY_LIMIT or "=" in key or not key.isprintable():
            raise InvalidRecord(
                f"bad metadata key {key!r}: 1-{META_KEY_LIMIT} printable characters, no '='"
            )
        if not key.isascii():
            raise InvalidRecord(f"bad metadata key {key!r}: ASCII only (RFC 6763 6.4)")
        size = len(key) + 1 + len(_utf8(value))
        if size > META_ITEM_LIMIT:
            raise InvalidRecord(
                f"metadata {key}=... is {size} bytes; one key=value must fit in {META_ITEM_LIMIT}"
            )
        if key.lower() in RESERVED_META:
            raise InvalidRecord(f"metadata key {key!r} is reserved")
        total += size + 1
        out[key.lower()] = value
    if total > META_TOTAL_LIMIT:
        raise InvalidRecord(
            f"metadata is {total} bytes; keep it under {META_TOTAL_LIMIT} (RFC 6763 6.2)"
        )
    return out


def parse_meta(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``key=value`` strings (as given on a command line) to validated metadata."""
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRecord(f"bad metadata {item!r}: use KEY=VALUE")
        meta[key] = value
    return validate_meta(meta)


def _short(value: object) -> str:
    """*value* for an error message: a hostile value must not make a huge one."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge number>"
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: object, what: str, low: float, high: float) -> float:
    # NaN fails the comparison; a huge int compares exactly (no float overflow)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise InvalidRecord(
            f"bad {what} {_short(value)}: use a number of seconds in ({low:g}, {high:g}]"
        )
    return float(value)


def _timestamp(value: object) -> float:
    """Unix seconds in [0, 9999-12-31]: a huge, negative or non-finite time breaks printing."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= MAX_TIME
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise InvalidRecord(
            f"bad timestamps {_short(value)}: use unix seconds up to {MAX_TIME:.0f}"
        )
    return float(value)


def validate_rev(rev: object) -> int:
    if isinstance(rev, bool) or not isinstance(rev, int) or not 0 <= rev <= MAX_REV:
        raise InvalidRecord(f"bad revision {_short(rev)}: use an integer in [0, 2**53)")
    return rev


def next_rev(rev: int) -> int:
    """*rev* + 1, saturating at :data:`MAX_REV` so a stored record always reloads."""
    return min(rev + 1, MAX_REV)


def validate_id(value: object) -> str:
    """*value* as an instance id: 1-63 letters, digits, '-' or '_'."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidRecord(f"bad instance id {_short(value)}: 1-63 letters, digits, '-' or '_'")
    return value


def validate_key(value: object) -> str:
    """A record's public key: "" (plain mode) or Z85, 40 characters."""
    from ..keys import is_key

    if value == "" or (isinstance(value, str) and is_key(value)):
        return str(value)
    raise InvalidRecord(f"bad key {_short(value)}: a Z85 public key, 40 characters")


def validate_registry_id(value: object) -> str:
    if not isinstance(value, str) or not REGISTRY_ID_RE.fullmatch(value):
        raise InvalidRecord(f"bad registry id {_short(value)}: 0-64 letters, digits, '-' or '_'")
    return value


def default_id(service: str, host: str, port: int) -> str:
    """A stable instance id: the same service at the same address keeps its id."""
    return re.sub(r"[^A-Za-z0-9-]", "-", f"{service}-{host}-{port}")[:63]


def from_dict(data: object) -> Instance:
    """Validate a record received from the network or typed by a user."""
    if not isinstance(data, dict):
        raise InvalidRecord("a registration must be a JSON object")
    service = validate_name(data.get("service"))
    port = validate_port(data.get("port"))
    host = data.get("host")
    if not isinstance(host, str) or not HOST_RE.fullmatch(host):
        raise InvalidRecord(f"bad host {_short(host)}")
    inst_id = validate_id(data.get("id") or default_id(service, host, port))
    weight = data.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 65535:
        raise InvalidRecord(f"bad weight {_short(weight)}: use 0-65535")
    status = data.get("status", PASSING)
    if not isinstance(status, str) or status not in STATUSES:
        raise InvalidRecord(f"bad status {_short(status)}: one of {', '.join(STATUSES)}")
    ttl = _number(data.get("ttl", 6.0), "ttl", 0, MAX_TTL)
    interval = _number(data.get("interval", 2.0), "interval", 0, MAX_TTL)
    if interval >= ttl:
        raise InvalidRecord(f"heartbeat interval {interval:g}s must be shorter than ttl {ttl:g}s")
    times = [_timestamp(data.get(k, 0.0)) for k in ("registered", "heartbeat")]
    rev = validate_rev(data.get("rev", 0))
    registry = validate_registry_id(data.get("registry", ""))
    key = validate_key(data.get("key", ""))
    return Instance(
        service=service,
        id=inst_id,
        host=host,
        port=port,
        weight=weight,
        meta=validate_meta(data.get("meta", {})),
        status=status,
        ttl=ttl,
        interval=interval,
        registered=times[0],
        heartbeat=times[1],
        registry=registry,
        rev=rev,
        key=key,
    )


class Records:
    """:func:`from_dict` for the registry's hot path: every heartbeat carries its whole
    record, most often the very record its instance sent the last time.

    A record equal to the last one validated for its id -- same keys, same type
    and value of every field (``True == 1`` and ``1.0 == 1`` in Python, which
    validation tells apart) -- gets a copy of that validated record; any other
    is validated in full.  Validation is a function of the record alone, so the
    answer is the one :func:`from_dict` gives; only its cost goes.  Remembers
    the last record of at most *size* ids (the oldest forgotten first).
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self.known: dict[str, tuple[dict[str, Any], Instance]] = {}

    def from_dict(self, data: object) -> Instance:
        if not isinstance(data, dict):
            return from_dict(data)
        inst_id = data.get("id")
        last = self.known.get(inst_id) if type(inst_id) is str else None
        if last is not None and last[0] == data:
            raw = last[0]
            if all(type(value) is type(raw[key]) for key, value in data.items()):
                return last[1].copy()
        inst = from_dict(data)
        if inst.id == inst_id:
            if inst_id not in self.known and len(self.known) >= self.size:
                del self.known[next(iter(self.known))]
            self.known[inst_id] = (data, inst.copy())
        return inst
