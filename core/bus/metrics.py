"""What ``eda-bus serve --metrics`` exports (core/metrics.py serves it).

Read at scrape time: the engine's stats (what ``eda-bus stats`` shows: the
log, topics, consumers and their lag, disk use) and the server's counters.
Nothing is counted per event for metrics: events stored is the log's last
sequence, events delivered the sum of the subscriptions' own counts.
Topics are labels, at most :data:`MAX_TOPICS` of them (the busiest kept),
so a publisher inventing topics cannot blow up a Prometheus server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily

from .. import metrics

if TYPE_CHECKING:
    from .server import BusServer

MAX_TOPICS = 500  # topics exported as labels, the ones with most events first


def families(server: BusServer) -> Iterator[Any]:
    """The bus's families (see the module docstring)."""
    s = server.engine.stats()
    counter, gauge = metrics.counter, metrics.gauge
    yield counter("eda_bus_events_stored",
                  "Events stored in the log (each once: duplicates are not).", s.last_seq)
    yield counter("eda_bus_events_delivered", "Events sent to subscribers (replay and live).",
                  server.delivered_before + sum(sub.sent for sub in server.subs.values()))
    yield counter("eda_bus_events_lost", "Events reported lost to subscribers (removed by "
                  "retention before they read them).", server.lost)
    yield counter("eda_bus_batches_confirmed", "Published batches confirmed once durable.",
                  server.confirmed)
    yield counter("eda_bus_batches_refused", "Published batches refused (too large, not "
                  "allowed, store error).", server.refused)
    yield counter("eda_bus_subscribers_cut",
                  "Subscribers cut off for not reading what was queued.", server.cut)
    yield gauge("eda_bus_log_events", "Events in the log now.", s.events)
    yield gauge("eda_bus_log_bytes", "Payload bytes of the events in the log.", s.bytes)
    yield gauge("eda_bus_disk_bytes", "Size of the store on disk.", s.file_bytes)
    yield gauge("eda_bus_first_sequence", "Oldest event kept (retention cuts before it).",
                s.first_seq)
    yield gauge("eda_bus_durable_sequence", "Newest committed (durable) event.", s.durable_seq)
    topic_events = GaugeMetricFamily(
        "eda_bus_topic_events", "Events in the log, by topic.", labels=["topic"]
    )
    topic_bytes = GaugeMetricFamily(
        "eda_bus_topic_bytes", "Payload bytes in the log, by topic.", labels=["topic"]
    )
    busiest = sorted(s.topics.items(), key=lambda kv: -kv[1].events)[:MAX_TOPICS]
    for topic, figures in busiest:
        topic_events.add_metric([topic], figures.events)
        topic_bytes.add_metric([topic], figures.bytes)
    yield topic_events
    yield topic_bytes
    lag = GaugeMetricFamily(
        "eda_bus_consumer_lag_events", "Events a durable consumer or group has not taken yet "
        "(plus those held unacknowledged).", labels=["consumer", "kind"],
    )  # fmt: skip
    held = GaugeMetricFamily(
        "eda_bus_consumer_held_events", "Events a group handed out and not acknowledged yet.",
        labels=["consumer"],
    )  # fmt: skip
    position = GaugeMetricFamily(
        "eda_bus_consumer_next_sequence", "Next bus sequence a consumer has not taken.",
        labels=["consumer", "kind"],
    )  # fmt: skip
    for c in s.consumers:
        lag.add_metric([c.name, c.kind], c.lag)
        position.add_metric([c.name, c.kind], c.next)
        if c.kind == "group":
            held.add_metric([c.name], c.held)
    yield lag
    yield held
    yield position
    yield gauge("eda_bus_subscriptions", "Subscriptions served now.", len(server.subs))
    yield gauge("eda_bus_connections", "Client connections open now.", len(server.connections))
    yield gauge("eda_bus_queued_bytes", "Bytes queued for subscribers and not taken yet.",
                server.queued.total)
    yield from metrics.daemon_families("bus", server)
