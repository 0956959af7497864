"""Connecting to NATS, with NATS's own security: the one place nats-py connects.

What secures a connection is a :class:`NatsAuth`: a credentials file (a user
JWT and its nkey seed, as ``nats --creds`` takes), an nkey seed file, a user
and password, or a token (these two also in a URL, ``nats://USER:PASS@HOST``
and ``nats://TOKEN@HOST``, as nats-py and the NATS CLI take them), and TLS
(``tls://`` URLs, a CA to verify the servers with, a client certificate).

:func:`prepare` checks all of it before anything connects: a missing,
unreadable or malformed file is a ConfigError naming it, two ways of
authenticating at once a UsageError.  It takes credentials out of the URLs,
so the URLs kept, and shown in every message, never carry a secret
(:func:`redact` shows a URL as a user gave it, password hidden).

:func:`connect` gives up at once where trying again cannot help: a server
that refuses the credentials, a TLS handshake that fails (a server
certificate the CA did not sign, a client certificate the server refuses),
a server without TLS when TLS was asked for (a password or token is handed
over on a TLS connection only, never in clear).  Anything else (a server not
up yet, a cluster electing) is retried within the caller's patience.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ...errors import ConfigError, UsageError
from ..engine import StoreError

HIDDEN = "***"  # what a password or token is shown as


def _not_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio logs a warning when a TLS peer closes a nats-py connection (its protocol
    asks to keep the half-closed socket, which TLS cannot): noise on stderr, not news."""
    return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_not_eof_noise)


