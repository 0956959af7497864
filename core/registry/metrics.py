"""The registry's metrics, and Prometheus HTTP service discovery of every eda daemon.

:func:`families` is what ``eda-registry serve --metrics`` exports (read at
scrape time from the store and the server's counters).  :func:`routes` adds,
on the same port, Prometheus's HTTP SD format: ``GET /v1/prometheus-sd`` lists
every registered instance that serves metrics (its meta
``metrics=HOST:PORT``, :data:`eda.core.metrics.META_KEY`), and this registry
itself; ``/v1/prometheus-sd/SERVICE`` those of one service.  One target group
per instance, labelled ``__meta_eda_service``, ``__meta_eda_instance``,
``__meta_eda_status``, ``__meta_eda_role``, ``__meta_eda_registry``.

Why the ``--metrics`` port and not ``--http``: the SD is for Prometheus, which
already scrapes this port; it works without the registry's HTTP API (which a
secure registry may keep off), and reads nothing a scrape does not show.
A ``metrics`` value is a peer's input: checked (:func:`eda.core.metrics.target`)
and left out when it names no endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import metrics
from .model import STATUSES, InvalidRecord, validate_name
from .store import DEREGISTERED, EXPIRED, HEALTH, REGISTERED, UPDATED

if TYPE_CHECKING:
    from .server import Server

SD_PATH = "/v1/prometheus-sd"
SELF_SERVICE = "eda-registry"  # the service name this registry's own target carries


def families(server: Server) -> Iterator[Any]:
    """What ``eda-registry serve --metrics`` exports."""
    counted = server.counted
    instances = GaugeMetricFamily(
        "eda_registry_instances", "Registered instances, by service and health.",
        labels=["service", "status"],
    )  # fmt: skip
    for service, group in sorted(server.store.services.items()):
        by_status = dict.fromkeys(STATUSES, 0)
        for entry in group.values():
            by_status[entry.inst.status] = by_status.get(entry.inst.status, 0) + 1
        for status, n in by_status.items():
            instances.add_metric([service, status], n)
    yield instances
    counter, gauge = metrics.counter, metrics.gauge
    yield counter("eda_registry_heartbeats", "Heartbeats received from registered instances.",
                  counted["heartbeat"])
    yield counter("eda_registry_registrations", "Registration requests received.",
                  counted["register"])
    changes = CounterMetricFamily(
        "eda_registry_changes", "Changes on the change stream, by kind (expired: no heartbeat "
        "within its TTL).", labels=["kind"],
    )  # fmt: skip
    for kind in (REGISTERED, DEREGISTERED, EXPIRED, HEALTH, UPDATED):
        changes.add_metric([kind], counted[kind])
    yield changes
    yield counter("eda_registry_requests", "Requests answered.", server.service.requests)
    yield counter("eda_registry_refused_registrations", "Registrations of new instances "
                  "refused because the registry held --max-instances.",
                  server.store.refused_full)  # fmt: skip
    peers = GaugeMetricFamily(
        "eda_registry_peers", "Peer registries, by state.", labels=["state"]
    )
    alive = sum(1 for link in server.links.values() if link.alive)
    peers.add_metric(["alive"], alive)
    peers.add_metric(["silent"], len(server.links) - alive)
    yield peers
    yield gauge("eda_registry_change_sequence", "Sequence number of the last change.",
                server.store.seq)
    yield gauge("eda_registry_data_bytes", "Disk use of --data (change log and snapshots).",
                metrics.directory_bytes(server.settings.data))
    yield from metrics.daemon_families("registry", server)


# -- Prometheus HTTP service discovery --------------------------------------------------
def sd_groups(server: Server, service: str | None = None) -> list[dict[str, Any]]:
    """Prometheus HTTP SD target groups: instances (of *service*, or all) serving metrics,
    and this registry itself when it does (service ``eda-registry``)."""
    groups = []
    own = metrics.meta()
    if own and service in (None, SELF_SERVICE):
        where = own[0].partition("=")[2]
        host = _own_host(server)
        found = metrics.target(where, host)
        if found:
            groups.append(_group(found, SELF_SERVICE, f"registry-{server.id}", "passing",
                                 "registry", server.id))  # fmt: skip
    for inst in server.store.instances(service):
        given = inst.meta.get(metrics.META_KEY)
        found = metrics.target(given, inst.host) if given else None
        if found:
            role = inst.meta.get("role", "")
            groups.append(_group(found, inst.service, inst.id, inst.status, role, inst.registry))
    return groups


def _own_host(server: Server) -> str:
    """Where this registry is reached: its bind address, else its interface's, else
    this host's first address (a wildcard bind)."""
    from ..discovery import local_addresses
    from ..endpoint import Endpoint

    bound = Endpoint.from_peer(server.endpoint)
    if bound is not None and bound.host not in ("0.0.0.0", "::"):
        return bound.bracketed
    return server.settings.interface or local_addresses(None)[0]


def _group(
    target: str, service: str, inst_id: str, status: str, role: str, registry: str
) -> dict[str, Any]:
    return {
        "targets": [target],
        "labels": {
            "__meta_eda_service": service,
            "__meta_eda_instance": inst_id,
            "__meta_eda_status": status,
            "__meta_eda_role": role,
            "__meta_eda_registry": registry,
        },
    }


def respond(server: Server, request: Any) -> Any:
    """``GET /v1/prometheus-sd[/SERVICE]``: the target groups as JSON (404, as
    problem+json, for a path that names no service)."""
    from ..http import json_response, problem

    service: str | None = request.params.get("service")
    if service is not None:
        try:
            service = validate_name(service)
        except InvalidRecord as exc:
            return problem(404, f"no such service: {exc}")
    return json_response(200, sd_groups(server, service))


def routes(server: Server) -> list[tuple[str, str, Any]]:
    """The SD routes on the metrics port."""
    def handler(request: Any) -> Any:
        return respond(server, request)

    return [("GET", SD_PATH, handler), ("GET", SD_PATH + "/{service}", handler)]
