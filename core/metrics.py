"""Prometheus metrics of every eda daemon: ``--metrics HOST:PORT`` serves ``/metrics``.

One mechanism for every daemon (eda-registry, eda-bus, eda-lb worker/serve/
tcp, eda-txn coordinator/participant):

- :func:`serve` puts ``GET /metrics`` on eda's one HTTP server
  (:mod:`eda.core.http`), driven by the daemon's own poll loop: a scrape
  reads the daemon's state in the loop's thread, between two of its steps,
  so nothing needs a lock.  A daemon says what it exports with one method,
  ``metrics()``, which yields prometheus-client metric families built at
  scrape time from the counters and figures it keeps anyway (its ``stats``
  answer): a scrape costs the daemon one pass over its figures, and the
  messages it serves cost nothing more.  The TCP proxy, which has no poll
  loop of its own, gets one in a thread (:func:`serve_in_thread`).
- Where a figure exists nowhere (a latency distribution: the daemons keep a
  window of recent samples for percentiles, not a cumulative histogram), a
  :class:`Histogram` counts on the hot path: one bisect and two additions
  per request (``bench/bench_metrics.py`` measures what that and the scrapes
  cost a daemon under full load).
- The process's own figures (CPU, memory, descriptors, start time) are
  prometheus-client's process collector.
- A daemon serving metrics says where in its registration and mDNS
  announcement: meta (TXT) ``metrics=HOST:PORT``, or ``metrics=:PORT`` when
  bound to every address (the instance's own host then), read by the
  registry's Prometheus HTTP service discovery (:mod:`eda.core.registry.metrics`).

Names follow Prometheus's conventions: ``eda_<program>_<what>_<unit>``,
``_total`` for counters, ``_seconds`` and ``_bytes`` units, labels for
dimensions (``service``, ``instance``, ``topic``, ``consumer``).

prometheus-client is imported only when metrics are served or scraped
(:func:`serve` and the families' modules): one-shot commands and ``--help``
never load it (tests/test_startup.py).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .endpoint import Endpoint

META_KEY = "metrics"  # the registration meta / TXT key that says where /metrics is
PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# request latencies, in seconds: from a fast in-process reply to a long shell command
LATENCY_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

Families = Iterable[Any]  # prometheus_client Metric objects

_advertised: str | None = None  # "HOST:PORT" (HOST "" for every address) once served


class Histogram:
    """A cumulative latency histogram, cheap enough for the hot path.

    :meth:`observe` adds one sample; :meth:`buckets` gives Prometheus's
    cumulative ``le`` buckets at scrape time.  No lock: a daemon observes
    and is scraped in the same thread.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs, ``+Inf`` last (prometheus-client's shape)."""
        out, total = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def parse_address(text: str) -> Endpoint:
    """``HOST:PORT`` (``[V6]:PORT``; ``:PORT`` for every address) for ``--metrics``,
    or :class:`~eda.core.errors.UsageError`."""
    where = Endpoint.parse(text, "--metrics", default_host="*")
    return where


def advertise(bound: Endpoint) -> None:
    """Remember where this process serves /metrics (what registrations carry)."""
    global _advertised
    wildcard = bound.host in ("*", "0.0.0.0", "::")
    _advertised = f":{bound.port}" if wildcard else str(bound)


def meta() -> list[str]:
    """What a registration or announcement of this process adds to its meta:
    ``metrics=HOST:PORT`` once metrics are served, else nothing."""
    return [f"{META_KEY}={_advertised}"] if _advertised is not None else []


def target(where: str, host: str) -> str | None:
    """The scrape target (``HOST:PORT``) of a ``metrics`` meta value *where* an instance
    on *host* registered, or None when it is not one (a peer wrote it: checked here)."""
    parsed = Endpoint.from_peer(f"tcp://{host}{where}" if where.startswith(":") else
                                f"tcp://{where}")  # fmt: skip
    return None if parsed is None else str(parsed)


class Exporter:
    """The families of one daemon plus the process's, rendered in the text format."""

    def __init__(self, families: Callable[[], Families]) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(families))
        self.scrapes = 0

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        self.scrapes += 1
        return generate_latest(self.registry)

    def respond(self, _request: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        """``GET /metrics``: (status, headers, body), as :mod:`eda.core.http` routes take."""
        return 200, [("Content-Type", CONTENT_TYPE)], self.render()


class _Collector:
    def __init__(self, families: Callable[[], Families]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families()


def serve(daemon: Any, address: Endpoint | str | None) -> Any:
    """Serve ``/metrics`` of *daemon* (its ``metrics()`` families) on *address*, on the
    daemon's poll loop; None when *address* is None (no ``--metrics``).

    Binds at once (a taken port is an error before the daemon registers) and
    remembers the address for registrations (:func:`meta`).  Daemons with more
    to say over the same port (the registry's service discovery) have a
    ``metric_routes()`` method: ``(method, path, handler)`` triples.
    """
    if address is None:
        return None
    from .http import Server

    where = address if isinstance(address, Endpoint) else parse_address(address)
    exporter = Exporter(daemon.metrics)
    server = Server(daemon, where, what="metrics")
    server.route("GET", PATH, exporter.respond)
    for method, path, handler in getattr(daemon, "metric_routes", lambda: ())():
        server.route(method, path, handler)
    advertise(server.endpoint)
    return server


def serve_in_thread(
    families: Callable[[], Families], address: Endpoint | str | None,
    warn: Callable[[str], None], *, program: str = "lb_proxy",
) -> MetricsThread | None:  # fmt: skip
    """:func:`serve` for a program without a poll loop (the TCP proxy, *program*): a small
    daemon in a thread of its own serves the scrapes; *families* must be safe to call from
    it.  The scrapes' own HTTP server is reported as ``eda_<program>_http_...``."""
    if address is None:
        return None
    return MetricsThread(families, address, warn, program=program)


class MetricsThread:
    """A :class:`~eda.core.daemon.Daemon` in a thread that only serves ``/metrics``."""

    def __init__(
        self, families: Callable[[], Families], address: Endpoint | str,
        warn: Callable[[str], None], *, program: str = "lb_proxy",
    ) -> None:  # fmt: skip
        from .daemon import Daemon

        self.daemon = Daemon(warn=warn)
        def with_http() -> Iterator[Any]:
            yield from families()
            yield from http_families(program, self.daemon)

        self.daemon.metrics = with_http  # type: ignore[attr-defined]
        try:
            self.server = serve(self.daemon, address)
        except BaseException:
            self.daemon.close()
            raise
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="eda-metrics", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.serve(until=self._stop.is_set)
        finally:
            self.server.close()
            self.daemon.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2.0)


# -- what every daemon exports --------------------------------------------------------------
def counter(name: str, documentation: str, value: float) -> Any:
    """A counter family of one value (*name* without ``_total``: the exposition adds it)."""
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, documentation, value=value)


