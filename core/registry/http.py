"""The registry over HTTP (``eda-registry serve --http HOST:PORT``): a service in any
language registers, heartbeats and looks up with ``curl``.

Routes (JSON bodies; errors are ``application/problem+json``, RFC 9457)::

    POST   /v1/instances                 register: the record as eda-registry takes it
                                         ({"service", "host", "port", ...}) -> 201
                                         {"instance": {...}}, Location: /v1/instances/ID
    PUT    /v1/instances/ID/heartbeat    heartbeat (body optional: fields that change,
                                         e.g. {"status": "warning"}, or the whole
                                         record, which re-registers it after a registry
                                         restart) -> {"rev": N}
    DELETE /v1/instances/ID              deregister -> {}
    GET    /v1/instances/ID              one record -> {"instance": {...}}
    GET    /v1/instances[?service=NAME]  list -> {"instances": [...]}
    GET    /v1/services/NAME[?all]       lookup: passing instances only (every one with
                                         ``all``) -> {"instances": [...]}
    GET    /v1/events[?service=NAME]     the change stream as Server-Sent Events: one
                                         ``event: TYPE`` with the change (as
                                         ``eda-registry watch --json`` prints it) in
                                         ``data:``, ``id:`` its sequence number

Each request goes through the very handlers of the ZeroMQ API
(:meth:`eda.core.registry.server.Server` ``_op_*``, with the record validated
by :func:`.protocol.request_from`), so both APIs refuse, store and stream
alike; the bodies are the ZeroMQ replies without ``rid`` and ``ok``.

Secure mode: an HTTP client proves no key, so the API is served on a loopback
address only (anything else is a usage error), like the bus's own-host
operations; records registered over HTTP carry no key, and an instance
registered by a key cannot be heartbeated or deregistered over HTTP (403).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from .. import http, security
from ..endpoint import Endpoint
from ..errors import EdaError, NotFoundError, UsageError
from ..http import HttpError, Request, Response, Stream, json_response, sse
from . import protocol
from .model import InvalidRecord, validate_name
from .server import NotOwner, Server
from .store import RegistryFull

if TYPE_CHECKING:
    from .store import Event

MAX_STREAMS = 256  # change streams open at once


def http_address(text: str, what: str = "--http") -> Endpoint:
    """The address to serve HTTP on; in secure mode a loopback one only (UsageError)."""
    where = Endpoint.parse(text, what, default_host="127.0.0.1")
    if security.active() is not None and not is_loopback(where):
        raise UsageError(
            f"{what} {text}: in secure mode HTTP is served on a loopback address only "
            "(HTTP clients prove no key); use 127.0.0.1:PORT or [::1]:PORT"
        )
    return where


def is_loopback(where: Endpoint) -> bool:
    if where.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(where.host).is_loopback
    except ValueError:
        return False


class RegistryHttp:
    """Serves *registry*'s API on *address*, in the registry's own loop."""

    def __init__(self, registry: Server, address: str | Endpoint) -> None:
        self.registry = registry
        where = address if isinstance(address, Endpoint) else http_address(address)
        self.server = http.Server(registry, where, what="HTTP")
        self.streams: dict[Stream, str | None] = {}
        routes = (
            ("POST", "/v1/instances", self.register),
            ("PUT", "/v1/instances/{id}/heartbeat", self.heartbeat),
            ("DELETE", "/v1/instances/{id}", self.deregister),
            ("GET", "/v1/instances/{id}", self.get),
            ("GET", "/v1/instances", self.list),
            ("GET", "/v1/services/{name}", self.lookup),
            ("GET", "/v1/events", self.events),
        )
        for method, path, handler in routes:
            self.server.route(method, path, handler)
        registry.on_change.append(self._changed)

    @property
    def url(self) -> str:
        return self.server.url

    def _op(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Ask the ZeroMQ API's own handler for *msg*; its reply without rid and ok."""
        try:
            req = protocol.request_from(msg)
        except InvalidRecord as exc:
            raise HttpError(422, str(exc)[:500], title="Invalid registration") from None
        except EdaError as exc:
            raise HttpError(400, str(exc)[:500]) from None
        try:
            return dict(self.registry.service.handlers[msg["op"]](req))
        except InvalidRecord as exc:
            raise HttpError(409, str(exc)[:500]) from None
        except NotOwner as exc:
            raise HttpError(403, str(exc)[:500]) from None
        except RegistryFull as exc:
            raise HttpError(507, str(exc)[:500], title="Registry full") from None

    def _object(self, req: Request) -> dict[str, Any]:
        value = req.json()
        if not isinstance(value, dict):
            raise HttpError(400, "the body must be a JSON object")
        return value

    def register(self, req: Request) -> Response:
        reply = self._op({"op": "register", "instance": self._object(req)})
        location = f"/v1/instances/{reply['instance']['id']}"
        return json_response(201, reply, [("location", location)])

    def heartbeat(self, req: Request) -> Response:
        inst_id = req.params["id"]
        changes = self._object(req) if req.body.strip() else {}
        entry = self.registry.store.entries.get(inst_id)
        if entry is None and not {"service", "host", "port"} <= changes.keys():
            raise HttpError(404, f"no instance {inst_id!r}: register it again (POST "
                            "/v1/instances), or send the whole record")  # fmt: skip
        record = entry.inst.to_dict() if entry is not None else {}
        record.update(changes)
        record["id"] = inst_id
        return json_response(200, self._op({"op": "heartbeat", "instance": record}))

    def deregister(self, req: Request) -> Response:
        return json_response(200, self._op({"op": "deregister", "id": req.params["id"]}))

    def get(self, req: Request) -> Response:
        entry = self.registry.store.entries.get(req.params["id"])
        if entry is None:
            raise NotFoundError(f"no instance {req.params['id'][:80]!r}")
        return json_response(200, {"instance": entry.inst.to_dict()})

    def list(self, req: Request) -> Response:
        msg: dict[str, Any] = {"op": "list"}
        if req.arg("service") is not None:
            msg["service"] = req.arg("service")
        return json_response(200, self._op(msg))

    def lookup(self, req: Request) -> Response:
        every = req.arg("all") not in (None, "false", "0")
        return json_response(200, self._op({"op": "lookup", "service": req.params["name"],
                                            "all": every}))  # fmt: skip

    def events(self, req: Request) -> None:
        service = req.arg("service")
        if service is not None:
            try:
                service = validate_name(service)
            except InvalidRecord as exc:
                raise HttpError(400, str(exc)) from None
        if len(self.streams) >= MAX_STREAMS:
            raise HttpError(503, f"{MAX_STREAMS} change streams are open; try again later")
        stream = req.stream()
        self.streams[stream] = service
        stream.on_close = lambda: self.streams.pop(stream, None)
        stream.send(b": change stream of registry " + self.registry.id.encode() + b"\n\n")

    def _changed(self, event: Event) -> None:
        if not self.streams:
            return
        data = None
        for stream, service in list(self.streams.items()):
            if service is not None and event["service"] != service:
                continue
            if not stream.room():  # it reads nothing: cut, it reconnects and lists again
                stream.close()
                self.streams.pop(stream, None)
                continue
            if data is None:
                data = sse(http.dumps(event), id=event.get("seq"), event=event["type"])
            stream.send(data)

    def close(self) -> None:
        self.server.close()
