"""What ``/metrics`` costs a daemon under full load (issue 19: >= 0.95x while scraped every second).

The ``call`` row of bench_lb.py (``eda-lb call echo --window 1000 < N lines`` to
three ``eda-lb worker echo --persistent -- cat`` on 127.0.0.1), run in pairs:
every worker with ``--metrics`` (a latency histogram observed per request, and
a scraper fetching each worker's ``/metrics`` every second, as Prometheus
would) and every worker without, the two runs of a pair back to back, the
order swapped from one pair to the next (ABBA), so that load from elsewhere
hits both alike.  Each pair gives a ratio (requests/s with metrics over
without); the row is the median of those ratios, with every ratio in the
note.  On a machine shared with other jobs one run's rate swings by a third
(a single pair said 1.06x, 0.92x and 0.81x in three runs), so a second row
gives what such load barely moves: the workers' CPU time per request (scrapes
included), median with metrics over median without.
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
    pairs = 4 if quick else 6
    scrapes = failed = 0
    ratios: list[float] = []
    with scratch("bench-metrics-") as work:
        env = eda_env(work)
        src = work / "in.txt"
        _lines(src, n)
        plain, scraped = [], []
        cpu: dict[str, list[float]] = {}  # CPU seconds per request: caller, workers
        cpu_scraped: dict[str, list[float]] = {}
        for i in range(pairs):
            rates = {}
            for with_metrics in (False, True) if i % 2 == 0 else (True, False):
                if not with_metrics:
                    rates[with_metrics] = _eda_run(work, env, n, src, cpu)[0]
                    continue
                ports: list[int] = []
                with Scraper(ports) as scraper:
                    rates[with_metrics] = _eda_run(work, env, n, src, cpu_scraped,
                                                   metrics=ports)[0]  # fmt: skip
                scrapes, failed = scrapes + scraper.scrapes, failed + scraper.failed
            plain.append(rates[False])
            scraped.append(rates[True])
            ratios.append(rates[True] / rates[False])
    ratio = median(ratios)
    us, plain_us = (median(c["workers"]) * 1e6 for c in (cpu_scraped, cpu))
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    throughput = row(
        f"lb call, 3 workers with --metrics scraped every {SCRAPE_EVERY:g} s", median(scraped),
        "eda without --metrics", median(plain), "req/s", higher_is_better=True,
        target="with metrics >= 0.95x without", ok=ratio >= 0.95,
        note=f"{n} requests, window {WINDOW}; ratio: median of {pairs} back-to-back pairs "
        f"(ABBA order), each {shown}; rates are medians; {scrapes} scrapes answered, "
        f"{failed} not (worker not listening yet)",
    )  # fmt: skip
    throughput["ratio"] = ratio  # of the pairs, not of the two medians
    cpu_ratio = [s / p for s, p in zip(cpu_scraped["workers"], cpu["workers"], strict=True)]
    return [
        throughput,
        row(
            "lb workers' CPU per request, --metrics scraped every second", us,
            "eda without --metrics", plain_us, "us", higher_is_better=False,
            target="with metrics <= 1.05x without", ok=us <= 1.05 * plain_us,
            note=f"CPU time of the three workers (user + system) over the requests served, "
            f"median of {pairs} runs each; per pair (with/without): "
            + ", ".join(f"{r:.2f}" for r in cpu_ratio) + "; the scrapes' cost is in it",
        ),
    ]  # fmt: skip
