"""The report of a run: the summary table (text and JSON) and the plot (PNG).

The plot shows, over the run's time, the throughput (completed operations per
second) and the latency of each client operation, one colour per subject,
with every fault window shaded, as Jepsen's latency graphs. Latency is that of
a confirmed publish (eda-pub --bus --confirm, start to exit) and of a
registry lookup (eda-registry lookup, start to exit): whole program runs, as
a script sees them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tests.nemesis.checkers import Result
from tests.nemesis.history import OK, Op

CLIENT_KINDS = {
    ("bus", "publish"),
    ("pubsub", "publish"),
    ("registry", "lookup"),
    ("registry", "view"),
    ("lb", "call"),
    ("nats", "publish"),
    ("txn", "transfer"),
    ("txn", "saga"),
}
# a feed's publish is a write into eda-pub's stdin: its latency says nothing of eda
TIMED_KINDS = CLIENT_KINDS - {("pubsub", "publish")}
COLOURS = {"kill": "red", "stop": "orange", "cut": "purple", "split": "blue", "loss": "green"}


def table(results: Sequence[Result]) -> str:
    """Per checker: operations, ok, anomalies; then each anomaly with its operations."""
    rows = [("checker", "ops", "ok", "anomalies")]
    rows += [(r.checker, str(r.ops), str(r.ok), str(len(r.anomalies))) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        for key, value in r.stats.items():
            if key != "convergence_s":
                lines.append(f"{r.checker}: {key} = {_short(value)}")
        for a in r.anomalies:
            lines.append(f"ANOMALY {r.checker} {a.kind}: {a.detail} [{'; '.join(a.ops)}]")
    return "\n".join(lines) + "\n"


def _short(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def windows(history: Sequence[Op]) -> list[tuple[float, float, str]]:
    """(start, end, fault kind) of every fault in the history."""
    opened: dict[tuple[str, str], float] = {}
    found = []
    end = max((op.end for op in history), default=0.0)
    for op in history:
        if op.subject != "nemesis" or op.kind not in ("start", "heal"):
            continue
        key = (op.value["fault"], op.value["target"])
        if op.kind == "start":
            opened[key] = op.time
        elif key in opened:
            found.append((opened.pop(key), op.end, key[0]))
    heal_all = [op.time for op in history if op.kind == "heal-all"]
    found += [(t, heal_all[-1] if heal_all else end, k) for (k, _), t in opened.items()]
    return found


def plot(history: Sequence[Op], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in history if (op.subject, op.kind) in CLIENT_KINDS]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 7))
    span = max((op.end for op in history), default=1.0)
    for subject in sorted({op.subject for op in ops}):
        mine = [op for op in ops if op.subject == subject]
        seconds = int(span) + 1
        counts = [0] * seconds
        for op in mine:
            if op.outcome == OK:
                counts[min(int(op.end), seconds - 1)] += 1
        top.plot(range(seconds), counts, label=subject, linewidth=1)
        for outcome, marker in ((OK, "."), ("fail", "x"), ("info", "^")):
            shown = [
                op for op in mine if op.outcome == outcome and (subject, op.kind) in TIMED_KINDS
            ]
            if shown:
                bottom.scatter(
                    [op.end for op in shown], [max(op.latency, 1e-3) for op in shown],
                    s=6, marker=marker, label=f"{subject} {outcome}",
                )  # fmt: skip
    for ax in (top, bottom):
        for start, end, kind in windows(history):
            ax.axvspan(start, end, color=COLOURS.get(kind, "grey"), alpha=0.08)
    top.set_ylabel("ok operations / s")
    top.set_title(title + "  (shaded: faults; " + ", ".join(
        f"{k} {c}" for k, c in COLOURS.items()) + ")", fontsize=9)  # fmt: skip
    top.legend(fontsize=7, loc="upper right")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("time since start (s)")
    bottom.legend(fontsize=6, loc="upper right", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(history: Sequence[Op], results: Sequence[Result], out: Path, title: str) -> str:
    """summary.txt, summary.json and latency.png in *out*; returns the summary text."""
    text = table(results)
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot(history, out / "latency.png", title)
    return text
