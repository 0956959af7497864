"""A click group whose subcommands are imported when they run (click's LazyGroup pattern).

``eda-registry lookup`` in a shell loop should not import the registry server's
command line nor build the options of seven other subcommands.  A program's
group names each subcommand's ``module:attribute``; the module is imported the
first time the subcommand is looked up: to run it, to complete it, or to list it
in the group's ``--help`` (which therefore still shows every subcommand with its
short help, read from the definitions themselves), in a man page or a test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import click


class Subcommands(MutableMapping[str, click.Command]):
    """name -> subcommand; a name in *where* is imported on first access.

    Iterating (``items()``, ``values()``, ``len``) imports every subcommand, as
    a reader of all of them needs; :meth:`loaded` is what was imported so far.
    """

    def __init__(self, where: dict[str, str]) -> None:
        self.where = where  # name -> "module:attribute"
        self._loaded: dict[str, click.Command] = {}
        # applied to each subcommand once imported (eda.cli.common.assign_envvars sets it)
        self.prepare: Callable[[click.Command], None] | None = None

    def names(self) -> list[str]:
        """Every subcommand's name, none imported."""
        return sorted({*self.where, *self._loaded})

    def loaded(self) -> dict[str, click.Command]:
        return dict(self._loaded)

    def _load(self, name: str) -> click.Command | None:
        command = self._loaded.get(name)
        if command is None and name in self.where:
            module, _, attribute = self.where[name].partition(":")
            # __import__, not importlib.import_module: -X importtime sees it (tests/test_startup.py)
            command = getattr(__import__(module, fromlist=[attribute]), attribute)
            assert isinstance(command, click.Command), self.where[name]
            self[name] = command
        return command

    def __getitem__(self, name: str) -> click.Command:
        command = self._load(name)
        if command is None:
            raise KeyError(name)
        return command

    def get(self, name: str, default: Any = None) -> Any:
        command = self._load(name)
        return default if command is None else command

    def __contains__(self, name: object) -> bool:
        return name in self.where or name in self._loaded

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command
        if self.prepare is not None:
            self.prepare(command)

    def __delitem__(self, name: str) -> None:
        self.where.pop(name, None)
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter([name for name in self.names() if self._load(name) is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))


class LazyGroup(click.Group):
    """A group whose subcommands come from *subcommands*: name -> ``"module:attribute"``."""

    def __init__(self, *args: Any, subcommands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: Subcommands = Subcommands(dict(subcommands))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self.commands.names()


def subcommand_of(group: click.Group, argv: list[str]) -> str | None:
    """The subcommand *argv* names for *group*: its first argument that is not one of the
    group's own options (or their values)."""
    valued = {
        opt
        for param in group.params
        if isinstance(param, click.Option) and not param.is_flag and not param.count
        for opt in param.opts
    }
    args = iter(argv)
    for arg in args:
        if arg == "--":
            return next(args, None)
        if arg in valued:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None
