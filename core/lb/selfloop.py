"""Whether connecting to an address would reach our own listener (a connection loop).

Both TCP proxy engines (the built-in one and HAProxy) leave out a registered
instance that is the proxy itself: every connection to it would be accepted
by the proxy and proxied to it again, until descriptors and the backlog are
full.  A record says it in many spellings, all of which the kernel delivers
to the same socket:

- ``0.0.0.0`` and ``::`` as a destination mean this host (Linux connects to
  its loopback address);
- all of 127.0.0.0/8 and ``::1`` are local, as is every address of a local
  interface (the kernel's local routes: an address is local when a socket
  can bind to it);
- ``::ffff:127.0.0.1`` is IPv4's 127.0.0.1;
- a listener on ``0.0.0.0`` takes every local IPv4 address, one on ``::``
  every local address of both families (dual stack).
"""

from __future__ import annotations

import ipaddress
import socket

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


def as_ip(text: str) -> IP | None:
    """*text* (``[v6]``, ``v6%scope`` or v4) as an address, an IPv4-mapped one as IPv4
    (None when it is not an address)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(ip: IP) -> bool:
    """Whether *ip* is an address of this host (a socket may bind to it; a
    link-local IPv6 address needs its scope)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:  # EADDRNOTAVAIL: not ours (or a link-local address without its scope)
        return False
    return True


def reaches(listen: IP | None, listen_port: int, host: str, port: int) -> bool:
    """Whether a connection to *host*:*port* lands on a listener bound to
    *listen*:*listen_port* (*listen* None: every IPv4 address, as ``0.0.0.0``)."""
    if port != listen_port:
        return False
    dest = as_ip(host)
    if dest is None:
        return False  # not an address: never connected to as such
    if dest.is_unspecified:  # "this host": the kernel connects to its loopback address
        dest = _LOOPBACK[dest.version]
    if listen is None:
        listen = ipaddress.ip_address("0.0.0.0")
    elif isinstance(listen, ipaddress.IPv6Address) and listen.ipv4_mapped is not None:
        listen = listen.ipv4_mapped
    if not listen.is_unspecified:
        return dest.packed == listen.packed  # a scope does not make another address
    if listen.version == 4 and dest.version == 6:
        return False  # an IPv4 listener never sees an IPv6 connection
    return is_local(dest)
