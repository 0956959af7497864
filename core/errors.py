"""The exit statuses of every program, and the exceptions eda's core raises.

Each exception carries the :class:`ExitStatus` the CLI exits with
(``exit_code``), so the status of a failure is decided where the failure is
understood, once, and ``cli/`` only renders it.
"""

from enum import IntEnum


class ExitStatus(IntEnum):
    """The exit statuses of every program (CONVENTIONS.md); man pages and README list these."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    LOSS = 5
    INTERRUPTED = 130


class EdaError(Exception):
    """Base class of every error eda's core raises on purpose."""

    exit_code: ExitStatus = ExitStatus.ERROR


class UsageError(EdaError):
    """The caller asked for something malformed (bad endpoint, bad pattern)."""

    exit_code = ExitStatus.USAGE


class ProtocolError(EdaError):
    """A peer sent something that is not the protocol: garbage from a peer is a
    runtime error (exit 1), never a usage error, whatever the program."""


class ConfigError(UsageError):
    """A configuration file or value is invalid; the message names file, line and key."""


class NotFoundError(EdaError):
    """The named thing (service, instance, transaction) does not exist."""

    exit_code = ExitStatus.NOT_FOUND


class InputError(EdaError):
    """One input record was malformed; it is skipped and the rest goes on."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line

    def __str__(self) -> str:
        base = super().__str__()
        return f"line {self.line}: {base}" if self.line is not None else base