def gauge(name: str, documentation: str, value: float) -> Any:
    """A gauge family of one value."""
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, value=value)


def daemon_families(program: str, daemon: Any) -> Iterator[Any]:
    """What the poll-loop base counts (:class:`~eda.core.daemon.Daemon`): malformed
    inputs dropped and loop steps that raised, as ``eda_<program>_...``."""
    yield counter(f"eda_{program}_malformed_inputs", "Inputs from peers dropped as malformed.",
                  daemon.malformed)  # fmt: skip
    yield counter(f"eda_{program}_step_failures",
                  "Steps of the poll loop that raised (and were survived).", daemon.failures)
    yield from http_families(program, daemon)


def http_families(program: str, daemon: Any) -> Iterator[Any]:
    """What each HTTP server on *daemon*'s loop (:mod:`eda.core.http`) counts, as
    ``eda_<program>_http_...`` labelled ``server``: ``metrics`` (this port) and ``http``
    (``--http``): responses, refusals, connections cut, evicted, open, bytes queued."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from .http import servers_on

    p, labels = f"eda_{program}_http_", ["server"]
    by_label: dict[str, list[Any]] = {}  # (two servers of one kind: one sample, their sum)
    for server in servers_on(daemon):
        by_label.setdefault(server.what.lower(), []).append(server)
    counters = (
        ("responses", "answered", "HTTP responses sent."),
        ("refused_requests", "refused", "HTTP requests refused: malformed, over a size or "
         "time limit, or past the pipelining limit (answered 4xx, then the connection closed)."),
        ("refused_connections", "refused_connections", "HTTP connections closed on accepting "
         "them: at the connection limit, with no idle one to close instead."),
        ("cut_connections", "cut", "HTTP connections cut because more bytes were queued for "
         "all clients than the output budget (the slowest readers first)."),
        ("evicted_connections", "evicted", "Idle HTTP connections closed to make room for a "
         "new one at the connection limit."),
        ("handler_failures", "failures", "HTTP requests whose handler failed (answered 500)."),
    )  # fmt: skip
    for name, attribute, help_text in counters:
        family = CounterMetricFamily(p + name, help_text, labels=labels)
        for label, servers in by_label.items():
            family.add_metric([label], sum(getattr(server, attribute) for server in servers))
        yield family
    open_now = GaugeMetricFamily(p + "connections", "HTTP connections open now.", labels=labels)
    queued = GaugeMetricFamily(p + "queued_bytes", "Bytes queued for HTTP clients, all together.",
                               labels=labels)  # fmt: skip
    for label, servers in by_label.items():
        open_now.add_metric([label], sum(len(server.conns) for server in servers))
        queued.add_metric([label], sum(server.queued for server in servers))
    yield open_now
    yield queued


def histogram_family(
    name: str, documentation: str, labels: list[str],
    histograms: Iterable[tuple[list[str], Histogram]],
) -> Any:  # fmt: skip
    """One histogram family from :class:`Histogram` objects, each with its label values."""
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, hist in histograms:
        family.add_metric(values, hist.buckets(), hist.sum)
    return family


def directory_bytes(path: str | None) -> int:
    """Bytes of the files directly in *path* (a daemon's data directory), 0 when none."""
    import os

    if not path:
        return 0
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return 0
    return total
