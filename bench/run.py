"""Run the benchmarks: every bench/bench_*.py, each against its anchor, in one go.

    python bench/run.py [--quick] [--only NAME ...] [--output FILE]

Each module exposes ``run(quick: bool) -> list[Row]`` (see harness.Row).  The
table goes to stdout and the rows, with the machine and versions, to
bench/results/latest.json.  Everything runs inside a private network
namespace (scripts/netns-run): no packet leaves the machine.

``ratio`` is oriented so that > 1 means eda is better: eda/anchor for rates,
anchor/eda for times.  Exit status: 0 when every target is met, 1 when a
target is missed, a run failed or a benchmark crashed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NETNS_RUN = ROOT / "scripts" / "netns-run"
DEFAULT_OUTPUT = BENCH / "results" / "latest.json"


def reexec_in_netns() -> None:
    """Restart this script inside a private network namespace unless already in one."""
    if os.environ.get("EDA_NETNS") == "1":
        return
    argv = [str(NETNS_RUN), sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    os.execv(argv[0], argv)


def modules() -> dict[str, Path]:
    """Benchmark modules by short name ('pubsub' for bench_pubsub.py)."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_module(name: str, path: Path, quick: bool) -> list[dict[str, Any]]:
    """The rows of one module; a crash becomes one failed row, not the end of the run."""
    started = time.perf_counter()
    print(f"running {name} ...", file=sys.stderr, flush=True)
    try:
        rows: list[dict[str, Any]] = [dict(r) for r in load(path).run(quick)]
    except Exception as exc:
        traceback.print_exc()
        rows = [{
            "name": f"{name}: crashed", "eda": None, "anchor": "", "anchor_value": None,
            "unit": "", "ratio": None, "target": "", "ok": False,
            "note": f"{type(exc).__name__}: {exc}",
        }]
    for r in rows:
        r["module"] = name
    print(f"  {name} took {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return rows


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "lines/s" or value >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def print_table(rows: list[dict[str, Any]], quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"eda benchmarks{' (quick)' if quick else ''}",
        caption="ratio > 1 means eda is better (eda/anchor for rates, anchor/eda for times)",
    )
    for header in ("benchmark", "eda", "anchor", "anchor value", "unit", "ratio", "target", "ok"):
        if header in ("eda", "anchor value", "ratio"):
            table.add_column(header, justify="right")
        else:
            table.add_column(header, no_wrap=header == "benchmark")
    for r in rows:
        ok = {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}[r["ok"]]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "—"
        table.add_row(
            r["name"], fmt(r["eda"], r["unit"]), r["anchor"], fmt(r["anchor_value"], r["unit"]),
            r["unit"], ratio, r["target"], ok,
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for r in rows:
        if r.get("note"):
            console.print(f"[yellow]note[/] {r['name']}: {r['note']}", highlight=False)


def tool_version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else ""


def environment() -> dict[str, Any]:
    from eda.core import __version__

    commit = tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "eda": __version__,
        "commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mosquitto": tool_version(["/usr/sbin/mosquitto", "-h"]),
        "haproxy": tool_version(["haproxy", "-v"]),  # bench_lb_tcp's anchor and engine
    }


def main() -> int:
    names = modules()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (100k lines)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", choices=sorted(names),
        help=f"run only this benchmark (repeatable): {', '.join(sorted(names))}",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args()
    reexec_in_netns()

    sys.path.insert(0, str(BENCH))  # benchmark modules import harness
    started = time.time()
    rows: list[dict[str, Any]] = []
    for name in args.only or sorted(names):
        rows += run_module(name, names[name], args.quick)
    print_table(rows, args.quick)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "ratio_orientation": "> 1 means eda is better (eda/anchor for rates, anchor/eda for times)",
        "environment": environment(),
        "results": rows,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.output}", file=sys.stderr)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
