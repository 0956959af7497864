"""A transaction's or a saga's data as the user gives it (``--data``): a JSON object,
inline, ``@FILE`` (read from a file) or ``-`` (read from stdin).

Refused with one line naming where it came from (``--data @order.json: not valid
JSON: ...``): JSON that is not an object, NaN and Infinity (not JSON), input over
*limit* bytes, a file that cannot be read or stdin that is not UTF-8.
"""

from __future__ import annotations

import json
from typing import IO, Any

from ..errors import UsageError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decoded(raw: bytes, where: str, limit: int | None) -> str:
    if limit is not None and len(raw) > limit:
        raise UsageError(f"{where}: over {limit} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_data(
    text: str | None, stdin: IO[bytes], *, limit: int | None = None, option: str = "--data"
) -> dict[str, Any]:
    """The object *text* gives (None: ``{}``); *stdin* is read for ``-``, at most *limit*
    bytes of input are taken (None: no limit).  :class:`UsageError` otherwise."""
    if text is None:
        return {}
    where = option
    if text == "-":
        where = f"{option} - (stdin)"
        text = _decoded(stdin.read(-1 if limit is None else limit + 1), where, limit)
    elif text.startswith("@"):
        where = f"{option} {text}"
        try:
            with open(text[1:], "rb") as fh:
                raw = fh.read(-1 if limit is None else limit + 1)
        except OSError as exc:
            raise UsageError(f"{where}: {exc.strerror or exc}") from None
        text = _decoded(raw, where, limit)
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{where}: the data must be a JSON object, like '{{\"order\": 7}}'")
    return value
