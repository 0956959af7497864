"""Who may do what on a secure bus: the ACL file of ``eda-bus serve --secure --acl FILE``.

TOML, one table per trusted key name (as ``eda-keys list`` shows them)::

    [alice]
    publish = ["orders.>"]          # topics it may publish to (eda's topic patterns)
    subscribe = ["orders.>", "audit.*"]

    [ops]
    subscribe = [">"]
    admin = true                    # retain, purge, delete-consumer

    [default]                       # every trusted name without a table of its own
    subscribe = ["public.>"]

    ["alice.laptop"]                # a name with a dot is quoted (TOML nests [a.b])
    publish = ["orders.>"]

What each right allows:

* ``publish``: a batch whose topic one of the patterns matches is stored; any
  other batch is refused (nothing of it stored), the others go on.
* ``subscribe``: a subscription (live, replay, durable or group) is accepted
  when each of its patterns lies within one of these (``orders.*`` within
  ``orders.>``; ``>`` only within ``>``); resuming a durable consumer needs
  its stored patterns too.  ``eda-bus stats`` needs one subscribe pattern and
  shows the topics and consumers within them (the bus-wide counts stay).
* ``admin``: ``retain``, ``purge`` and ``delete-consumer`` (still from the bus's own host
  only, as without an ACL).

A trusted name with no table gets the ``[default]`` table, or nothing when
there is none; a key no longer trusted gets nothing.  The name is always the
one of the key the CURVE handshake proved (:meth:`Security.peer_name
<eda.core.security.Security.peer_name>`), never one a message claims.  A
malformed file stops the bus at start (:class:`~eda.core.errors.ConfigError`
naming file and line); the server re-reads the file when it changes
(:meth:`Acl.changed`) and then ends the subscriptions it no longer allows; a
malformed edit keeps the rights read before.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from .. import config, keys
from ..errors import ConfigError, EdaError, UsageError
from ..topics import Matcher, covers, validate_pattern

DEFAULT = "default"  # the table of every trusted name without one of its own
RIGHTS = ("publish", "subscribe", "admin")
MAX_CACHED = 10_000  # verdicts on patterns remembered per table


class Forbidden(EdaError):
    """The bus's ACL does not give the client's key this right (exit 1: remote refused)."""


class Rights:
    """What one table of the ACL allows (see the module docstring)."""

    __slots__ = ("_publishing", "_reading", "admin", "publish", "subscribe")

    def __init__(
        self, publish: Iterable[str] = (), subscribe: Iterable[str] = (), admin: bool = False
    ) -> None:
        self.publish = tuple(publish)
        self.subscribe = tuple(subscribe)
        self.admin = admin
        self._publishing = Matcher(self.publish)  # caches its verdict per topic
        self._reading: dict[str, bool] = {}

    def may_publish(self, topic: str) -> bool:
        return self._publishing(topic)

    def may_read(self, pattern: str) -> bool:
        """Whether *pattern* (a topic, or a pattern) lies within a subscribe pattern."""
        verdict = self._reading.get(pattern)
        if verdict is None:
            verdict = any(covers(outer, pattern) for outer in self.subscribe)
            if len(self._reading) < MAX_CACHED:
                self._reading[pattern] = verdict
        return verdict


NOTHING = Rights()


class Access(NamedTuple):
    """One client's rights, with the name they were given to (for the refusals)."""

    name: str | None  # None: a key no longer trusted (or no key: never on a secure bus)
    rights: Rights

    @property
    def who(self) -> str:
        return self.name if self.name is not None else "a key no longer trusted"

    def publish(self, topic: str) -> None:
        if not self.rights.may_publish(topic):
            raise Forbidden(f"{self.who} may not publish to {topic} (the bus's ACL)")

    def read(self, patterns: Iterable[str]) -> None:
        for pattern in patterns:
            if not self.rights.may_read(pattern):
                raise Forbidden(f"{self.who} may not subscribe to {pattern} (the bus's ACL)")

    def stats(self) -> None:
        if not self.rights.subscribe:
            raise Forbidden(f"{self.who} may not read the bus's stats: no subscribe right"
                            " (the bus's ACL)")  # fmt: skip

    def administer(self, op: str) -> None:
        if not self.rights.admin:
            raise Forbidden(f"{self.who} may not {op}: it needs admin = true (the bus's ACL)")


