"""TOML configuration with eda's precedence.

Highest first: command-line flag > ``EDA_*`` environment variable >
``--config FILE`` > ``./eda.toml`` > ``$XDG_CONFIG_HOME/eda/config.toml`` >
built-in default.  Flags and environment variables are the CLI's business;
this module finds, parses and merges the files and says where a key came
from, so an error can name file, line and key.

A file holds shared keys at the top level and per-program tables::

    interface = "eth0"          # every program
    [sub]
    hwm = 50000                 # eda-sub only
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, NamedTuple

from .configpaths import default_paths as default_paths  # (where the files are)
from .errors import ConfigError

# tomllib and tomli_w are imported where used: most runs have no config file,
# and every millisecond of start-up counts for one-shot commands


class Setting(NamedTuple):
    """One configured value and where it was written."""

    value: Any
    path: str
    key: str  # dotted, as written: "hwm" or "sub.hwm"

    def where(self) -> str:
        return f"{self.path}:{key_line(self.path, self.key)}: key '{self.key}'"


def read(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def settings_for(
    program: str, paths: list[str], tables: Collection[str] | None = None
) -> dict[str, Setting]:
    """Merge *paths* (lowest first) into the settings that apply to *program*.

    Keys are normalised to option names with underscores.  Tables for other
    programs are ignored (a table that is no program's in *tables* is an
    error, most likely a typo); within a file, the program's table beats the
    top-level keys.
    """
    merged: dict[str, Setting] = {}
    for path in paths:
        doc = read(path)
        for key, value in doc.items():
            if not isinstance(value, dict):
                merged[key.replace("-", "_")] = Setting(value, path, key)
            elif tables is not None and key not in tables and key != program:
                known = ", ".join(f"[{t}]" for t in sorted(tables))
                raise ConfigError(
                    f"{path}:{table_line(path, key)}: unknown table [{key}]; "
                    f"tables are named after programs: {known}"
                )
        table = doc.get(program, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}:{key_line(path, program)}: '{program}' must be a table")
        for key, value in table.items():
            merged[key.replace("-", "_")] = Setting(value, path, f"{program}.{key}")
    return merged


def table_line(path: str, name: str) -> int:
    """Line number of the ``[name]`` header (or ``name = {...}``) in *path* (1 when unknown)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 1
    for number, line in enumerate(lines, 1):
        header = re.match(r"\[+\s*([^\].]+?)\s*[\].]", line.strip())
        if header and header.group(1).strip("\"'") == name:
            return number
    return key_line(path, name)


def key_line(path: str, dotted: str) -> int:
    """Line number where *dotted* key is set in *path* (1 when unknown)."""
    section, _, key = dotted.rpartition(".")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 1
    current = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        header = re.match(r"\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            current = header.group(1)
            if not key and current == dotted:
                return number
            continue
        if current == section and re.match(rf"[\"']?{re.escape(key)}[\"']?\s*=", stripped):
            return number
    return 1


def dump(settings: dict[str, Any]) -> str:
    """TOML text for *settings* (used to write example or generated configs)."""
    import tomli_w

    return tomli_w.dumps(settings)