@dataclasses.dataclass(frozen=True)
class NatsAuth:
    """How to authenticate to NATS and secure the connection (see the module docstring).

    At most one way of authenticating: *creds*, *nkey*, *user* with
    *password*, or *token*.  TLS is used when a URL says ``tls://`` or any
    ``tls_*`` file is given; *tls_key* may be left out when *tls_cert*
    holds the key too.
    """

    creds: Path | None = None
    nkey: Path | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def tls(self) -> bool:
        return any((self.tls_ca, self.tls_cert, self.tls_key))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`connect` uses: the servers without credentials, how to name them,
    what nats-py is given, and the secrets never to show."""

    servers: list[str]
    auth: NatsAuth  # credentials from the URLs folded in
    tls: bool  # asked for: every connection must be TLS
    context: ssl.SSLContext | None
    secrets: tuple[str, ...]

    @property
    def shown(self) -> str:
        return ",".join(self.servers)

    @property
    def credentials(self) -> bool:
        a = self.auth
        return any((a.creds, a.nkey, a.user, a.token))

    def scrub(self, text: str) -> str:
        """*text* with every secret hidden (nats-py's errors, in case one quotes it)."""
        for secret in self.secrets:
            text = text.replace(secret, HIDDEN)
        return text


_USERINFO = re.compile(r"(?<=://)([^/@,\s]*)@")


def redact(text: str) -> str:
    """URLs as given, with passwords and tokens hidden: ``nats://alice:***@host:4222``,
    ``nats://***@host``."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m[1].partition(":")
        return f"{user}:{HIDDEN}@" if colon else f"{HIDDEN}@"

    return _USERINFO.sub(hide, text)


def _split_userinfo(servers: Sequence[str]) -> tuple[list[str], set[tuple[str, str | None]]]:
    """The URLs without credentials, and the credentials they carried (unquoted)."""
    clean, found = [], set()
    for url in servers:
        m = _USERINFO.search(url)
        if m is None:
            clean.append(url)
            continue
        user, colon, password = m[1].partition(":")
        found.add((unquote(user), unquote(password) if colon else None))
        clean.append(url[: m.start()] + url[m.end() :])
    return clean, found


def prepare(servers: Sequence[str], auth: NatsAuth | None = None) -> Plan:
    """Check *auth* and the credentials in *servers* before connecting (see the module
    docstring): ConfigError for a file, UsageError for a combination."""
    auth = auth or NatsAuth()
    clean, found = _split_userinfo(servers)
    if len(found) > 1:
        raise UsageError("the NATS server URLs carry different credentials: give them once")
    if found:
        if any((auth.creds, auth.nkey, auth.user, auth.password, auth.token)):
            raise UsageError("NATS credentials both in a server URL and given apart: give one")
        user, password = found.pop()
        if password is None:
            auth = dataclasses.replace(auth, token=user)
        else:
            auth = dataclasses.replace(auth, user=user, password=password)
    if (auth.user is None) != (auth.password is None):
        raise UsageError("a NATS user needs its password, and a password its user")
    ways = [auth.creds, auth.nkey, auth.user, auth.token]
    if sum(w is not None for w in ways) > 1:
        raise UsageError(
            "more than one way to authenticate to NATS: give one of a credentials file, "
            "an nkey seed, a user and password, or a token"
        )
    if auth.creds is not None:
        _check_creds(auth.creds)
    if auth.nkey is not None:
        _check_seed(_read(auth.nkey, "NATS nkey seed file").decode(errors="replace").strip(),
                    f"NATS nkey seed file {auth.nkey}")  # fmt: skip
    tls = auth.tls or any(u.startswith("tls://") for u in clean)
    secrets = tuple(s for s in (auth.password, auth.token) if s)
    return Plan(clean, auth, tls, _tls_context(auth), secrets)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None


def _nkeys() -> Any:
    try:
        import nkeys  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the extra brings it
        raise UsageError("NATS nkeys need the nkeys package: pip install 'eda[nats]'") from None
    return nkeys


def _check_seed(seed: str, where: str) -> None:
    try:
        _nkeys().from_seed(bytearray(seed.encode()))
    except Exception:  # nkeys raises several kinds for a malformed seed
        raise ConfigError(f"{where}: not an nkey seed (SU..., as nsc or nk make)") from None


def _check_creds(path: Path) -> None:
    """A credentials file as nats-py reads it: the line after ``BEGIN NATS USER JWT``
    and the line after ``BEGIN USER NKEY SEED``."""
    lines = _read(path, "NATS credentials file").decode(errors="replace").splitlines()
    where = f"NATS credentials file {path}"

    def after(marker: str) -> str:
        for i, line in enumerate(lines[:-1]):
            if marker in line:
                return lines[i + 1].strip()
        raise ConfigError(f"{where}: no {marker} block (a .creds file of nsc or the NATS CLI)")

    if after("BEGIN NATS USER JWT").count(".") != 2:
        raise ConfigError(f"{where}: the user JWT is malformed")
    _check_seed(after("BEGIN USER NKEY SEED"), where)


def _tls_context(auth: NatsAuth) -> ssl.SSLContext | None:
    """The TLS context of *auth*'s files (None: nats-py's default, the system's CAs)."""
    if not auth.tls:
        return None
    if auth.tls_key is not None and auth.tls_cert is None:
        raise UsageError("a NATS TLS client key needs its certificate")
    context = ssl.create_default_context()
    if auth.tls_ca is not None:
        _read(auth.tls_ca, "NATS TLS CA file")
        try:
            context.load_verify_locations(cafile=str(auth.tls_ca))
        except (ssl.SSLError, ValueError):
            raise ConfigError(f"NATS TLS CA file {auth.tls_ca}: no PEM certificate in it") from None
    if auth.tls_cert is not None:
        _read(auth.tls_cert, "NATS TLS client certificate")
        if auth.tls_key is not None:
            _read(auth.tls_key, "NATS TLS client key")
        try:
            context.load_cert_chain(str(auth.tls_cert), str(auth.tls_key) if auth.tls_key else None)
        except (ssl.SSLError, ValueError) as exc:
            files = f"{auth.tls_cert}" + (f" and key {auth.tls_key}" if auth.tls_key else "")
            why = _said(exc) if isinstance(exc, ssl.SSLError) else exc
            raise ConfigError(f"NATS TLS client certificate {files}: {why}") from None
    return context


class _NotTls(Exception):
    """A server without TLS when TLS was asked for (escapes nats-py's retries)."""


def _hopeless(exc: BaseException, plan: Plan) -> str | None:
    """Why connecting cannot succeed by trying again, or None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or exc
        return (f"TLS with NATS at {plan.shown} failed: the server's certificate is not "
                f"trusted ({why})")  # fmt: skip
    if isinstance(exc, ssl.SSLError):
        why = _said(exc)
        if "alert" in why:  # the server ended the handshake
            hint = "; it may want a client certificate" if plan.auth.tls_cert is None else ""
            return f"TLS with NATS at {plan.shown} failed: the server refused it ({why}{hint})"
        return f"TLS with NATS at {plan.shown} failed: {why}"
    m = re.search(r"'((?:\w+ )?(?:Authorization Violation|Authentication (?:Expired|Revoked)))'",
                  str(exc))  # fmt: skip
    if m is None:
        return None
    if not plan.credentials:
        return f"NATS at {plan.shown} wants credentials and none were given ({m[1]})"
    return f"NATS at {plan.shown} refused the credentials ({m[1]})"


def _said(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words: ``KEY_VALUES_MISMATCH`` as ``key values mismatch``."""
    reason = exc.reason or ""
    return reason.lower().replace("_", " ") if reason else str(exc)


def _options(plan: Plan, nc: Any) -> dict[str, Any]:
    """nats-py's keyword arguments for *plan*'s security; a password or token is
    handed over on a TLS connection only when TLS was asked for."""
    a = plan.auth
    opts: dict[str, Any] = {}
    if plan.context is not None:
        opts["tls"] = plan.context

    def guarded(secret: str) -> str | Callable[[], str]:
        if not plan.tls:
            return secret

        def give() -> str:
            if not _on_tls(nc):
                raise _NotTls()
            return secret

        return give

    if a.creds is not None:
        opts["user_credentials"] = str(a.creds)
    elif a.nkey is not None:
        opts["nkeys_seed"] = str(a.nkey)
    elif a.user is not None and a.password is not None:
        opts["user"], opts["password"] = a.user, guarded(a.password)
    elif a.token is not None:
        opts["token"] = guarded(a.token)
    return opts


def _on_tls(nc: Any) -> bool:
    """Whether nats-py upgraded this connection to TLS (it does when the server's
    INFO requires it, whatever the URL said)."""
    return bool(getattr(nc, "_server_info", {}).get("tls_required"))


async def connect(plan: Plan, timeout: float, errors: list[str], **options: Any) -> Any:
    """A connected nats-py client for *plan* (other nats-py *options* as given);
    StoreError when the servers cannot be reached within *timeout*, at once when
    they refuse (see the module docstring).  *errors* keeps the client's last
    connection errors, secrets hidden (it reconnects by itself once connected)."""
    from nats.aio.client import Client

    nc = Client()
    opened = False
    refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        errors[:] = [*errors[-9:], plan.scrub(str(exc) or type(exc).__name__)]
        why = None if opened else _hopeless(exc, plan)
        if why is not None and not refused.done():
            refused.set_result(why)

    task: asyncio.Future[Any] = asyncio.ensure_future(
        nc.connect(servers=plan.servers, error_cb=on_error, **options, **_options(plan, nc))
    )
    why: str | None = None
    try:
        done, _ = await asyncio.wait({task, refused}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if task in done:
            task.result()
            opened = True
            if plan.tls and not _on_tls(nc):
                raise _NotTls()
            return nc
        why = str(refused.result()) if refused.done() else None
    except _NotTls:
        why = f"NATS at {plan.shown} does not offer TLS, which was asked for: no secret was sent"
    except Exception as exc:  # nats-py raises several kinds here
        why = f"cannot reach NATS at {plan.shown}: {plan.scrub(str(exc) or type(exc).__name__)}"
    finally:
        if not opened or why is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)
    last = errors[-1] if errors else "no answer in time"
    raise StoreError(why or f"cannot reach NATS at {plan.shown}: {last}")


__all__ = ["HIDDEN", "NatsAuth", "Plan", "connect", "prepare", "redact"]
