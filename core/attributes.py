"""CloudEvents attributes and JSON values from peers: the rules, checked once at the edge.

Anything a peer sends that can reach eda-sub's output (extension attributes,
JSON payloads, whole envelopes) is parsed here with :func:`loads`, which
refuses what RFC 8259 does not have (NaN, Infinity, numbers that overflow to
infinity) and strings that cannot be written as UTF-8 (lone surrogates), and
checked against CloudEvents 1.0: attribute names are lowercase letters and
digits, extension values are scalars, ``time`` is an RFC 3339 timestamp
(:func:`check_time`), and the attributes eda itself renders
(:data:`CORE_ATTRIBUTES`) or stamps on the events it delivers
(:data:`EDA_ATTRIBUTES`) can never be set by an extension.  What fails
raises ValueError; callers turn it into their own error type.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from typing import Any, Final

SPECVERSION: Final = "1.0"
# eda's own sequence number (per publisher and topic).  It is not the
# CloudEvents "sequence" extension (a string, scoped to a source), which an
# event may carry as an ordinary extension and which eda passes on unchanged.
SEQUENCE: Final = "edaseq"
# the event's sequence on the bus, added by eda-sub --bus
BUS_SEQUENCE: Final = "edabusseq"
# where an event came from, added by eda-sub --everywhere: "direct" (from its
# publisher, brokerless) or "bus"
VIA: Final = "edavia"
# every attribute eda adds to an event it delivers: each hop stamps its own, so a
# publisher may not set one (an output line would hold the key twice, and a
# reader could take the publisher's value for eda's)
EDA_ATTRIBUTES: Final = frozenset({SEQUENCE, BUS_SEQUENCE, VIA})

# the attributes eda renders itself or that CloudEvents defines: an extension
# attribute may not take any of these names
CORE_ATTRIBUTES: Final = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "datacontenttype",
        "dataschema",
        "subject",
        "data",
        "data_base64",
        SEQUENCE,
    }
)
_STRING_ATTRIBUTES = ("time", "datacontenttype", "dataschema", "subject")

MAX_NAME: Final = 64  # CloudEvents advises 20; eda accepts up to this many characters
MAX_ATTRIBUTE: Final = 4096  # characters in id, source and other string attributes
_NAME = re.compile(r"[a-z0-9]{1,64}")
_INT_RANGE = 1 << 63
# RFC 3339 section 5.6 date-time ("T" and "Z" may be lower case, section 5.6 NOTE); ranges
# (month, day of that month, hour, ...) are checked by check_time
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# a "\uD800"-style escape: the only way a lone surrogate gets into a JSON string
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads(raw: bytes) -> Any:
    """Parse strict JSON (RFC 8259) from UTF-8 *raw*; ValueError on anything else."""
    try:
        value = _decoder.decode(raw.decode())
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("JSON string holds a lone surrogate") from None
    return value


def dumps(value: Any) -> str:
    """Compact JSON text of a value that :func:`loads` produced (or eda built)."""
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str
    )


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"attribute name {name[:MAX_NAME]!r} is not 1 to {MAX_NAME} lowercase letters or digits"
        )
    return name


def check_extension(name: str, value: Any) -> None:
    """An extension attribute: a CloudEvents name that is not a core one, a scalar value."""
    check_name(name)
    if name in EDA_ATTRIBUTES:
        raise ValueError(f"attribute {name!r} is added by eda (each hop stamps its own)")
    if name in CORE_ATTRIBUTES:
        raise ValueError(f"extension attribute {name!r} would override a core attribute")
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE:
            raise ValueError(f"extension attribute {name!r} is longer than {MAX_ATTRIBUTE}")
    elif isinstance(value, bool) or (isinstance(value, int) and -_INT_RANGE <= value < _INT_RANGE):
        pass
    elif not (isinstance(value, float) and math.isfinite(value)):
        raise ValueError(f"extension attribute {name!r} must be a string, number or boolean")


def extensions(raw: bytes) -> dict[str, Any]:
    """The extension attributes frame of a batch: a JSON object of checked extensions."""
    value = loads(raw)
    if not isinstance(value, dict):
        raise ValueError("extension attributes are not a JSON object")
    for name, item in value.items():
        check_extension(name, item)
    return value


def _string(event: dict[str, Any], name: str, required: bool) -> None:
    value = event.get(name)
    if value is None and not required and name not in event:
        return
    if not isinstance(value, str) or not value or len(value) > MAX_ATTRIBUTE:
        what = "a non-empty string" if required else "a string"
        raise ValueError(f"attribute {name!r} must be {what} of at most {MAX_ATTRIBUTE} characters")


def check_time(text: str) -> str:
    """*text* when it is an RFC 3339 timestamp (CloudEvents' Timestamp), e.g.
    ``2026-12-07T12:00:00Z`` or ``2026-12-07T13:00:00.5+01:00``; ValueError otherwise.

    Second 60 is accepted (a leap second); a space for the ``T`` is not.
    """
    m = _RFC3339.fullmatch(text)
    if m is not None:
        year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
        offset_hour, offset_minute = (int(g or 0) for g in m.groups()[6:])
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        days = 29 if month == 2 and leap else _MONTH_DAYS[month - 1] if 1 <= month <= 12 else 0
        if (1 <= day <= days and hour < 24 and minute < 60 and second <= 60
                and offset_hour < 24 and offset_minute < 60):  # fmt: skip
            return text
    raise ValueError(
        f"attribute 'time' {text[:40]!r} is not an RFC 3339 timestamp "
        "(e.g. 2026-12-07T12:00:00Z or 2026-12-07T13:00:00.5+01:00)"
    )


def check_event(event: Any) -> dict[str, Any]:
    """A CloudEvents 1.0 event in JSON format, checked; ValueError says what is wrong.

    The attributes eda adds (:data:`EDA_ATTRIBUTES`) are refused: each hop stamps its own.
    """
    if not isinstance(event, dict):
        raise ValueError("an event must be a JSON object")
    if event.get("specversion") != SPECVERSION:
        raise ValueError(f"'specversion' must be {SPECVERSION!r}")
    for name in ("id", "source", "type"):
        _string(event, name, True)
    for name in _STRING_ATTRIBUTES:
        _string(event, name, False)
    if "time" in event:
        check_time(event["time"])
    if "data_base64" in event:
        if "data" in event:
            raise ValueError("an event holds 'data' or 'data_base64', not both")
        encoded = event["data_base64"]
        if not isinstance(encoded, str):
            raise ValueError("'data_base64' must be a string")
        try:
            binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ValueError("'data_base64' is not valid base64") from None
    for name, value in event.items():
        if name in EDA_ATTRIBUTES:
            raise ValueError(f"{name!r} is stamped by each hop and cannot be sent")
        if name not in CORE_ATTRIBUTES:
            check_extension(name, value)
    return event


def _sanitized(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _sanitized(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitized(v) for v in value]
    return value


def safe_dumps(value: Any) -> str:
    """Compact JSON of any value, never invalid: non-finite numbers become null and
    strings that are not valid Unicode are written with escapes."""
    try:
        text = dumps(value)
    except ValueError:  # NaN or infinity somewhere
        text = dumps(_sanitized(value))
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: \\u escapes are valid JSON
        text = json.dumps(_sanitized(value), separators=(",", ":"), default=str)
    return text
