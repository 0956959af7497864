"""A small cache of what discovery found last time, shared by every program.

One JSON object in ``$XDG_CACHE_HOME/eda/discovery.json``: a list per key,
either of strings (the registry endpoints that answered) or of small
objects (the peers that answered an mDNS query, with their endpoints and
when they were last confirmed; endpoints found dead, until when).  Reading
it must stay cheap: one-shot commands read it on every call, so this module
imports nothing heavy.  The file is local state, not input from the
network, but it is still read defensively: anything unexpected is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

MAX_BYTES = 1 << 20  # a bigger file is not ours: ignore it


def cache_file() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eda", "discovery.json")


def _load_cache() -> dict[str, list[Any]]:
    try:
        with open(cache_file(), "rb") as fh:
            data = json.loads(fh.read(MAX_BYTES + 1)[:MAX_BYTES])
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, list)}


def cached(key: str) -> list[str]:
    """The strings :func:`remember` stored under *key* (peer names, endpoints), or []."""
    return [str(n) for n in _load_cache().get(key, []) if isinstance(n, (str, int, float))]


def cached_entries(key: str) -> list[dict[str, Any]]:
    """The objects :func:`remember_entries` stored under *key*, or []."""
    return [e for e in _load_cache().get(key, []) if isinstance(e, dict)]


def _store(key: str, values: list[Any]) -> None:
    cache = _load_cache()
    if cache.get(key) == values:
        return
    cache[key] = values
    path = cache_file()
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(cache, fh)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def remember(key: str, values: list[str]) -> None:
    """Store *values* under *key* in the discovery cache (best effort, atomic)."""
    _store(key, list(values))


def remember_entries(key: str, entries: list[dict[str, Any]]) -> None:
    """Store *entries* (JSON objects) under *key* (best effort, atomic)."""
    _store(key, list(entries))
