"""The eda-bus daemon: confirmed publishing into an engine, replay and live delivery out of it.

One ROUTER socket serves every client (:mod:`.protocol`).  The loop, per round:

* take in a bounded batch of messages; publish batches are checked
  (:func:`eda.core.codec.decode`) and appended; requests answered;
* commit once (group commit: one fsync covers every batch of the round) and
  only then confirm the batches it covered; any other commit or write of the
  round that fails (a subscription's, an ack's...) refuses (retry) at once the
  batches its rollback took;
* pump the subscriptions (:mod:`.delivery`).

:class:`BusServer` is that loop and its confirmations; the rest of the daemon
is one module per subject, each a layer of the class:
:mod:`.connections` (the ROUTER's clients: where a message came from, hanging
up, counting connections), :mod:`.delivery` (subscriptions: replay and live,
credit, group claims under ``max_pending``, dropping the silent),
:mod:`.requests` (subscribe, ack, stats, retain, drop), :mod:`.peerinput`
(what a peer may send in a request) and :mod:`.acl` (secure mode's ``--acl``:
what each trusted key may do, checked per batch and per request).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from .. import codec, security
from ..daemon import Log, port_of
from ..errors import EdaError, ProtocolError, UsageError
from ..limits import QueuedBytes, raise_fd_limit
from ..reqrep import encode, error_reply, split_envelope
from . import protocol as p
from .acl import Acl, Forbidden
from .delivery import CUT_AFTER, Subscription
from .engine import Engine, EventTooLargeError, StoreError
from .requests import Answering
from .streams import check_publisher

SEND_HWM = 256  # messages queued per client on the ROUTER
HANDSHAKE_MS = 5000  # a connection that has not completed the ZMTP greeting by then is closed
FD_RESERVE = 64  # descriptors kept for the store, discovery and the sockets of the bus itself
ACL_EVERY = 0.5  # s between two looks at the ACL file and the trusted keys (changed: re-read)


@dataclass
class Settings:
    bind: str = "tcp://*:0"
    max_age: float | None = None
    max_bytes: int | None = None
    retain_every: float = 60.0
    mdns: bool = True
    name: str = ""
    max_connections: int = 0  # 0: as many as the descriptor limit allows
    client_bytes: int = 64 << 20  # queued for one client (JetStream cuts a slow consumer there)
    queued_bytes: int = 512 << 20  # queued for all clients together
    port_file: str | None = None  # where the port is remembered across restarts
    acl: Acl | None = None  # secure mode's rights by name (.acl.open_acl); None: trusted may all


class BusServer(Answering):
    """Serves one engine on one ROUTER socket."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        log: Log = lambda _m: None,
        warn: Log | None = None,
        interface: str | None = None,
        max_message: int = 4 << 20,
    ) -> None:
        super().__init__(log, warn, interface=interface)
        self.engine = engine
        self.settings = settings
        self.acl = settings.acl
        if self.acl is not None:
            self._untrusted_names(self.acl)
        self._accesses, self._readers = {}, {}
        self._trusted: tuple[tuple[str, bytes], ...] = ()  # the trusted keys, as last seen
        self.sock = self.socket(zmq.ROUTER, max_message=max_message)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        self.max_connections = settings.max_connections or max(16, raise_fd_limit() - FD_RESERVE)
        self.connections: set[int] = set()
        self._watch_connections()
        self.endpoint = self.bind_remembered(self.sock, settings.bind, settings.port_file)
        self.queued = QueuedBytes(settings.client_bytes, settings.queued_bytes)
        self._sender: zmq.Frame | None = None  # a frame of the message being handled
        self._own: set[str] = set()
        self.cut = 0  # subscribers cut off for not reading
        self.lost = self.delivered_before = 0  # (core/bus/metrics.py)
        self.subs: dict[bytes, Subscription] = {}
        self.confirmed = 0
        self._waiting: list[tuple[bytes, int, int]] = []  # (client, tag, confirm_at) this round
        self._safe = 0  # durable_seq after the round's last message that did not fail
        self.refused = 0
        self._durable = engine.durable_seq
        self._groups_dirty = True
        # the HTTP front (.http): settles its own appends before each round, and is told
        # of each new durable sequence (its streams deliver from the store too)
        self.before_round: list[Callable[[], object]] = []
        self.on_durable: list[Callable[[int], object]] = []
        self.watch(self.sock, "clients", self.drain)
        self.every(0.05, "delivery", self._retry)
        self.every(1.0, "heartbeats", self._check_gone)
        self.every(1.0, "room for readers", self._make_room)
        if engine.shared:  # a shared store (NATS): other fronts write to it too
            self.every(0.2, "others' writes", self._refresh)
        if settings.max_age is not None or settings.max_bytes is not None:
            self.every(settings.retain_every, "retention", self._retain, first=0.0)
        if self.acl is not None:
            self.every(ACL_EVERY, "acl", self._check_acl, first=ACL_EVERY)
        self._releasing: Any = None
        self._try_release_all()

    def metrics(self) -> Iterator[Any]:
        """What --metrics exports (core/bus/metrics.py)."""
        from .metrics import families

        return families(self)

    def _untrusted_names(self, acl: Acl) -> None:
        secure = security.active()
        names = [name for name, _ in secure.trusted.items()] if secure is not None else []
        for name in acl.unknown(names)[:5]:
            self.warn(f"warning: ACL file {acl.path}: {name!r} is not a trusted name"
                      " (eda-keys list): its table gives nobody anything yet")  # fmt: skip

    def _check_acl(self) -> None:
        """Forget the rights given so far and re-read the ACL file if it changed (a
        malformed edit keeps the rights read before); when it or the trusted keys
        changed, end the subscriptions they no longer allow."""
        self._accesses.clear()
        self._readers = {i: key for i, key in self._readers.items() if i in self.subs}
        secure, acl = security.active(), self.acl
        trusted = tuple(secure.trusted.items()) if secure is not None else ()
        changed, self._trusted = trusted != self._trusted, trusted
        if acl is not None and acl.changed():
            try:
                acl.reload()
            except EdaError as exc:
                self.warn(f"warning: {exc}; keeping the rights read before")
            else:
                changed = True
                self._untrusted_names(acl)
                self.log(f"ACL file {acl.path} read again: {len(acl.tables)} table(s)")
        if changed:
            self._recheck_subscriptions()

    def _recheck_subscriptions(self) -> None:
        """End each subscription its key may no longer read, telling its client why."""
        for ident, sub in list(self.subs.items()):
            try:
                self._access_for(self._readers.get(ident, "")).read(sub.matcher.patterns)
            except Forbidden as exc:
                self._send(ident, [p.ANSWER, encode(error_reply(None, exc))])
                self._drop(ident)
                self.log(f"subscription {ident.hex()} ended: {exc}")

    def _try_release_all(self) -> None:
        """:meth:`_release_all`, retried every 2 s while the store cannot answer yet
        (a JetStream cluster electing leaders after losing a node): the bus serves
        meanwhile, and what dead members held waits for the release."""
        try:
            self._release_all()
        except StoreError as exc:
            if self._releasing is None:
                self.warn(f"warning: group members' events not released yet ({exc}); retrying")
                self._releasing = self.every(2.0, "release", self._try_release_all, first=2.0)
            return
        if self._releasing is not None:
            self._releasing.cancel()
            self._releasing = None
            self.log("group members' events released")

    def _make_room(self) -> None:
        """The bound on what is queued for all clients (``--max-queued``) held back a
        client within its own bound: cut off every subscriber that has left what was
        queued for it untaken for :data:`~.delivery.CUT_AFTER` seconds.

        Stuck clients must not hold the shared budget for good while the ones that
        read wait: without this, a crowd of stuck clients that want nothing more
        (so never wait on their own bound, the other cut) would leave every other
        subscriber one event per credit it grants.  A client that reads grants
        credit for what it took at least every heartbeat, which frees its oldest.
        """
        queued = self.queued
        if not queued.crowded:
            return
        queued.crowded = False
        now = time.monotonic()
        for ident, sub in list(self.subs.items()):
            since = queued.untaken_since(ident)
            if since is not None and now - since > CUT_AFTER:
                limit = self.settings.queued_bytes
                self._cut_off(sub, f"{queued.held(ident)} bytes queued and none taken for "
                              f"{CUT_AFTER:g}s while the bus's queue for all clients "
                              f"({limit} bytes) holds others back")  # fmt: skip

    def _refresh(self) -> None:
        """Deliver what other fronts of a shared store stored (the store tells its durable_seq)."""
        try:
            durable = self.engine.refresh()
        except StoreError:
            return  # unreachable for now: publishing and stats report it
        if durable != self._durable:
            self.committed(durable)

    @property
    def port(self) -> int:
        return port_of(self.endpoint)

    def start(self) -> None:
        if self.settings.mdns:
            name = self.settings.name or f"bus-{self.port}"
            secure = security.active()  # secure mode: clients pin the key announced
            self.announce(
                p.BUS_TYPE,
                name,
                self.port,
                [f"id={name}", f"v={codec.VERSION}"],
                key=secure.public_key if secure is not None else None,
                on_ready=lambda: self.log(f"announced bus {name} by mDNS"),
            )

    def _release_all(self) -> None:
        """After a restart no group member is live: what they held goes to the next claims."""
        for consumer in self.engine.stats().consumers:
            if consumer.kind == "group":
                for member in self.engine.held(consumer.name):
                    if member:
                        self.engine.release(consumer.name, member)
        self.engine.commit()

    # -- input -------------------------------------------------------------------
    def drain(self) -> None:
        """One round: take in a bounded batch of messages, commit, confirm, pump.

        A confirmation only ever follows the commit that covers it.  Each batch
        appended this round waits in :attr:`_waiting` with the bus sequence that
        must be durable first; whatever else shares the round (a subscription's
        commit, an ack, a retention pass, a release) may fail and roll the open
        transaction back, and then the batches it took with it are refused
        (retry) at once (:meth:`_rolled_back`).  Each message is handled on its
        own: whatever one raises, the others' work goes on.
        """
        for step in self.before_round:
            self.guarded("before a round", step)
        self._waiting = []
        self._safe = self.engine.durable_seq
        for frames in self._incoming():  # each noting where it came from
            self.guarded("message", self._take, frames)
            self._safe = self.engine.durable_seq
            if self.engine.round_full:  # the rest waits for the next round
                break
        waiting, self._waiting = self._waiting, []
        try:
            durable = self.engine.commit()
        except StoreError as exc:
            self.limited("commit", f"commit failed: {exc}")
            self._answer(waiting, self._safe, exc)
            return
        self._answer(waiting, durable, StoreError("the batch was not covered by a commit"))
        self.committed(durable)

    def committed(self, durable: int) -> None:
        """After a commit (a round's, or the HTTP front's): deliver up to *durable*."""
        if durable != self._durable:
            self._durable = durable
            self._groups_dirty = True
            for listener in self.on_durable:
                self.guarded("durable listener", listener, durable)
        self.pump()

    def _commit(self) -> int:
        """Commit mid-round (a request's own writes): the batches it made durable are
        safe from a rollback later in the round, even within the same message."""
        durable = self.engine.commit()
        self._safe = max(self._safe, durable)
        return durable

    def _take(self, frames: list[bytes]) -> None:
        envelope, body = split_envelope(frames, (p.PUBLISH, p.REQUEST))
        if not body:
            return
        ident, route, kind = envelope[0], envelope[1:], body[0]
        if route:  # a REQ socket: one request, one reply, nothing streamed
            if kind == p.REQUEST:
                self._request(ident, body[1:], route)
            else:
                exc = ProtocolError("a REQ socket may only send requests")
                self.dropped("message", exc)
                self._send(ident, [p.ANSWER, encode(error_reply(None, exc))], route)
        elif kind == p.PUBLISH:
            self._publish(ident, body[1:])
        elif kind == p.REQUEST:
            self._request(ident, body[1:])
        else:
            self.dropped("message", ProtocolError(f"unknown message kind {kind[:8]!r}"))

    def _answer(self, waiting: list[tuple[bytes, int, int]], durable: int, exc: Exception) -> None:
        """Confirm the batches *durable* covers; refuse (retry) the others."""
        confirms: dict[bytes, list[int]] = {}
        for ident, tag, confirm_at in waiting:
            if confirm_at <= durable:
                confirms.setdefault(ident, []).append(tag)
            else:
                self._refuse(ident, tag, exc, retry=True)
        for ident, tags in confirms.items():
            self.confirmed += len(tags)
            self._send(ident, [p.CONFIRM, p.pack_tags(tags)])

    def _rolled_back(self, exc: StoreError) -> None:
        """The store failed mid-round and rolled back what was not committed: refuse
        (retry) the batches waiting that no commit covered before this message (the
        store's ``durable_seq`` after a failure may count others' writes: a shared
        NATS stream re-read).  Done at once, so a later append that reuses their bus
        sequences cannot be taken for them."""
        kept = []
        for ident, tag, confirm_at in self._waiting:
            if confirm_at <= self._safe:
                kept.append((ident, tag, confirm_at))
            else:
                self._refuse(ident, tag, exc, retry=True)
        self._waiting = kept

    def _publish(self, ident: bytes, frames: list[bytes]) -> None:
        if len(frames) < 4 or len(frames[0]) != 8:
            self.dropped("publish", ProtocolError("publish message without tag and batch"))
            return
        (tag,) = p.TAG.unpack(frames[0])
        try:
            batch = codec.decode(frames[1:])
            check_publisher(batch.pubid)
            if self.acl is not None:
                self._access().publish(batch.topic)
            (receipt,) = self.engine.append([batch])
        except (codec.WireError, EventTooLargeError, UsageError) as exc:
            self.dropped("batch", exc)
            self._refuse(ident, tag, exc, retry=False)
            return
        except Forbidden as exc:
            self.limited("acl", f"refused a batch: {exc}")
            self._refuse(ident, tag, exc, retry=False)
            return
        except StoreError as exc:  # full disk, I/O: what this round appended was rolled back
            self.limited("store", f"cannot store: {exc}")
            self._rolled_back(exc)
            self._refuse(ident, tag, exc, retry=True)
            return
        except Exception as exc:  # a bug: say so, refuse this batch, serve the others
            self.failures += 1
            self.limited("publish", f"publish failed: {type(exc).__name__}: {exc}"[:300])
            self._refuse(ident, tag, EdaError("the bus failed to store the batch"), retry=False)
            return
        self._waiting.append((ident, tag, receipt.confirm_at))

    def _refuse(self, ident: bytes, tag: int, exc: Exception, *, retry: bool) -> None:
        self.refused += 1
        code = exc.exit_code if isinstance(exc, EdaError) else 1
        body = encode({"error": str(exc)[:300], "code": code, "retry": retry})
        self._send(ident, [p.REFUSED, p.TAG.pack(tag), body])

    def _retain(self) -> None:
        done = self.engine.retain(self.settings.max_age, self.settings.max_bytes)
        self._commit()
        if done.events:
            self.log(f"retention removed {done.events} event(s), {done.bytes} bytes")

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError, AttributeError):
            self.sock.disable_monitor()
        super().close()
        secure = security.active()
        if secure is not None:
            secure.release(self.zctx)  # its ZAP handler, before the context ends
        with contextlib.suppress(StoreError):
            self.engine.close()
