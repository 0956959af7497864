"""eda-keys: this identity's CURVE key pair and the peers it trusts (secure mode)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eda.cli.common import Context, Exit, run
from eda.cli.options import key_options, output_options
from eda.cli.output import Output, for_terminal
from eda.core import __version__, keys
from eda.core.errors import ConfigError, ExitStatus

if TYPE_CHECKING:
    from rich.text import Text

EPILOG = """\b
Examples:
  eda-keys init                                make this identity's key pair, print its public key
  eda-keys show                                print the public key (give it to your peers)
  eda-keys trust alice 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7'   trust a peer's key
  eda-keys list                                the trusted keys, by name
  eda-keys revoke alice                        stop trusting alice (running programs included)
"""


def _key_file(key_file: str | None) -> Path:
    return Path(key_file) if key_file else keys.default_key_file()


def _trust_dir(trust_dir: str | None) -> Path:
    return Path(trust_dir) if trust_dir else keys.default_trust_dir()


F = TypeVar("F", bound=Callable[..., Any])


def _options(func: F) -> F:
    """--key, --trust and -h/--help: what every subcommand takes."""
    return click.help_option("-h", "--help")(key_options(func))


@click.group(
    epilog=EPILOG,
    context_settings={"max_content_width": 100},
)
@click.version_option(__version__, "--version", message="%(prog)s %(version)s")
@click.help_option("-h", "--help")
def command() -> None:
    """Keys of secure mode: this identity's CURVE key pair and trusted peers.

    A secure program talks only to peers whose public key is trusted here, and
    they only to it if they trust its key: exchange `eda-keys show` outputs
    and `eda-keys trust` each other.  Keys are Z85 text, 40 characters.
    """


@command.command(epilog="\b\nExamples:\n  eda-keys init\n  eda-keys init --key ~/svc/orders.key")
@_options
@click.option("-v", "--verbose", is_flag=True, help="Diagnostics on stderr.")
def init(key_file: str | None, trust_dir: str | None, verbose: bool) -> None:
    """Make this identity's key pair (file mode 0600) and print its public key.

    An existing key is never replaced (peers trust it): remove the file first
    to start a new identity.
    """
    ctx = Context("eda-keys", verbose)
    identity = keys.create_identity(_key_file(key_file))
    ctx.debug(f"wrote {identity.path}")
    click.echo(identity.public_text)


@command.command(
    epilog='\b\nExamples:\n  eda-keys show\n  ssh peer eda-keys trust me "$(eda-keys show)"'
)
@_options
def show(key_file: str | None, trust_dir: str | None) -> None:
    """Print this identity's public key (Z85, 40 characters)."""
    click.echo(keys.load_identity(_key_file(key_file)).public_text)


class _KeyArguments(click.Command):
    """A command whose KEY argument may begin with '-' (the Z85 alphabet has it: about
    one key in 85 does): an argument that is a public key is never read as an option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            options = {o for p in self.params for o in p.opts if o.startswith("-")}
            given = [
                a
                for a in args
                if a.startswith("-") and keys.is_key(a) and a.partition("=")[0] not in options
            ]
            if given:
                args = [a for a in args if a not in given] + ["--", *given]
        return super().parse_args(ctx, args)


@command.command(
    cls=_KeyArguments,
    epilog="\b\nExamples:\n  eda-keys trust alice 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7'",
)
@click.argument("name")
@click.argument("key")
@_options
def trust(name: str, key: str, key_file: str | None, trust_dir: str | None) -> None:
    """Trust the public KEY of a peer under NAME (replacing NAME's key if it had one)."""
    keys.trust(_trust_dir(trust_dir), name, key)


@command.command(
    name="list", epilog="\b\nExamples:\n  eda-keys list\n  eda-keys list --json | jq -r .name"
)
@_options
@output_options("Print one line per key from a template, e.g. '{name} {key}'.")
def list_keys(
    key_file: str | None, trust_dir: str | None, template: str | None, force_json: bool
) -> None:
    """List the trusted keys: name and public key.

    A malformed file is reported (one line naming it) and the others are listed;
    the exit status is then 1.
    """
    ctx = Context("eda-keys", False)
    output = Output(
        ctx, template=template, fields={"name", "key"}, force_json=force_json, terminal=_line
    )
    bad = 0
    for path in keys.trusted_files(_trust_dir(trust_dir)):
        try:
            value = keys.read_public_key(path)
        except ConfigError as exc:
            ctx.error(str(exc))
            bad += 1
            continue
        output.items([{"name": path.name[: -len(keys.SUFFIX)], "key": value.decode()}])
    if output.finish() or bad:
        raise Exit(ExitStatus.ERROR)


def _line(row: dict[str, Any]) -> Text:
    from rich.text import Text

    line = Text()
    line.append(for_terminal(row["name"]), style="bold cyan")
    line.append("  " + row["key"])
    return line


@command.command(epilog="\b\nExamples:\n  eda-keys revoke alice")
@click.argument("name")
@_options
def revoke(name: str, key_file: str | None, trust_dir: str | None) -> None:
    """Stop trusting NAME: running secure programs refuse its new connections at once."""
    keys.revoke(_trust_dir(trust_dir), name)


def main() -> None:
    run(command, "eda-keys")


if __name__ == "__main__":
    main()
