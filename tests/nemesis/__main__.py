"""``make nemesis``: the long form, run inside a private network namespace."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.helpers import Procs, children_of
from tests.hosts import Network
from tests.nemesis.run import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--txn", action=argparse.BooleanOptionalAction, default=None,
        help="run the txn role (default: with 10 hosts)",
    )  # fmt: skip
    parser.add_argument(
        "--nats", action=argparse.BooleanOptionalAction, default=None,
        help="run the NATS role (three JetStream nodes, two fronts; default: with 10 hosts)",
    )  # fmt: skip
    args = parser.parse_args()
    out = (args.out or Path("build/nemesis") / str(args.seed)).resolve()
    work = out / "procs"
    work.mkdir(parents=True, exist_ok=True)
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        os.environ[var] = str(work / var.lower())
    procs = Procs(work)
    network = Network(procs)
    try:
        results, text = run(network, out, args.seconds, args.seed, args.hosts, txn=args.txn,
                            nats=args.nats)  # fmt: skip
    finally:
        procs.kill_all()
        network.close()
    print(text, end="")
    print(f"report: {out}/summary.txt, {out}/latency.png, history {out}/history.jsonl")
    left = children_of(os.getpid())
    if left:
        print(f"processes left behind: {left}", file=sys.stderr)
    return 1 if any(r.anomalies for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
