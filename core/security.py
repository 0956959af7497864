"""Secure mode: CURVE on every ZeroMQ socket, and a ZAP handler that admits trusted keys only.

:func:`enable` loads this identity's key pair and the trusted directory
(:mod:`eda.core.keys`) and installs one socket policy
(:func:`eda.core.sockets.add_policy`), so every socket :func:`new_socket
<eda.core.sockets.new_socket>` makes from then on carries the key pair and
the ZAP domain :data:`ZAP_DOMAIN`.  The role is decided per endpoint by
:mod:`eda.core.sockets`: :func:`~eda.core.sockets.bind` makes the socket a
CURVE server there; :func:`~eda.core.sockets.connect` needs the server's
public key (from an announcement's ``k=``, a registry record, or the user)
and refuses to connect a secure socket without one.  One socket can do both
(a subscriber binds for publishers and connects to others): libzmq copies
the options into each listener and each connection as it is made.

The ZAP handler is pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`, one
per ZeroMQ context, started when the first secure socket of that context
binds, before it does (:func:`serving`: without a handler libzmq would admit
every client).  A program that only connects never starts one: a client has
no use for it, and its thread and asyncio's import were a third of a secure
one-shot command's start-up (seconds on a loaded machine).
Why a thread rather than a handler on the program's own poll loop: a
program's loop is often busy elsewhere (writing to a slow stdout, blocked on
``--block``, running an ``--exec`` command), and libzmq holds a handshake
until ZAP answers; a thread answers in microseconds whatever the loop does.
Its callback asks :class:`~eda.core.keys.Trusted`, which re-reads the
directory when it changed: ``eda-keys revoke`` refuses the next connection
without a restart (connections already made stay, as with every ZAP-based
server).

A client refused by a server's ZAP handler sees
``EVENT_HANDSHAKE_FAILED_AUTH`` (status 400) on its socket monitor within
milliseconds: :func:`handshake_failure` turns monitor events into the reason
a program reports.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import zmq

from . import keys, sockets
from .errors import UsageError
from .keys import Identity, Trusted

if TYPE_CHECKING:  # (imported by eda.core.keys when a key file is used)
    from pathlib import Path

ZAP_DOMAIN = "eda"
# monitor events that end a secure handshake in failure
FAILURE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
MAX_DENIED = 64  # recent refused client keys remembered (shown with -v)


class _Admission:
    """The ZAP callback: trusted keys in (only the allowed names, when an allow list
    is set), every other key out (remembered for -v)."""

    def __init__(self, trusted: Trusted) -> None:
        self.trusted = trusted
        self.allowed: frozenset[str] | None = None  # None: every trusted name
        self.denied: collections.deque[str] = collections.deque(maxlen=MAX_DENIED)

    def callback(self, domain: str, key: bytes) -> bool:
        if domain != ZAP_DOMAIN:
            return False
        name = self.trusted.name_of(key)
        if name is not None and (self.allowed is None or name in self.allowed):
            return True
        self.denied.append(key.decode(errors="replace"))
        return False


class Security:
    """What secure mode needs in a process: its key pair and who it trusts.

    (A plain class, not a dataclass: generating a dataclass's methods at import
    costs every program's start-up over 2 million instructions, about 1 % of a
    one-shot command's, and nothing compares or copies a Security.)
    """

    def __init__(self, identity: Identity, trusted: Trusted) -> None:
        self.identity = identity
        self.trusted = trusted
        self._authenticators: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._admission: _Admission | None = _Admission(trusted)

    @property
    def public_key(self) -> str:
        return self.identity.public_text

    @property
    def denied(self) -> collections.deque[str]:
        """Client keys the ZAP handler refused recently (Z85)."""
        assert self._admission is not None
        return self._admission.denied

    def policy(self, sock: sockets.Socket, kind: int) -> None:
        """The socket policy: this identity's keys and the ZAP domain on *sock* (its
        context's ZAP handler is started if it binds: :func:`serving`)."""
        sock.curve_publickey = self.identity.public
        sock.curve_secretkey = self.identity.secret
        sock.zap_domain = ZAP_DOMAIN.encode()

    def _authenticate(self, context: Any) -> None:
        """Start the ZAP handler of *context* once (before its first socket binds)."""
        import logging  # (only a secure program that binds pays for it)

        from zmq.auth.thread import ThreadAuthenticator

        with self._lock:
            if id(context) in self._authenticators:
                return
            auth = ThreadAuthenticator(context, log=logging.getLogger("eda.zap"))
            auth.start()
            auth.configure_curve_callback(ZAP_DOMAIN, self._admission)
            self._authenticators[id(context)] = auth

    def release(self, context: Any) -> None:
        """Stop *context*'s ZAP handler (before the context is terminated)."""
        with self._lock:
            auth = self._authenticators.pop(id(context), None)
        if auth is not None:
            auth.stop()

    def allow(self, names: Iterable[str]) -> None:
        """Admit only these trusted names (``--allow NAME``: which trusted keys may call
        this daemon); an empty list keeps the default, every trusted key.  A name that
        is not trusted now is a UsageError: a typo must not lock everyone out silently
        (a name revoked later is simply refused, as every revoked key is)."""
        wanted = frozenset(names)
        if not wanted:
            return
        known = {name for name, _ in self.trusted.items()}
        unknown = sorted(wanted - known)
        if unknown:
            raise UsageError(
                f"--allow {unknown[0][:64]!r}: not a trusted name (eda-keys list shows them)"
            )
        assert self._admission is not None
        self._admission.allowed = wanted

    def allows(self, name: str) -> bool:
        """Whether the trusted *name* is on the allow list (every name is without one):
        for a daemon that serves peers it connects to (an eda-lb worker and its brokers)."""
        assert self._admission is not None
        return self._admission.allowed is None or name in self._admission.allowed

    def peer_name(self, frame: Any) -> str | None:
        """The trusted name of the peer that sent *frame* (a :class:`zmq.Frame` received
        with ``copy=False``), from the key ZAP authenticated; None if it has none (a
        plain socket) or the key is no longer trusted.  What ACLs and allow lists use:
        the key proven by the CURVE handshake, never one a message claims."""
        key = peer_key(frame)
        return self.trusted.name_of(key.encode()) if key else None

    def pinned(self, text: str, option: str = "--connect") -> tuple[bytes, str]:
        """(server key, endpoint text) from ``NAME@ENDPOINT``, NAME a trusted name:
        how a user gives a secure ``--connect`` its server's key.  UsageError otherwise."""
        name, at, endpoint = text.partition("@")
        if not at:
            raise UsageError(
                f"{option} {text[:80]!r}: in secure mode name the server's trusted key:"
                " NAME@tcp://HOST:PORT (NAME as in eda-keys list)"
            )
        for trusted_name, key in self.trusted.items():
            if trusted_name == name:
                return key, endpoint
        raise UsageError(
            f"{option} {text[:80]!r}: {name[:64]!r} is not trusted (eda-keys trust NAME KEY)"
        )

    def trusts(self, key: str) -> str | None:
        """The name a peer's announced public key is trusted under, or None."""
        return self.trusted.name_of(key.encode()) if keys.is_key(key) else None


_active: Security | None = None


def enable(key_file: Path | None = None, trust_dir: Path | None = None) -> Security:
    """Turn secure mode on for this process: every socket made from now on uses CURVE.

    Reads the key pair and the trusted directory now, strictly:
    :class:`~eda.core.errors.ConfigError` (one line naming the file) when the
    key is missing or readable by others or a trusted key is malformed.
    """
    global _active
    identity = keys.load_identity(key_file or keys.default_key_file())
    trusted = Trusted(trust_dir or keys.default_trust_dir()).load()
    security = Security(identity, trusted)
    if _active is not None:
        sockets.remove_policy(_active.policy)
    sockets.add_policy(security.policy)
    _active = security
    return security


def disable() -> None:
    """Back to plain sockets (tests)."""
    global _active
    if _active is not None:
        sockets.remove_policy(_active.policy)
        for context_id in list(_active._authenticators):
            auth = _active._authenticators.pop(context_id)
            auth.stop()
    _active = None


def serving(sock: sockets.Socket) -> None:
    """Before the secure *sock* binds (a CURVE server): its context's ZAP handler runs,
    started once, so that only trusted keys get in.  With secure mode off there is no
    handler, and libzmq would admit every key: :class:`UsageError` then."""
    if _active is None:
        raise UsageError("a secure socket cannot serve with secure mode off")
    _active._authenticate(sock.context)


def active() -> Security | None:
    """The process's secure mode, or None (plain ZeroMQ, as without --secure)."""
    return _active


def admission(key: str) -> tuple[bytes | None, str]:
    """Whether a peer announcing *key* ("" when it is not secure) may be used by this
    process: (its key, b"" when plain ZeroMQ; None to skip it) and why it is skipped.
    Secure and insecure never mix, and a secure process uses trusted keys only."""
    active = _active
    if active is None:
        if key:
            return None, "it is in secure mode (--secure) and this program is not"
        return b"", ""
    if not key:
        return None, "it is not in secure mode"
    if active.trusts(key) is None:
        return None, f"its key {key} is not trusted (eda-keys trust NAME KEY)"
    return key.encode(), ""


def peer_key(frame: Any) -> str:
    """The Z85 public key ZAP authenticated for the connection *frame* came from
    ("" on a plain socket).  pyzmq's authenticator gives the client key as the
    connection's User-Id."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return ""
    text = user.decode(errors="replace") if isinstance(user, bytes) else str(user or "")
    return text if keys.is_key(text) else ""


def handshake_failure(event: int, value: int) -> str | None:
    """Why a secure handshake failed, from a socket monitor event, or None if it did not."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if value == 400:
            return "does not trust this key"
        return f"refused this key (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "failed the secure handshake (not the key announced, or not in secure mode)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "failed the secure handshake"
    return None
