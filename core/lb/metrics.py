"""What ``eda-lb worker``, ``serve`` and ``tcp`` export with ``--metrics`` (core/metrics.py).

The figures ``eda-lb stats`` shows, read at scrape time, plus the one thing
they lack: a cumulative latency histogram per instance (the ``Histogram``
each worker and each broker's worker entry observes once per reply).
A broker's per-worker series are labelled ``worker`` and a proxy's
``backend``, with the instance's registered id (``instance`` is Prometheus's
own target label); a broker lists at most :data:`MAX_LISTED` workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import metrics
from .stats import MAX_LISTED

if TYPE_CHECKING:
    from .broker import Broker
    from .worker import Worker

WORKER_STATES = ("healthy", "slow-start", "ejected", "dead")


def broker_families(broker: Broker) -> Iterator[Any]:
    """``eda-lb serve``: requests in, answers out, retries, expiries, queue, and per worker
    its requests, errors, load, state and latency histogram."""
    p = "eda_lb_broker_"
    counter, gauge = metrics.counter, metrics.gauge
    yield counter(p + "requests", "Requests accepted from callers.", broker.requests)
    yield counter(p + "replies", "Replies sent to callers (errors included).", broker.answered)
    yield counter(p + "errors", "Error replies sent to callers.", broker.errors)
    yield counter(p + "refused", "Requests refused busy (queue full).", broker.refused)
    yield counter(p + "retries", "Requests sent again (a worker died, was busy or failed).",
                  broker.retried)  # fmt: skip
    yield counter(p + "expired", "Requests whose deadline passed before a reply.",
                  broker.expired)  # fmt: skip
    yield counter(p + "ejections", "Workers ejected for consecutive failures.",
                  broker.balancer.ejections)  # fmt: skip
    yield gauge(p + "inflight_requests", "Requests at workers now.", broker.inflight)
    yield gauge(p + "queued_requests", "Requests waiting for a free worker.", len(broker.queue))
    yield gauge(p + "queued_bytes", "Bytes of the requests waiting.", broker.queue.bytes)
    yield gauge(p + "unread_bytes", "Replies waiting for callers that do not read.",
                broker.outbox.bytes)  # fmt: skip
    yield gauge(p + "workers", "Workers connected.", len(broker.workers))
    now = time.monotonic()
    members = broker.members
    listed = list(_by_id([*members.by_ident.values(), *members.dead]).values())[:MAX_LISTED]
    requests = CounterMetricFamily(
        p + "instance_requests", "Requests answered by each worker.", labels=["worker"]
    )
    errors = CounterMetricFamily(
        p + "instance_errors", "Failed requests at each worker (error replies, timeouts, "
        "lost with it).", labels=["worker"],
    )  # fmt: skip
    inflight = GaugeMetricFamily(
        p + "instance_inflight_requests", "Requests at each worker now.", labels=["worker"]
    )
    state = GaugeMetricFamily(
        p + "instance_state", "Each worker's state (1 for the one it is in).",
        labels=["worker", "state"],
    )  # fmt: skip
    for w in listed:
        requests.add_metric([w.id], w.requests)
        errors.add_metric([w.id], w.errors)
        inflight.add_metric([w.id], len(w.inflight))
        current = members.state(w, now)
        for name in WORKER_STATES:
            state.add_metric([w.id, name], 1 if name == current else 0)
    yield from (requests, errors, inflight, state)
    yield metrics.histogram_family(
        p + "request_duration_seconds", "Time from dispatch to a worker to its reply.",
        ["worker"], (([w.id], w.latency) for w in listed),
    )  # fmt: skip
    yield from metrics.daemon_families("lb_broker", broker)


def _by_id(workers: list[Any]) -> dict[str, Any]:
    """One entry per worker id, the live one first (a worker that reconnected is listed
    among the dead too; two series with the same labels would spoil a scrape)."""
    found: dict[str, Any] = {}
    for w in workers:
        found.setdefault(w.id, w)
    return found


def worker_families(worker: Worker) -> Iterator[Any]:
    """``eda-lb worker``: requests, errors, busy refusals, timeouts, load and latency."""
    p = "eda_lb_worker_"
    counter, gauge = metrics.counter, metrics.gauge
    yield counter(p + "requests", "Requests admitted.", worker.requests)
    yield counter(p + "errors", "Requests answered with an error.", worker.errors)
    yield counter(p + "busy", "Requests refused busy (queue full).", worker.busy)
    yield counter(p + "timeouts", "Requests that timed out (queued or running).",
                  worker.timeouts)  # fmt: skip
    yield gauge(p + "inflight_requests", "Requests running now.", worker.inflight)
    yield gauge(p + "queued_requests", "Requests waiting for a slot.", len(worker.queue))
    yield gauge(p + "queued_bytes", "Bytes of the requests waiting.", worker.queue_bytes)
    yield gauge(p + "unread_bytes", "Replies waiting for callers that do not read.",
                worker.outbox.bytes)  # fmt: skip
    yield gauge(p + "concurrency", "Requests run at once at most.", worker.concurrency)
    yield gauge(p + "brokers", "Brokers this worker is linked to.",
                sum(1 for b in worker.brokers.values() if b.sock is not None))  # fmt: skip
    yield metrics.histogram_family(
        p + "request_duration_seconds", "Time from a request's arrival to its reply.",
        [], [([], worker.latency)],
    )  # fmt: skip
    yield from metrics.daemon_families("lb_worker", worker)


def proxy_families(figures: Callable[[], dict[str, Any]]) -> Callable[[], Iterator[Any]]:
    """``eda-lb tcp`` (either engine): its ``figures()`` (``eda-lb stats``'s answer, per
    backend) as families; what the scrape thread calls."""

    def families() -> Iterator[Any]:
        answer = figures()
        p = "eda_lb_proxy_"
        labels = ["backend"]
        sessions = GaugeMetricFamily(p + "sessions", "Connections open now.", labels=labels)
        total = CounterMetricFamily(p + "connections", "Connections proxied.", labels=labels)
        bytes_in = CounterMetricFamily(p + "received_bytes", "Bytes from clients.",
                                       labels=labels)  # fmt: skip
        bytes_out = CounterMetricFamily(p + "sent_bytes", "Bytes to clients.", labels=labels)
        errors = CounterMetricFamily(p + "connect_errors", "Failed connects to the instance.",
                                     labels=labels)  # fmt: skip
        up = GaugeMetricFamily(p + "instance_up", "1 when the instance passes its checks.",
                               labels=labels)  # fmt: skip
        for b in answer.get("backends", []):
            inst = str(b.get("id"))
            sessions.add_metric([inst], b.get("sessions") or 0)
            total.add_metric([inst], b.get("sessions_total") or 0)
            bytes_in.add_metric([inst], b.get("bytes_in") or 0)
            bytes_out.add_metric([inst], b.get("bytes_out") or 0)
            errors.add_metric([inst], b.get("connect_errors") or 0)
            up.add_metric([inst], 1 if b.get("state") == "up" else 0)
        yield from (sessions, total, bytes_in, bytes_out, errors, up)

    return families
