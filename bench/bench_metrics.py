"""What ``/metrics`` costs a daemon under full load (issue 19: >= 0.95x while scraped every second).

The ``call`` row of bench_lb.py (``eda-lb call echo --window 1000 < N lines`` to
three ``eda-lb worker echo --persistent -- cat`` on 127.0.0.1), measured twice
in the same run, alternating: every worker with ``--metrics`` (a latency
histogram observed per request, and a scraper fetching each worker's
``/metrics`` every second, as Prometheus would) and every worker without.
The figure is requests/s with metrics over requests/s without; both absolute
rates and the scrapes done are reported.  On a machine shared with other jobs
the rates swing by a third from one run to the next, so a second row gives
what such load barely moves: the workers' CPU time per request (scrapes
included), with metrics over without.
"""

from __future__ import annotations

import threading
import urllib.request

from bench_lb import WINDOW, _eda_run, _lines
from harness import Row, eda_env, median, row, scratch

SCRAPE_EVERY = 1.0  # s, Prometheus's scrape_interval here


class Scraper:
    """Fetches http://127.0.0.1:PORT/metrics of every port in *ports* (a list the workers'
    start fills) every :data:`SCRAPE_EVERY` seconds, in a thread, until stopped."""

    def __init__(self, ports: list[int]) -> None:
        self.ports, self.scrapes, self.failed = ports, 0, 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY):
            for port in list(self.ports):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    self.failed += 1  # not listening yet, or ended


def run(quick: bool) -> list[Row]:
    n = 50_000 if quick else 200_000
    rounds = 1 if quick else 3
    scrapes = failed = 0
    with scratch("bench-metrics-") as work:
        env = eda_env(work)
        src = work / "in.txt"
        _lines(src, n)
        plain, scraped = [], []
        cpu: dict[str, list[float]] = {}  # CPU seconds per request: caller, workers
        cpu_scraped: dict[str, list[float]] = {}
        for _ in range(rounds):  # alternate, so load from elsewhere hits both alike
            plain.append(_eda_run(work, env, n, src, cpu))
            ports: list[int] = []
            with Scraper(ports) as scraper:
                scraped.append(_eda_run(work, env, n, src, cpu_scraped, metrics=ports))
            scrapes, failed = scrapes + scraper.scrapes, failed + scraper.failed
    rate, plain_rate = median([r[0] for r in scraped]), median([r[0] for r in plain])
    us, plain_us = (median(c["workers"]) * 1e6 for c in (cpu_scraped, cpu))
    return [
        row(
            f"lb call, 3 workers with --metrics scraped every {SCRAPE_EVERY:g} s", rate,
            "eda without --metrics", plain_rate, "req/s", higher_is_better=True,
            target="with metrics >= 0.95x without", ok=rate >= 0.95 * plain_rate,
            note=f"{n} requests, window {WINDOW}, median of {rounds}; with metrics {rate:,.0f} "
            f"req/s, without {plain_rate:,.0f} req/s; {scrapes} scrapes answered, "
            f"{failed} not (worker not listening yet)",
        ),
        row(
            "lb workers' CPU per request, --metrics scraped every second", us,
            "eda without --metrics", plain_us, "us", higher_is_better=False,
            target="with metrics <= 1.05x without", ok=us <= 1.05 * plain_us,
            note=f"CPU time of the three workers (user + system) over the requests served, "
            f"median of {rounds}; the scrapes' cost is in it",
        ),
    ]  # fmt: skip
