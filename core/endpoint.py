"""Endpoints: one typed value for "where a server listens", parsed once at the edge.

Every address eda takes from a user, a config file, a peer or mDNS is read by
:meth:`Endpoint.parse` into an :class:`Endpoint` (host and port, validated)
and written back with :meth:`Endpoint.zmq` (``tcp://HOST:PORT``) or ``str()``
(``HOST:PORT``).  The rules, the same everywhere:

- ``tcp://HOST:PORT``, ``HOST:PORT``, ``[V6]:PORT`` and ``tcp://[V6]:PORT``
  are accepted; a bare IPv6 address needs its brackets (``::1:5555`` is
  ambiguous).  Other schemes (``ipc://``, ``udp://``) are refused.
- HOST is an IPv4 or IPv6 literal, a DNS name (letters, digits, ``.-_``, at
  most 253 characters) or ``*`` (every interface, for a bind).  An empty
  host (``:PORT``) is taken only where the caller passes *default_host*.
- PORT is 0–65535 (0, or ``*`` in a bind, means "any"); a port is never
  taken modulo 65536 (libzmq would).
- Anything else is a :class:`~eda.core.errors.UsageError` whose one line
  names what was being parsed (``bad bus endpoint 'x': use HOST:PORT``).

Peers' input goes through :meth:`Endpoint.from_peer`, which returns ``None``
instead of raising, so a daemon drops a malformed advertisement and counts it
(CONVENTIONS.md §7).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import UsageError

_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})")
MAX_TEXT = 300  # longer input is refused before any parsing


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A TCP endpoint: *host* (a name, an IPv4/IPv6 literal without brackets, or
    ``*``) and *port* (0 means any port, for a bind)."""

    host: str
    port: int

    # -- parsing ---------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        text: str,
        what: str = "",
        *,
        default_host: str | None = None,
        default_port: int | None = None,
    ) -> Endpoint:
        """*text* as an Endpoint, or :class:`UsageError` naming *what* it was for.

        *default_host* fills an empty host (``:PORT``); *default_port* is used
        when *text* has no port at all (``HOST`` alone).
        """
        parsed = cls._parse(text, default_host, default_port)
        if parsed is None:
            label = f"{what} endpoint" if what else "endpoint"
            shown = text[:80] + ("..." if len(text) > 80 else "")
            hint = "use HOST:PORT or tcp://HOST:PORT ([V6]:PORT for IPv6)"
            if _port_too_large(text):  # (libzmq would take it modulo 65536)
                hint = "port out of range (0-65535)"
            raise UsageError(f"bad {label} {shown!r}: {hint}")
        return parsed

    @classmethod
    def from_peer(cls, text: object) -> Endpoint | None:
        """An endpoint a peer sent (``tcp://HOST:PORT``), or None if it is malformed.

        A wildcard host or port 0 means nothing to connect to, so both are refused.
        """
        if not isinstance(text, str):
            return None
        parsed = cls._parse(text, None, None)
        if parsed is None or parsed.port == 0 or parsed.host == "*":
            return None
        return parsed

    @classmethod
    def _parse(
        cls, text: str, default_host: str | None, default_port: int | None
    ) -> Endpoint | None:
        if not isinstance(text, str) or len(text) > MAX_TEXT or not text.isascii():
            return None
        scheme, sep, rest = text.partition("://")
        if sep:
            if scheme != "tcp":
                return None
        else:
            rest = text
        host, port_text = _split(rest)
        if port_text is None:
            if default_port is None:
                return None
            port = default_port
        elif port_text == "*":
            port = 0
        elif port_text.isdigit() and len(port_text) <= 5 and int(port_text) <= 65535:
            port = int(port_text)
        else:
            return None
        if host == "":
            if default_host is None:
                return None
            host = default_host
        if not valid_host(host):
            return None
        return cls(host, port)

    # -- writing ---------------------------------------------------------------------
    def __str__(self) -> str:
        """``HOST:PORT`` (``[V6]:PORT`` for IPv6)."""
        return f"{self.bracketed}:{self.port}"

    @property
    def bracketed(self) -> str:
        """The host as it appears in an address: IPv6 literals in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def zmq(self) -> str:
        """``tcp://HOST:PORT`` for ZeroMQ (``*`` port for any port)."""
        return f"tcp://{self.bracketed}:{self.port or '*'}"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_literal(self) -> bool:
        """Whether the host is a numeric address (connecting needs no name lookup)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.host, port)

    def with_host(self, host: str) -> Endpoint:
        return Endpoint(host, self.port)

    @property
    def sockaddr(self) -> tuple[str, int]:
        """(host, port) for the socket module."""
        return (self.host, self.port)


def _split(rest: str) -> tuple[str, str | None]:
    """(host, port text or None) of ``HOST:PORT``, ``[V6]:PORT``, ``[V6]`` or ``HOST``."""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            return "", "x"  # unbalanced: refused by the port check
        host, after = rest[1:close], rest[close + 1 :]
        if after == "":
            return ("" if host == "" else host), None
        if not after.startswith(":"):
            return "", "x"
        if ":" not in host:
            return "", "x"  # brackets are for IPv6 only
        return host, after[1:]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, None
    if ":" in host:
        return "", "x"  # a bare IPv6 literal: ambiguous without brackets
    return host, port


def _port_too_large(text: str) -> bool:
    """Whether *text* is well formed but for a port number beyond 65535."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        return False
    port = _split(text.partition("://")[2] or text)[1]
    return port is not None and port.isdigit() and int(port) > 65535


def valid_host(host: str) -> bool:
    """Whether *host* is ``*``, an IP literal or a well-formed DNS name."""
    if host == "*":
        return True
    if ":" in host:
        try:
            return isinstance(ipaddress.ip_address(host.split("%", 1)[0]), ipaddress.IPv6Address)
        except ValueError:
            return False
    return bool(_NAME_RE.fullmatch(host)) and len(host) <= 253
