"""The exceptions raised by eda's core; each maps to one exit status in the CLI."""


class EdaError(Exception):
    """Base class of every error eda's core raises on purpose."""

    exit_code = 1


class UsageError(EdaError):
    """The caller asked for something malformed (bad endpoint, bad pattern)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file or value is invalid; the message names file, line and key."""


class NotFoundError(EdaError):
    """The named thing (service, instance, transaction) does not exist."""

    exit_code = 3


class InputError(EdaError):
    """One input record was malformed; it is skipped and the rest goes on."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line

    def __str__(self) -> str:
        base = super().__str__()
        return f"line {self.line}: {base}" if self.line is not None else base
