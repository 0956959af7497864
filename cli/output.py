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
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable
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

    def table(self, rows: list[Row], draw: Callable[[list[Row]], RenderableType]) -> None:
        """*rows* as a table on a terminal (*draw* makes it, from rows whose
        strings it escapes with :func:`for_terminal`), else as :meth:`items`:
        the same rows, JSON Lines on a pipe, whatever the terminal's width."""
        if self.terminal_view:
            self.show(draw(rows))
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