Signature = tuple[int, int, int, int] | None  # what tells that the file changed


def _signature(path: Path) -> Signature:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class Acl:
    """The rights of an ACL file, by trusted name; :meth:`load` reads it strictly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tables: dict[str, Rights] = {}
        self._signature: Signature = None

    @classmethod
    def load(cls, path: Path) -> Acl:
        """The ACL in *path*; :class:`ConfigError` naming the file (and line) if it is
        missing or malformed."""
        acl = cls(path)
        acl.reload()
        return acl

    def access(self, name: str | None) -> Access:
        """The rights of trusted name *name* (None: a key no longer trusted: nothing)."""
        if name is None:
            return Access(None, NOTHING)
        rights = self.tables.get(name)
        if rights is None:
            rights = self.tables.get(DEFAULT, NOTHING)
        return Access(name, rights)

    def changed(self) -> bool:
        """Whether the file changed since it was last read (or tried)."""
        return _signature(self.path) != self._signature

    def reload(self) -> None:
        """Read the file again; on :class:`ConfigError` the rights read before stay."""
        self._signature = _signature(self.path)
        self.tables = parse(self.path)

    def unknown(self, trusted: Iterable[str]) -> list[str]:
        """The names with a table that are not trusted (a typo gives nobody anything)."""
        known = set(trusted)
        return sorted(name for name in self.tables if name != DEFAULT and name not in known)


def open_acl(path: str | None) -> Acl | None:
    """The ACL of ``--acl`` (None without one), read strictly: secure mode only
    (:class:`UsageError` without it: rights are given to trusted keys)."""
    if path is None:
        return None
    from .. import security

    if security.active() is None:
        raise UsageError(
            "--acl is used with --secure (EDA_SECURE=1): its rights go to trusted keys"
        )
    return Acl.load(Path(path))


def parse(path: Path) -> dict[str, Rights]:
    """The tables of the ACL file *path*; ConfigError naming file, line and key."""
    text = str(path)
    if not path.is_file():
        raise ConfigError(f"ACL file {path}: " + ("not a file" if path.exists() else "not found"))
    try:
        doc = config.read(text)
    except ConfigError as exc:  # (it names the file, and the line of a TOML error)
        raise ConfigError(f"ACL file {exc}") from None
    tables = {}
    for name, table in doc.items():
        where = f"ACL file {path}:{config.table_line(text, name)}"
        if name != DEFAULT and not keys.NAME.fullmatch(name):
            raise ConfigError(f"{where}: [{name[:64]}] is not a trusted key name (eda-keys list)")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where}: '{name}' must be a table: [{name}] then publish = [...], "
                "subscribe = [...]"
            )
        tables[name] = _rights(table, name, where)
    return tables


def _rights(table: dict[str, Any], name: str, where: str) -> Rights:
    for key, value in table.items():
        if key not in RIGHTS:
            hint = (
                f' (a name with a dot is quoted: ["{name}.{key}"])'
                if isinstance(value, dict)
                else ""
            )
            raise ConfigError(
                f"{where}: [{name}] has an unknown key '{key[:64]}': publish, subscribe or"
                f" admin{hint}"
            )
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(f"{where}: [{name}] admin must be true or false")
    return Rights(
        _patterns(table, "publish", name, where), _patterns(table, "subscribe", name, where), admin
    )


def _patterns(table: dict[str, Any], key: str, name: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{where}: [{name}] {key} must be a list of patterns: ["orders.>"]')
    try:
        return [validate_pattern(v) for v in value]
    except UsageError as exc:
        raise ConfigError(f"{where}: [{name}] {key}: {exc}") from None
