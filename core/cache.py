"""A small cache of what discovery found last time, shared by every program.

One JSON object in ``$XDG_CACHE_HOME/eda/discovery.json``: a list of
strings per key (the peer names that answered an mDNS query, the registry
endpoints that answered).  Reading it must stay cheap: one-shot commands
read it on every call, so this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os


def cache_file() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eda", "discovery.json")


def _load_cache() -> dict[str, list[str]]:
    try:
        with open(cache_file()) as fh:
            data = json.load(fh)
        return {k: [str(n) for n in v] for k, v in data.items() if isinstance(v, list)}
    except (OSError, ValueError, AttributeError):
        return {}


def cached(key: str) -> list[str]:
    """What :func:`remember` stored under *key* (peer names, endpoints), or []."""
    return _load_cache().get(key, [])


def remember(key: str, values: list[str]) -> None:
    """Store *values* under *key* in the discovery cache (best effort, atomic)."""
    cache = _load_cache()
    if cache.get(key) == values:
        return
    cache[key] = values
    path = cache_file()
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(cache, fh)
        os.replace(tmp, path)


