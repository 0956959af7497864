"""``--watch``: a command's figures followed live, the one loop of every such command.

``eda-bus stats``, ``eda-lb stats``, ``eda-registry list`` and ``eda-txn
status`` gather their rows as they do once, then hand :func:`watch` the
gathering (``snapshot``), the tables that show the rows and which fields are
counters.  Every ``--interval`` seconds it takes a snapshot and adds, to each
row it saw in the previous one (the same ``key``), the rate of each counter
(``<field>_per_s``: the change over the time between the two; none for the
first snapshot, for a new row, or when the counter went down: a restart, or
retention removing events).

* On a terminal: a live view redrawn in place (rich ``Live``): the command's
  tables with a column per rate, under a heading with the time.
* Piped (or ``--json``): one JSON line per snapshot,
  ``{"time": UNIX, "interval": SECONDS, "rows": [...]}`` (``interval`` null
  for the first); with ``--format``, the template's line per row.

Ctrl-C (and SIGTERM) end it cleanly, exit 0.  A snapshot that fails (the
daemon is gone, it timed out) ends it as the command without ``--watch``
would end: the same one-line error and exit status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click

from eda.cli.options import seconds_option
from eda.cli.output import Column, Output, Row, TableView, json_text

if TYPE_CHECKING:
    from rich.console import RenderableType

# (rows, the table that shows them): a command may draw its rows in several tables
Views = Callable[[list[Row]], Sequence[tuple[list[Row], TableView]]]


def watch_options(func: Any) -> Any:
    """``--watch`` and ``--interval SECONDS`` (given to the command as ``watch``, ``interval``)."""
    func = seconds_option(
        "--interval", type=click.FloatRange(min=0.05), default=1.0,
        help="With --watch: seconds between two snapshots.",
    )(func)  # fmt: skip
    return click.option(
        "--watch",
        is_flag=True,
        help="Follow it live: on a terminal a view redrawn in place every --interval, with "
        "rates per second; piped, one JSON line per snapshot ({time, interval, rows}). "
        "Ctrl-C ends it (exit 0).",
    )(func)


def rated(
    rows: list[Row],
    before: Mapping[Hashable, tuple[float, Row]],
    now: float,
    key: Callable[[Row], Hashable],
    counters: Sequence[str],
) -> dict[Hashable, tuple[float, Row]]:
    """Add ``<counter>_per_s`` to each of *rows* (in place) from its row in *before*
    (taken at a monotonic time); what the next call compares with."""
    seen: dict[Hashable, tuple[float, Row]] = {}
    for row in rows:
        k = key(row)
        then, old = before.get(k, (now, {}))
        for field in counters:
            if field not in row:
                continue
            cur, prev = row.get(field), old.get(field)
            rate = None
            if _number(cur) and _number(prev) and now > then and cur >= prev:  # type: ignore[operator]
                rate = round((cur - prev) / (now - then), 3)  # type: ignore[operator]
            row[f"{field}_per_s"] = rate
        seen[k] = (now, row)
    return seen


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def watch(
    out: Output,
    snapshot: Callable[[], list[Row]],
    views: Views,
    *,
    key: Callable[[Row], Hashable],
    counters: Mapping[str, str] | None = None,
    interval: float = 1.0,
    title: str = "",
    summary: Callable[[list[Row]], str] | None = None,
) -> None:
    """Take a snapshot every *interval* seconds and show it (see the module docstring)
    until Ctrl-C.  *counters* maps each counter field to its rate column's header."""
    counters = dict(counters or {})
    live = _live(out, views, counters, title, summary) if out.terminal_view else None
    before: dict[Hashable, tuple[float, Row]] = {}
    last: float | None = None
    due = time.monotonic()
    try:
        while True:
            rows = snapshot()
            now = time.monotonic()
            before = rated(rows, before, now, key, list(counters))
            if live is not None:
                live(rows)
            elif out.mode == "json":
                gap = None if last is None else round(now - last, 3)
                out.text(json_text({"time": time.time(), "interval": gap, "rows": rows}) + "\n")
            else:
                out.items(rows)
            last = now
            due += interval
            time.sleep(max(0.0, due - time.monotonic()))
            due = max(due, time.monotonic() - interval)  # a slow snapshot: no burst after it
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live(None)


def _live(
    out: Output, views: Views, counters: dict[str, str], title: str,
    summary: Callable[[list[Row]], str] | None,
) -> Callable[[list[Row] | None], None]:  # fmt: skip
    """A rich Live view on the terminal: call it with rows to redraw, None to stop."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = out.env.live_console()
    view = Live(console=console, auto_refresh=False, transient=False)
    started = False

    def draw(rows: list[Row]) -> RenderableType:
        heading = Text(time.strftime("%H:%M:%S"), style="dim")
        if title:
            heading.append(f"  {title}", style="bold")
        if summary is not None:
            heading.append(f"  {summary(rows)}")
        heading.append("  (Ctrl-C ends)", style="dim")
        parts: list[RenderableType] = [heading]
        for shown, table in views(rows):
            if shown:
                parts.append(_with_rates(table, counters, shown).draw(shown, console.width))
        if len(parts) == 1:
            parts.append(Text("nothing to show", style="dim"))
        return Group(*parts)

    def update(rows: list[Row] | None) -> None:
        nonlocal started
        if rows is None:
            if started:
                view.stop()
            return
        if not started:
            view.start()
            started = True
        view.update(draw(rows), refresh=True)

    return update


def _with_rates(table: TableView, counters: dict[str, str], rows: list[Row]) -> TableView:
    """*table* with a column per rate its rows have (the counters they hold)."""
    fields = [f for f in counters if any(f in r for r in rows)]
    if not fields:
        return table
    columns = tuple(Column(counters[f], priority=1, numeric=True) for f in fields)

    def cells(row: Row) -> list[Any]:
        rates = [row.get(f"{f}_per_s") for f in fields]
        return [*table.cells(row), *("—" if r is None else f"{r:,.1f}" for r in rates)]

    return TableView(table.columns + columns, cells, table.title, table.group)
