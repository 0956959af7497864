"""eda-txn status: where transactions and sagas stand (a table, JSON Lines), and
one of them followed as it runs (--follow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Exit
from eda.cli.options import LOG_HELP, common_options, output_options
from eda.cli.output import Column, Output, TableView, for_terminal
from eda.cli.watch import watch_options
from eda.core.errors import ExitStatus, NotFoundError, UsageError

if TYPE_CHECKING:
    from rich.text import Text


# -- status (both) -------------------------------------------------------------------------
STATUS_FIELDS = (
    "txn", "kind", "state", "coordinator", "decision", "participants", "reason", "hazards",
    "notes", "time", "steps", "name", "step", "error", "active", "log", "id", "status",
    "started", "updated",
)  # fmt: skip
STATE_COLOURS = {
    "committed": "green", "aborted": "yellow", "in-doubt": "red", "hazard": "bold red",
    "committing": "cyan", "aborting": "cyan", "stuck": "red",
}  # fmt: skip


@click.command(
    epilog="""\b
Examples:
  eda-txn status                                    every transaction and saga of ./txn
  eda-txn status c1.18f3a2b4c5d6e7                  one of them (exit 3 if unknown)
  eda-txn status --log /var/lib/eda/txn --json | jq 'select(.state == "in-doubt")'
  eda-txn status --watch                            live: states, in-doubt first
"""
)
@click.argument("txn_id", metavar="[ID]", required=False)
@click.option("--log", "log_dir", default="txn", show_default=True, metavar="DIR", help=LOG_HELP)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="With ID: print each change of its steps (or participants) as it happens, until it"
    " ends; exit 0 completed/committed, 5 compensated/aborted, 1 stuck.",
)
@output_options(
    f"Print one line per transaction from a template. Fields: {', '.join(STATUS_FIELDS)}."
)
@watch_options
@common_options
def status(
    txn_id: str | None,
    log_dir: str,
    follow: bool,
    template: str | None,
    force_json: bool,
    watch: bool,
    interval: float,
    ctx: Context,
) -> None:
    """Where transactions and sagas stand, from the journals in --log.

    States: committed, aborted, committing/aborting (decided, not yet
    acknowledged by all), in-doubt (prepared, outcome unknown), hazard (an
    operator's `resolve` contradicted the outcome); sagas show their own.
    A table on a terminal, JSON Lines otherwise.
    """
    from eda.core.txn.status import everything

    if follow:
        if txn_id is None:
            raise UsageError("--follow follows one transaction or saga: give its ID")
        _follow(ctx, log_dir, txn_id, Output(
            ctx, template=template, fields=STATUS_FIELDS, force_json=force_json,
            terminal=_change_line,
        ))  # fmt: skip
        return
    out = Output(ctx, template=template, fields=STATUS_FIELDS, force_json=force_json)
    if watch:
        from eda.cli.watch import watch as watching

        def snapshot() -> list[dict[str, Any]]:
            rows, problems = everything(log_dir)
            for problem in problems:
                if ctx.due(problem, 60.0):  # once a minute, not every snapshot
                    ctx.warn(f"warning: {problem}")
            return [r for r in rows if txn_id is None or r.get("txn") == txn_id]

        watching(out, snapshot, lambda rows: [(rows, _status_table)], key=lambda r: r.get("txn"),
                 interval=interval, title="eda-txn status", summary=_states)  # fmt: skip
        return
    rows, problems = everything(log_dir)
    for problem in problems:
        ctx.warn(f"warning: {problem}")
    if txn_id is not None:
        rows = [r for r in rows if r.get("txn") == txn_id]
        if not rows:
            raise NotFoundError(f"no transaction or saga {txn_id} in {log_dir}")
    out.table(rows, _status_table)
    if problems:
        raise Exit(ExitStatus.ERROR)


def _states(rows: list[dict[str, Any]]) -> str:
    """How many are in each state, in-doubt first (status --watch's heading)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("state"))] = counts.get(str(r.get("state")), 0) + 1
    order = sorted(counts, key=lambda s: (s != "in-doubt", s))
    return ", ".join(f"{counts[s]} {for_terminal(s)}" for s in order) or "none"


# how `status --follow` ends, as `saga` and `commit` do
ENDED_STATUS = {
    "completed": ExitStatus.OK, "committed": ExitStatus.OK,
    "compensated": ExitStatus.LOSS, "aborted": ExitStatus.LOSS,
}  # fmt: skip


def _follow(ctx: Context, log_dir: str, txn_id: str, out: Output) -> None:
    """Print each change of *txn_id* until it ends; exit as it ended (SIGINT: 130)."""
    from eda.core.txn.status import follow

    state = None
    for change in follow(log_dir, txn_id):
        out.items([change])
        state = change.get("state")
    code = ENDED_STATUS.get(str(state), ExitStatus.ERROR)
    if code == ExitStatus.ERROR:
        ctx.error(f"{txn_id} is {for_terminal(state)}: see eda-txn status {txn_id}")
    if code != ExitStatus.OK:
        raise Exit(code)


def _change_line(change: dict[str, Any]) -> Text:
    """One change as rich Text: the time, the step (or participant) and its status."""
    import time

    from rich.text import Text

    line = Text(time.strftime("%H:%M:%S", time.localtime(change["time"])), style="dim")
    state = for_terminal(change.get("state"))
    if "step" in change:
        line.append(f" {for_terminal(change['step'])} {for_terminal(change.get('status'))}")
        line.append(f"  ({state})", style="dim")
    else:
        line.append(f" {for_terminal(change.get('txn'))} ")
        line.append(state, style=STATE_COLOURS.get(state, "bold"))
    return line


def _status_cells(r: dict[str, Any]) -> list[Any]:
    import time

    from rich.text import Text

    state = for_terminal(r.get("state"))
    parts = r.get("participants") or r.get("steps") or {}
    shown = (
        " ".join(for_terminal(f"{k}:{v}") for k, v in parts.items())
        if isinstance(parts, dict)
        else for_terminal(parts)
    )
    when = r.get("time")
    stamp = "-"
    if isinstance(when, int | float):
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
    notes = [str(r.get("reason") or ""), *map(str, r.get("notes") or [])]
    if r.get("hazards"):
        notes.append("heuristic hazard at " + ", ".join(map(str, r["hazards"])))
    return [
        r.get("txn"), r.get("kind"), Text(state, style=STATE_COLOURS.get(state, "")), shown, stamp,
        "; ".join(n for n in notes if n),
    ]  # fmt: skip


# ids and states are never cut: the least needed columns go first
_status_table = TableView(
    (
        Column("ID"),
        Column("KIND", priority=3),
        Column("STATE"),
        Column("PARTICIPANTS / STEPS", priority=1, wrap=True),
        Column("WHEN", priority=4),
        Column("NOTE", priority=2, wrap=True),
    ),
    _status_cells,
)
