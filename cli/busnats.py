"""The NATS engine's options of ``eda-bus serve`` and ``eda-bus migrate``.

The servers (``--engine`` / ``--to``: ``nats://`` or ``tls://`` URLs, with
credentials or not), the stream and its replicas, and NATS's own security
(credentials file, nkey seed, user and password, token, TLS with a CA and a
client certificate), handed to the command as one
:class:`eda.core.bus.nats.NatsAuth` checked by the engine before it connects.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import click

from eda.core.errors import UsageError


def nats_servers(text: str) -> list[str]:
    """``nats://[USER:PASS@|TOKEN@]HOST:PORT[,nats://...]`` as a list of server URLs
    (``tls://`` for TLS); a URL in an error has its password hidden."""
    from eda.core.bus.nats.connect import redact

    urls = [u.strip() for u in text.split(",")]
    for url in urls:
        m = re.fullmatch(r"(nats|tls)://(?:[^\s/@,]+@)?([^\s/:@,]+|\[[0-9a-fA-F:.]+\])(:\d{1,5})?",
                         url)  # fmt: skip
        if not m or (m[3] and not 0 < int(m[3][1:]) < 65536):
            raise UsageError(
                f"bad NATS server {redact(url)!r}: use nats://HOST:PORT[,nats://HOST:PORT...]"
            )
    return urls


def engine_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--engine``/``--to``: the NATS servers, or None for the embedded store."""
    return None if value in (None, "sqlite") else nats_servers(value)


_NATS_FILE = click.Path(dir_okay=False)  # checked by the engine: one line naming the file


def _nats_auth_options(func: Any) -> Any:
    """NATS's own security for the NATS engine, given to the command as one
    ``nats_auth`` (an :class:`eda.core.bus.nats.NatsAuth`)."""

    @functools.wraps(func)
    def wrapped(
        *args: Any,
        nats_creds: str | None,
        nats_nkey: str | None,
        nats_user: str | None,
        nats_password: str | None,
        nats_token: str | None,
        nats_tls_ca: str | None,
        nats_tls_cert: str | None,
        nats_tls_key: str | None,
        **kwargs: Any,
    ) -> Any:
        from pathlib import Path

        from eda.core.bus.nats.connect import NatsAuth

        def path(given: str | None) -> Path | None:
            return None if given is None else Path(given)

        auth = NatsAuth(creds=path(nats_creds), nkey=path(nats_nkey), user=nats_user,
                        password=nats_password, token=nats_token, tls_ca=path(nats_tls_ca),
                        tls_cert=path(nats_tls_cert), tls_key=path(nats_tls_key))  # fmt: skip
        return func(*args, nats_auth=auth, **kwargs)

    options = [
        ("--nats-creds", _NATS_FILE, "FILE",
         "NATS engine: a credentials file (user JWT and nkey seed: a .creds file of nsc)."),
        ("--nats-nkey", _NATS_FILE, "FILE",
         "NATS engine: an nkey seed file (SU..., for a server's nkey users)."),
        ("--nats-user", None, "NAME",
         "NATS engine: user name, with --nats-password (or nats://USER:PASSWORD@HOST)."),
        ("--nats-password", None, "PASSWORD",
         "NATS engine: the user's password; a command line shows in ps, so prefer "
         "EDA_BUS_NATS_PASSWORD or the config file."),
        ("--nats-token", None, "TOKEN",
         "NATS engine: an authentication token (or nats://TOKEN@HOST); prefer "
         "EDA_BUS_NATS_TOKEN or the config file."),
        ("--nats-tls-ca", _NATS_FILE, "FILE",
         "NATS engine: verify the servers' certificates with this CA (PEM); TLS is then "
         "required, as with tls:// URLs."),
        ("--nats-tls-cert", _NATS_FILE, "FILE",
         "NATS engine: client certificate (PEM), for servers that verify clients."),
        ("--nats-tls-key", _NATS_FILE, "FILE",
         "NATS engine: the client certificate's key (PEM; default: in --nats-tls-cert)."),
    ]  # fmt: skip
    for name, kind, metavar, help_text in reversed(options):
        wrapped = click.option(name, type=kind, metavar=metavar, help=help_text)(wrapped)
    return wrapped


def nats_options(func: Any) -> Any:
    """--stream, --replicas, --nats-format and NATS's own security (:func:`_nats_auth_options`)."""
    func = click.option(
        "--nats-format",
        "nats_format",
        type=click.Choice(["eda", "cloudevents"]),
        default=None,
        help="NATS engine: how the stream holds events.  eda (default when created): one "
        "message per batch, the fastest; cloudevents: one message per event in the "
        "CloudEvents NATS binding (ce- headers, the data as the body; an envelope in "
        "structured mode), which any NATS client or CloudEvents SDK reads.  Chosen when the "
        "stream is created; leave it out to use the stream's.",
    )(func)
    func = click.option(
        "--stream",
        default="EDA",
        show_default=True,
        metavar="NAME",
        help="NATS engine: the JetStream stream (subjects eda.<topic>, so one per NATS account).",
    )(func)
    func = _nats_auth_options(func)
    return click.option(
        "--replicas",
        type=click.IntRange(1, 5),
        default=None,
        metavar="N",
        help="NATS engine: copies of the stream (3 survives a lost node; 1 when created "
        "without it).  Given for an existing stream, it changes the stream in place, as the "
        "retention limits of serve do.",
    )(func)
