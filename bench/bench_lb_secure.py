"""eda-lb in secure mode: ``eda-lb call`` with --secure against the same without.

The ``call`` row of bench_lb.py (``eda-lb call echo --window 1000 < N lines`` to
three ``eda-lb worker echo --persistent -- cat``, everything on 127.0.0.1,
``--connect``), measured twice in the same run, alternating: every process
with ``--secure`` (CurveZMQ: each connection's handshake, each message
encrypted and authenticated; one identity trusting itself), and every one
without.  The figure is secure requests/s over insecure requests/s (issue 17:
>= 0.6x); both absolute rates are reported (the anchor value is the insecure one).
"""

from __future__ import annotations

from bench_lb import WINDOW, _eda_run, _lines, secure_identity
from harness import Row, eda_env, median, row, scratch


def run(quick: bool) -> list[Row]:
    n = 50_000 if quick else 200_000
    rounds = 1 if quick else 3
    with scratch("bench-lb-secure-") as work:
        env = eda_env(work)
        secure_identity(env)
        src = work / "in.txt"
        _lines(src, n)
        plain, secure = [], []
        for _ in range(rounds):  # alternate, so load from elsewhere hits both alike
            plain.append(_eda_run(work, env, n, src))
            secure.append(_eda_run(work, env, n, src, secure=True))
    rate, plain_rate = median([r[0] for r in secure]), median([r[0] for r in plain])
    return [
        row(
            f"lb call --secure, 3 persistent workers, window {WINDOW}", rate, "eda insecure",
            plain_rate, "req/s", higher_is_better=True, target="secure >= 0.6x insecure",
            ok=rate >= 0.6 * plain_rate,
            note=f"{n} requests, median of {rounds}; secure {rate:,.0f} req/s, "
            f"insecure {plain_rate:,.0f} req/s",
        ),
        row(
            "lb call --secure latency p99", median([r[2] for r in secure]), "eda insecure",
            median([r[2] for r in plain]), "ms", higher_is_better=False,
        ),
    ]  # fmt: skip
