"""HAProxy's words for ``eda-lb tcp --engine haproxy``: server names, addresses and
the configuration file, all checked before they reach HAProxy.

HAProxy server names are derived from the registry ids (a cleaned prefix and
a hash of id, host and port), so no id, however hostile, reaches the
configuration file or a Runtime API command as anything but ``[A-Za-z0-9_.-]``.
Addresses are IP literals (a host name is resolved once, here) and ports and
weights are integers in range.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdaError, UsageError

FRONTEND = "eda_in"
BACKEND = "eda"
MIN_VERSION = (2, 5)
MAX_WEIGHT = 256  # HAProxy's limit for a server weight
MAX_TIMER_MS = 2**31 - 1  # HAProxy's limit for a time in its configuration
STRATEGIES = {
    "round-robin": "roundrobin",
    "weighted": "roundrobin",
    "least-conn": "leastconn",
    "random": "random",
    "p2c": "random(2)",  # HAProxy's power of two choices
}
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class Server:
    """One backend as HAProxy should see it."""

    id: str  # registry instance id (HAProxy server name derived safely from it)
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class ServerState:
    """One server as HAProxy reports it (``show stat``)."""

    id: str  # the registry id it was added for ("" if HAProxy has a server eda did not add)
    name: str  # HAProxy's server name
    address: str  # ip:port
    status: str  # UP, DOWN, MAINT, DRAIN, "UP 1/2", "DOWN 1/3", no check...
    weight: int
    sessions: int  # current connections
    total: int  # connections since the server was added


def server_name(server_id: str, host: str, port: int) -> str:
    """HAProxy's name for an instance: ``[A-Za-z0-9_.-]`` only, unique per (id, host, port).

    A cleaned prefix of the id keeps it readable in HAProxy's statistics; the
    hash keeps two ids that clean to the same prefix (or an id that moved to
    another address) apart.
    """
    raw = f"{server_id}\0{host}\0{port}".encode("utf-8", "backslashreplace")
    digest = hashlib.sha256(raw).hexdigest()[:12]
    label = _UNSAFE.sub("_", server_id)[:40].strip("._-") or "server"
    return f"{label}-{digest}"


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) from ``show info``'s ``Version: 2.6.12-1+deb12u4`` (or ``haproxy -v``)."""
    match = re.search(r"(?:Version:|version)\s*(\d+)\.(\d+)", text)
    if match is None:
        raise EdaError(f"haproxy: cannot tell its version from {text[:80]!r}")
    return int(match.group(1)), int(match.group(2))


def resolve(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP literal as is; a well-formed host name resolved (first address)."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text):
        raise ValueError(f"not an IP address or host name: {host[:80]!r}")
    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot resolve {text!r}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, as 'localhost' means
    for _family, _type, _proto, _canon, sockaddr in infos:
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(sockaddr[0])
    raise ValueError(f"cannot resolve {text!r}")


def address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """``ip:port`` as HAProxy reads it (``ipv6@`` makes an IPv6 address unambiguous)."""
    if ip.version == 6:
        if ip.scope_id:
            raise ValueError(f"scoped IPv6 addresses are not supported: {ip}")
        return f"ipv6@{ip}:{port}"
    return f"{ip}:{port}"


@dataclass(frozen=True)
class Target:
    server: Server
    name: str
    endpoint: str
    weight: int


def listen_address(host: str, port: int) -> str:
    """The frontend's ``bind`` address (every address for an empty host or ``*``)."""
    if host in ("", "*"):
        return f":{port}"
    try:
        return address(resolve(host), port)
    except ValueError as exc:
        raise UsageError(f"bad listen address: {exc}") from None


@dataclass(frozen=True)
class Timers:
    """The health checks and timeouts of the configuration, in seconds."""

    check_interval: float
    rise: int
    fall: int
    drain: float
    connect: float
    idle: float


def check_words(interval: float, rise: int, fall: int) -> str:
    """A server's health check, as its ``server`` line or ``add server`` says it."""
    return f"check inter {_ms(interval, 10)}ms rise {rise} fall {fall}"


def write_config(
    path: Path, socket_path: Path, bind: str, strategy: str, timers: Timers, targets: list[Target]
) -> None:
    """haproxy.cfg for *targets* (read by haproxy at start; kept in step after)."""
    t = timers
    check = check_words(t.check_interval, t.rise, t.fall)
    lines = [
        "# written by eda-lb; changes after start go through the Runtime API",
        "global",
        f"    stats socket {socket_path} mode 600 level admin",
        "    stats timeout 10s",
        f"    hard-stop-after {_ms(t.drain, 1)}ms",
        "",
        "defaults",
        "    mode tcp",
        f"    timeout connect {_ms(t.connect, 1)}ms",
        f"    timeout client {_ms(t.idle, 1)}ms",
        f"    timeout server {_ms(t.idle, 1)}ms",
        "    retries 2",
        "    option redispatch 1",  # a failed connect is retried on another instance
        "",
        f"frontend {FRONTEND}",
        f"    bind {bind}",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        f"    balance {STRATEGIES[strategy]}",
    ]
    for target in targets:
        assert SAFE_NAME.fullmatch(target.name)
        lines.append(f"    server {target.name} {target.endpoint} weight {target.weight} {check}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _ms(seconds: float, least: int) -> int:
    """*seconds* as HAProxy milliseconds: at least *least*, at most its timer limit (~24 days)."""
    return min(max(least, round(seconds * 1000)), MAX_TIMER_MS)


def as_int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
