"""The output layer: how every program prints what it found on stdout.

One :class:`Output` per command renders items (dicts) in the mode the user
chose -- ``--exec``, ``--format``, JSON Lines (a pipe, ``--json``), or a
terminal view (one line per item, or a table) -- and escapes whatever a
peer sent before a terminal sees it (:func:`for_terminal`).

Where output goes is an :class:`Environment`, as in httpie's ``context.py``:
the writer, whether stdout is a terminal, its width and colour.  A program
takes the process's; a test passes its own, so terminal views are tested
in-process, without a pty.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, write_stdout
from eda.core.attributes import safe_dumps
from eda.core.errors import ExitStatus

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

Row = dict[str, Any]


# CSI and OSC escape sequences, then any other C0/C1 control character but tab
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0a-\x1f\x7f-\x9f]"
)


def for_terminal(value: object) -> str:
    """*value* as text safe to show on a terminal: escape sequences and control
    characters (anything a peer could use to retitle, clear or move the screen)
    become visible ``\\xNN`` escapes.  Render the result with rich ``Text``
    objects (never as markup), or pass it through ``rich.markup.escape``.
    """
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def json_text(value: Any) -> str:
    """Compact JSON for any value, safe for values from the wire: never NaN or
    Infinity (they become null), never a string that is not valid UTF-8."""
    return safe_dumps(value)


def _formattable(value: Any) -> Any:
    if value is None:  # a JSON null renders blank, as a missing field does
        return ""
    if isinstance(value, dict):
        return _JsonDict(value)
    if isinstance(value, list):
        return _JsonList(value)
    return value


class _JsonDict(dict[str, Any]):
    """A dict in a template: JSON as a whole, blank for a missing ``[key]``."""

    def __format__(self, spec: str) -> str:
        return format(json_text(self), spec)

    def __getitem__(self, key: str) -> Any:
        return _formattable(super().__getitem__(key))

    def __missing__(self, key: str) -> str:
        return ""

    def __getattr__(self, key: str) -> Any:  # {meta.zone} as well as {meta[zone]}
        if key.startswith("__"):
            raise AttributeError(key)
        return self[key]


class _JsonList(list[Any]):
    def __format__(self, spec: str) -> str:
        return format(json_text(self), spec)

    def __getitem__(self, index: Any) -> Any:
        return _formattable(super().__getitem__(index))


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


class Template:
    """``--format TEMPLATE``: ``str.format`` fields, ``\\t`` a tab.

    With *fields* (the names an item can have), a template naming any other
    field is refused at once, as ``mosquitto_sub -F`` does; a known field an
    item lacks renders blank.  A template that cannot render an item
    (``{x[0]}`` on a string, say) is a usage error with a one-line message,
    not a traceback.
    """

    def __init__(self, text: str, fields: Collection[str] | None = None) -> None:
        import string

        self.text = text.replace("\\t", "\t")
        try:  # refuse a malformed template before any work is done
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise click.UsageError(f"--format {self.text!r}: {exc}") from None
        if fields is not None:
            for _, name, _, _ in parsed:
                if name is None:
                    continue
                base = re.split(r"[.\[]", name, maxsplit=1)[0]
                if base not in fields:
                    known = ", ".join(sorted(fields))
                    raise click.UsageError(
                        f"--format: unknown field {{{base}}}; known fields: {known}"
                    )

    def line(self, fields: dict[str, Any]) -> str:
        """One rendered line, newline included; dict and list values render as JSON."""
        values = _Fields({k: _formattable(v) for k, v in fields.items()})
        try:
            return self.text.format_map(values) + "\n"
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise click.UsageError(f"--format {self.text!r}: {exc}") from None


@dataclass(frozen=True)
class Column:
    """A column of a terminal table (:class:`TableView`).

    *priority* 0: always shown; when the terminal is too narrow, the columns
    with the highest priority numbers go first (as ``kubectl get`` and
    ``docker ps`` do), and the table says which (``--json`` has every field).
    *wrap*: free text (notes, metadata) that may fold over lines, between its
    words; any other column (an id, a number, an address, a state) is shown
    whole or not at all.  *numeric* columns are right-aligned.
    """

    header: str
    priority: int = 0
    numeric: bool = False
    wrap: bool = False


WRAP_WORD = 16  # a wrapping column is at least as wide as its longest word, up to this


@dataclass(frozen=True)
class TableView:
    """How rows show as a table on a terminal: the *columns*, and *cells(row)*, one
    value per column (a str, escaped here; a rich ``Text``, escaped by *cells*
    with :func:`for_terminal`; None, blank).  *title* heads the table; with
    *group*, rows make one table per ``group(row)`` (its title), in order, all
    with the same columns."""

    columns: tuple[Column, ...]
    cells: Callable[[Row], Sequence[Any]]
    title: str | None = None
    group: Callable[[Row], str] | None = None

    def draw(self, rows: list[Row], width: int) -> RenderableType:
        """The rows in *width* columns: the columns that fit by priority, else (when
        even the priority-0 ones do not fit) one block per row with every field."""
        from rich.console import Group
        from rich.text import Text

        cells = [[_cell(value) for value in self.cells(row)] for row in rows]
        need = [_column_width(col, [r[i] for r in cells]) for i, col in enumerate(self.columns)]
        shown = list(range(len(self.columns)))

        def fits() -> bool:
            return sum(need[i] for i in shown) + 2 * (len(shown) - 1) <= width

        droppable = sorted(
            (i for i, col in enumerate(self.columns) if col.priority > 0),
            key=lambda i: (self.columns[i].priority, i),
        )
        while not fits() and droppable:
            shown.remove(droppable.pop())
        if not fits():
            return self._blocks(rows, cells)
        # what is left goes to the wrapping columns (as much as their longest line needs)
        spare = width - sum(need[i] for i in shown) - 2 * (len(shown) - 1)
        widths = {i: need[i] for i in shown}
        wants = {
            i: max([need[i], *(r[i].cell_len for r in cells)])
            for i in shown
            if self.columns[i].wrap
        }
        while spare > 0 and any(widths[i] < want for i, want in wants.items()):
            for i, want in wants.items():  # in equal shares
                if spare > 0 and widths[i] < want:
                    widths[i] += 1
                    spare -= 1
        parts: list[RenderableType] = []
        for title, members in _grouped(rows, cells, self.group):
            parts.append(self._table(members, widths, title))
        hidden = [self.columns[i].header for i in range(len(self.columns)) if i not in shown]
        if hidden:
            note = f"hidden to fit {width} columns: {', '.join(hidden)} (--json shows all)"
            parts.append(Text(note, style="dim"))
        return parts[0] if len(parts) == 1 else Group(*parts)

    def _table(
        self, cells: list[list[Text]], widths: dict[int, int], title: str | None
    ) -> RenderableType:
        from rich.table import Table
        from rich.text import Text

        heading = title if title is not None else self.title
        table = Table(
            box=None,
            header_style="bold",
            pad_edge=False,
            title=Text(for_terminal(heading)) if heading is not None else None,
            title_justify="left",
        )
        for i, width in widths.items():
            col = self.columns[i]
            table.add_column(
                col.header,
                justify="right" if col.numeric else "left",
                no_wrap=not col.wrap,
                overflow="fold" if col.wrap else "ignore",
                width=width,
            )
        for row in cells:
            table.add_row(*[row[i] for i in widths])
        return table

    def _blocks(self, rows: list[Row], cells: list[list[Text]]) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        label = max(len(col.header) for col in self.columns) + 1
        blocks = []
        for row in cells:
            block = Text()
            for col, cell in zip(self.columns, row, strict=True):
                block.append(f"{col.header:<{label}}", style="bold")
                block.append_text(cell)
                block.append("\n")
            blocks.append(block)
        return Group(*blocks)


def _cell(value: Any) -> Text:
    from rich.text import Text

    if isinstance(value, Text):
        return value
    return Text("" if value is None else for_terminal(value))


def _column_width(column: Column, cells: list[Text]) -> int:
    """The width *column* needs: its widest cell, or (a wrapping one) its longest word."""
    if column.wrap:
        words = [len(word) for cell in cells for word in cell.plain.split()]
        return max([len(column.header), min(max(words, default=0), WRAP_WORD)])
    return max([len(column.header), *(cell.cell_len for cell in cells)])


def _grouped(
    rows: list[Row], cells: list[list[Text]], group: Callable[[Row], str] | None
) -> list[tuple[str | None, list[list[Text]]]]:
    if group is None:
        return [(None, cells)]
    groups: dict[str, list[list[Text]]] = {}
    for row, row_cells in zip(rows, cells, strict=True):
        groups.setdefault(group(row), []).append(row_cells)
    return list(groups.items())


def _stdout_isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, a closed one
        return False


@dataclass
class Environment:
    """Where a program's output goes (httpie's ``Environment``).

    *write* takes every byte printed on stdout (by default :func:`write_stdout`:
    all of it, a closed pipe ends the program, SIGTERM waits for the line);
    *stdout_isatty* chooses between a terminal view and JSON Lines; *width*
    is the terminal's columns (None: rich finds them: ``COLUMNS``, the
    terminal, else 80); *colour* False draws no ANSI styles (None: rich
    decides, from the terminal, ``NO_COLOR`` and ``TERM``).
    """

    write: Callable[[bytes], None] = write_stdout
    stdout_isatty: bool = field(default_factory=_stdout_isatty)
    width: int | None = None
    colour: bool | None = None

    def console(self) -> Console:
        """A rich console drawing for this environment (into a buffer: see :meth:`Output.show`)."""
        import io

        from rich.console import Console

        return Console(
            file=io.StringIO(),
            width=self.width,
            force_terminal=self.stdout_isatty,
            color_system=None if self.colour is False else "auto",
            highlight=False,
        )

    def live_console(self) -> Console:
        """A rich console for a view redrawn in place (``--watch``'s ``Live``): a
        terminal, drawing straight through :attr:`write`."""
        import io
        from typing import IO, cast

        from rich.console import Console

        write = self.write

        class Through(io.TextIOBase):
            def write(self, text: str) -> int:
                write(text.encode())
                return len(text)

        return Console(
            file=cast(IO[str], Through()),
            width=self.width,
            force_terminal=True,
            color_system=None if self.colour is False else "auto",
            highlight=False,
        )


def _environment_value(value: Any) -> str:
    """*value* as an environment variable value (a NUL from a peer would crash exec)."""
    return str(value).replace("\x00", "\\x00")


class Output:
    """How a program prints items (dicts): one renderer for every output mode.

    * ``--exec CMD``: run ``sh -c CMD`` per item, the item's JSON on its
      stdin and *exec_env(item)* in its environment; failures are reported
      at once and counted (:meth:`finish` then says so and returns 1, as
      xargs does);
    * ``--format TEMPLATE``: one line per item (*fields* are the names a
      template may use, *template_fields(item)* the values);
    * JSON Lines when stdout is not a terminal or with ``--json``;
    * else a terminal view: *terminal(item)* returns a rich ``Text`` for
      :meth:`items`, and :meth:`table` draws the rows as a table.

    Everything printed on a terminal is escaped with :func:`for_terminal`;
    everything goes to *env* (the process's :class:`Environment` by default).
    """

    def __init__(
        self,
        ctx: Context,
        *,
        template: str | None = None,
        fields: Collection[str] | None = None,
        force_json: bool = False,
        exec_cmd: str | None = None,
        exec_env: Callable[[Row], dict[str, Any]] | None = None,
        template_fields: Callable[[Row], dict[str, Any]] | None = None,
        terminal: Callable[[Row], Text] | None = None,
        env: Environment | None = None,
    ) -> None:
        self.ctx = ctx
        self.env = env or Environment()
        self.tty = self.env.stdout_isatty
        self.exec_cmd = exec_cmd
        self.exec_env = exec_env
        self.exec_failures = 0
        self.template = Template(template, fields) if template else None
        self.template_fields = template_fields
        self.terminal = terminal
        # a terminal view (a line per item, or a table) unless the user chose another mode
        self.terminal_view = self.tty and not (exec_cmd or template or force_json)
        if exec_cmd:
            self.mode = "exec"
        elif template:
            self.mode = "template"
        elif not self.terminal_view or terminal is None:
            self.mode = "json"
        else:
            self.mode = "terminal"
        self._console: Console | None = None

    def items(self, items: Iterable[Row]) -> None:
        """Render *items* (one write on stdout for all of them)."""
        if self.mode == "exec":
            for item in items:
                self._run(item)
        elif self.mode == "terminal":
            assert self.terminal is not None
            self.show(*[self.terminal(item) for item in items], soft_wrap=True)
        elif self.mode == "template":
            assert self.template is not None
            to_fields = self.template_fields or (lambda item: item)
            self.text("".join([self.template.line(to_fields(item)) for item in items]))
        else:
            self.text("".join([json_text(item) + "\n" for item in items]))

    def table(self, rows: list[Row], view: TableView) -> None:
        """*rows* as a table on a terminal (*view* draws it to fit the terminal's
        width: columns dropped by priority, never a number or an id split), else
        as :meth:`items`: the same rows, JSON Lines on a pipe, whatever the width."""
        if self.terminal_view:
            self.show(view.draw(rows, self.width))
        else:
            self.items(rows)

    @property
    def width(self) -> int:
        """The terminal's width in columns (what a table must fit in)."""
        return self.console.width

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = self.env.console()
        return self._console

    def show(self, *renderables: RenderableType, soft_wrap: bool = False) -> None:
        """Draw rich *renderables* (Text, tables) on the terminal, in one write
        (*soft_wrap*: lines longer than the terminal are not cut into lines)."""
        console = self.console
        with console.capture() as captured:
            for renderable in renderables:
                console.print(renderable, soft_wrap=soft_wrap)
        self.env.write(captured.get().encode())

    def text(self, text: str) -> None:
        """Write lines of *text* (escaped for a terminal when stdout is one)."""
        if self.tty:
            text = "\n".join([for_terminal(line) for line in text.split("\n")])
        self.env.write(text.encode())

    def data(self, data: bytes) -> None:
        """Write *data* as it is (escaped for a terminal when stdout is one)."""
        if self.tty:
            self.text(data.decode(errors="replace"))
        else:
            self.env.write(data)

    def _run(self, item: Row) -> None:
        assert self.exec_cmd is not None
        extra = self.exec_env(item) if self.exec_env is not None else {}
        env = dict(os.environ, **{k: _environment_value(v) for k, v in extra.items()})
        import subprocess  # (--exec only: not on every program's start-up path)

        line = json_text(item) + "\n"
        cmd = self.exec_cmd
        result = subprocess.run(cmd, shell=True, input=line.encode(), env=env, check=False)
        if result.returncode:
            self.exec_failures += 1
            what = for_terminal(item.get("id", ""))
            self.ctx.warn(f"warning: --exec command exited {result.returncode} for item {what}")

    def finish(self) -> ExitStatus:
        """ERROR (after saying so) when an --exec command failed, else OK."""
        if self.exec_failures:
            self.ctx.error(f"--exec command failed for {self.exec_failures} item(s)")
            return ExitStatus.ERROR
        return ExitStatus.OK
