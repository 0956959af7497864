"""CloudEvents binary content mode: an event's attributes as ``ce-`` message headers.

The HTTP and NATS protocol bindings carry an event in *binary* mode as its
data for a body and one header per attribute, named ``ce-<attribute>``, whose
value is the attribute's canonical string (CloudEvents type system: ``true``
and ``false`` for a Boolean, decimal digits for an Integer, the string itself
for a String) percent-encoded: space, ``"``, ``%`` and every character outside
printable ASCII (U+0021 to U+007E) become ``%XY`` per UTF-8 byte, upper-case
hex (NATS binding 1.0.3 section 3.1.3.2, HTTP binding 1.0.2 section 3.1.3.2).

The attributes themselves come from :mod:`eda.core.envelope` (the one
renderer of eda's events); this module only maps them to headers and back.
Reading, a value is unquoted first when it is a double-quoted string (older
binding versions allowed that), then percent-decoded once; a value whose
bytes are not UTF-8 (an overlong ``%C0%A0``, a lone ``%FF``) is refused with
a ValueError.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

from . import attributes

PREFIX: Final = "ce-"
# printable ASCII but space, '"' and '%': what a header value carries unencoded
_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_PLAIN = re.compile(r"[\x21\x23\x24\x26-\x7e]*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def canonical(value: Any) -> str:
    """An attribute value's canonical string (CloudEvents type system)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return attributes.dumps(value)  # an Integer (or a number eda accepts as an extension)


def encode_value(text: str) -> str:
    """*text* percent-encoded for a header value (see the module docstring)."""
    if _PLAIN.fullmatch(text):
        return text
    return quote(text, safe=_SAFE, encoding="utf-8", errors="strict")


def decode_value(value: str) -> str:
    """A header value back to the attribute's string: a double-quoted string unquoted,
    then one round of percent-decoding; ValueError when the bytes are not UTF-8."""
    quoted = _QUOTED.fullmatch(value.strip(" \t"))
    text = re.sub(r"\\(.)", r"\1", quoted[1]) if quoted else value.strip(" \t")
    if "%" not in text:
        return text
    raw = _PERCENT.sub(lambda m: bytes([int(m[1], 16)]), text.encode())
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"header value {value[:40]!r} is not percent-encoded UTF-8") from None


def to_headers(event: Mapping[str, Any]) -> dict[str, str]:
    """The ``ce-`` headers of an event's attributes (``data``/``data_base64`` left out)."""
    return {
        PREFIX + name: encode_value(canonical(value))
        for name, value in event.items()
        if name not in ("data", "data_base64")
    }


def from_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The attributes in *headers* (name, value pairs; names matched case-insensitively),
    as canonical strings; a ValueError naming the header for a value that is not valid."""
    found: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(PREFIX) and len(lower) > len(PREFIX):
            try:
                found[lower[len(PREFIX) :]] = decode_value(value)
            except ValueError as exc:
                raise ValueError(f"{lower[:80]}: {exc}") from None
    return found
