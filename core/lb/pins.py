"""Secure mode in eda-lb: which instances found may be used, each pinned to its key.

Callers (their workers, or brokers with ``via``), workers (their brokers) and
``eda-lb stats`` find instances in the registry, whose record carries the
key the registry's CURVE handshake proved for the registrant
(:attr:`~eda.core.registry.model.Instance.key`), or by mDNS (the
announcement's ``k=``).  :func:`usable` keeps those this process may talk to
(:func:`eda.core.security.admission`: secure and insecure never mix, and a
secure process uses trusted keys only) and pins each one's key
(:func:`eda.core.reqrep.pin`); the sockets are then connected with
:func:`eda.core.reqrep.pinned_key` of their endpoint.  An endpoint the user
gives names its key, ``NAME@tcp://HOST:PORT`` (:func:`eda.core.reqrep.given`).

A worker's ``--allow`` says which trusted keys may call it: a broker is one
of its callers (it forwards other callers' requests), so a worker serves only
the brokers whose key is allowed (*callers* below), or a trusted caller
refused by the worker could go round through a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import reqrep, security
from ..endpoint import Endpoint
from ..errors import UsageError
from ..registry.model import Instance


@dataclass(frozen=True)
class Skipped:
    """An instance left out, as secure mode's reports name a peer (id, endpoint, key)."""

    id: str
    endpoint: str
    key: str


Ignored = Callable[[Skipped, str], None]


def address(inst: Instance) -> Endpoint | None:
    """Where callers reach *inst* (a worker, or a broker's frontend)."""
    return Endpoint(inst.host, inst.port)


def usable(
    found: Iterable[Instance],
    on_ignored: Ignored | None = None,
    *,
    where: Callable[[Instance], Endpoint | None] = address,
    callers: bool = False,
) -> list[Instance]:
    """The instances of *found* this process may use, each one's key pinned at *where*
    it is reached; *on_ignored* hears of the others, with why.  With *callers*, the
    instances will send this process requests: in secure mode their key must also be
    on its allow list (``--allow``)."""
    kept = []
    active = security.active()
    for inst in found:
        endpoint = where(inst)
        if endpoint is None:
            continue
        key, why = security.admission(inst.key)
        if key is not None and key and callers and active is not None:
            name = active.trusts(inst.key) or ""
            if not active.allows(name):
                key, why = None, f"its key {name!r} is not allowed to call (--allow)"
        if key is None:
            if on_ignored is not None:
                on_ignored(Skipped(inst.id, endpoint.zmq, inst.key), why)
            continue
        if key:
            reqrep.pin(endpoint, key)
        kept.append(inst)
    return kept


def given(text: str, what: str, option: str, *, caller: bool = False) -> Endpoint:
    """An endpoint the user gave with *option* (``NAME@tcp://HOST:PORT`` in secure mode,
    its key pinned); with *caller*, the peer there will call this process (a worker's
    broker): its name must be on the allow list.  :class:`UsageError` otherwise."""
    active = security.active()
    if active is None and "@" in text:
        raise UsageError(
            f"{option} {text[:80]!r}: NAME@ names the server's trusted key, with --secure only"
        )
    endpoint = reqrep.given(text, what, option)
    if caller and active is not None:
        key = reqrep.pinned_key(endpoint) or b""
        name = active.trusted.name_of(key) or ""
        if not active.allows(name):
            raise UsageError(
                f"{option} {text[:80]!r}: {name!r} is not in --allow (a broker calls this worker)"
            )
    return endpoint
