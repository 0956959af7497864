"""Generate man pages and shell completions from the click commands.

    python scripts/gendocs.py              rewrite man/*.1 and completions/*
    python scripts/gendocs.py --check      exit 1 naming the files that are stale
    python scripts/gendocs.py --out DIR    write (or check) under DIR instead

Every program in ``eda.cli.PROGRAMS`` gets ``man/<prog>.1`` and bash, zsh and
fish completion scripts; ``cli/helptext.py`` gets every ``--help`` text, for
eda.cli.launch to print without importing click (written in this tree only, not
under ``--out DIR``).

The completion scripts are click's own: they call
the installed console script with ``_<PROG>_COMPLETE`` set, so they always
follow the current options.  Output is deterministic (no dates), so a test
can compare it with what is committed.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator
from inspect import cleandoc
from pathlib import Path

import click
from click.formatting import join_options
from click.shell_completion import get_completion_class

from eda.cli import PROGRAMS
from eda.cli.common import EXIT_MEANINGS, SHARED_ENVVARS, assign_envvars
from eda.cli.launch import HELP_WIDTHS
from eda.core import __version__

ROOT = Path(__file__).resolve().parent.parent
HELP_MODULE = "cli/helptext.py"
COMPLETIONS = {"bash": "{prog}.bash", "zsh": "_{prog}", "fish": "{prog}.fish"}

EXIT_STATUS = [
    (str(int(code)), meaning[0].upper() + meaning[1:] + ".")
    for code, meaning in EXIT_MEANINGS.items()
]
ENVIRONMENT = {
    SHARED_ENVVARS["--config"]: "TOML config file, as -c/--config.",
    SHARED_ENVVARS["--interface"]: "Network interface (name or IPv4 address), as --interface.",
    SHARED_ENVVARS["--no-mdns"]: "Set to 1 to turn mDNS off, as --no-mdns.",
    "XDG_CONFIG_HOME": "Where the user config file lives (default ~/.config).",
    "XDG_CACHE_HOME": "Where the discovery cache lives (default ~/.cache).",
}
FILES = [
    ("./eda.toml", "Config of the current directory."),
    ("$XDG_CONFIG_HOME/eda/config.toml", "User config, lowest precedence of the files."),
    ("$XDG_CACHE_HOME/eda/discovery.json", "Cache of endpoints found by mDNS."),
]
PRECEDENCE = (
    "Settings come from, highest first: command-line flags, EDA_* environment variables, "
    "--config FILE, ./eda.toml, $XDG_CONFIG_HOME/eda/config.toml, built-in defaults. "
    "A file holds shared keys at the top level and per-program tables. "
    "Every option has an environment variable, listed under ENVIRONMENT: "
    "EDA_<PROGRAM>_<LONG OPTION> (EDA_SUB_TIMEOUT for eda-sub --timeout; for a program "
    "with subcommands, one variable feeds every subcommand with that option), "
    "except the options all programs share."
)


def escape(text: str) -> str:
    """Make plain text safe on roff text lines (\\, hyphens, quotes, leading dots)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = text.replace("'", "\\(aq").replace("`", "\\(ga")
    return "\n".join("\\&" + line if line.startswith(".") else line for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def paragraphs(text: str) -> list[str]:
    """Roff for click help text: blank lines part paragraphs, \\b keeps a block as is."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", cleandoc(text.split("\f")[0])):
        if block.startswith("\b"):
            out += [".PP", ".nf", escape(block[1:].strip("\n")), ".fi"]
        else:
            out += [".PP", escape(" ".join(block.split()))]
    return out


def examples(epilog: str) -> list[tuple[str, str]]:
    """(command, description) pairs from the epilog lines under 'Examples:'."""
    lines = epilog.split("Examples:", 1)[1].splitlines() if "Examples:" in epilog else []
    return [split_example(line.strip()) for line in lines if line.strip()]


def split_example(line: str) -> tuple[str, str]:
    """Split at the first run of two or more spaces outside quotes."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif line.startswith("  ", i):
            return line[:i], line[i:].strip()
    return line, ""


def option_entry(option: click.Option, ctx: click.Context) -> list[str]:
    record = option.get_help_record(ctx)
    if record is None:
        return []
    spec, help_text = record
    flags = ", ".join(bold(opt) for opt in option.opts)
    if option.secondary_opts:
        flags += " / " + ", ".join(bold(opt) for opt in option.secondary_opts)
    metavar = spec[len(join_options(option.opts)[0]) :].strip()
    if metavar and not option.secondary_opts:
        flags += " " + italic(metavar)
    return [".TP", flags, escape(" ".join(help_text.split()))]


def walk(ctx: click.Context) -> Iterator[click.Context]:
    """*ctx* and the contexts of its subcommands (for groups), depth first."""
    yield ctx
    if isinstance(ctx.command, click.Group):
        for name in ctx.command.list_commands(ctx):
            sub = ctx.command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(click.Context(sub, ctx, name, **sub.context_settings))


def synopsis(ctx: click.Context) -> str:
    usage = escape(" ".join(ctx.command.collect_usage_pieces(ctx)))
    return f"{bold(ctx.command_path)} {re.sub(r'[A-Z][A-Z_]+', lambda m: italic(m[0]), usage)}"


def options(ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in ctx.command.get_params(ctx):
        if isinstance(param, click.Option):
            out += option_entry(param, ctx)
    return out


def envvars(contexts: list[click.Context]) -> dict[str, str]:
    """Environment variables the program reads: its options' and the shared ones."""
    found: dict[str, str] = {}
    for param in (param for ctx in contexts for param in ctx.command.params):
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        for name in names:
            found[name] = f"Default for {'/'.join(param.opts)}."
    return dict(sorted({**found, **ENVIRONMENT}.items()))


def man_page(prog: str, command: click.Command) -> str:
    root = click.Context(command, None, prog, **command.context_settings)
    top, *subs = contexts = list(walk(root))
    help_text = cleandoc((command.help or "").split("\f")[0])
    summary, _, description = help_text.partition("\n\n")
    out = [
        f'.TH "{escape(prog.upper())}" 1 "" "eda {escape(__version__)}" "eda manual"',
        ".SH NAME",
        f"{escape(prog)} \\- {escape(' '.join(summary.split()).rstrip('.'))}",
        ".SH SYNOPSIS",
        "\n.br\n".join(synopsis(ctx) for ctx in contexts),
        ".SH DESCRIPTION",
        *paragraphs(description or summary),
        ".PP",
        escape(PRECEDENCE),
        ".SH OPTIONS",
        *options(top),
    ]
    if subs:
        out.append(".SH COMMANDS")
    for ctx in subs:
        out += [".SS " + escape(ctx.command_path), synopsis(ctx)]
        out += paragraphs(ctx.command.help or "") + options(ctx)
    pairs = [pair for ctx in contexts for pair in examples(ctx.command.epilog or "")]
    if pairs:
        out.append(".SH EXAMPLES")
    for cmd, what in pairs:
        out += [".TP", bold(cmd), escape(what)] if what else [".PP", bold(cmd)]
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        out += [".TP", bold(code), escape(meaning)]
    out.append(".SH ENVIRONMENT")
    for name, meaning in envvars(contexts).items():
        out += [".TP", bold(name), escape(meaning)]
    out.append(".SH FILES")
    for path, meaning in FILES:
        out += [".TP", italic(path), escape(meaning)]
    others = [f"{bold(other)}(1)" for other in sorted(PROGRAMS) if other != prog]
    if others:
        out += [".SH SEE ALSO", ",\n".join(others)]
    return "\n".join(out) + "\n"


def completion(prog: str, command: click.Command, shell: str) -> str:
    complete_var = "_{}_COMPLETE".format(re.sub(r"\W", "_", prog).upper())
    shell_class = get_completion_class(shell)
    assert shell_class is not None, shell
    source = shell_class(command, {}, prog, complete_var).source().rstrip("\n") + "\n"
    if shell == "bash":
        source = bash_default_files(source)
    return source


def bash_default_files(source: str) -> str:
    """*source* registering with ``-o default``: where the program offers nothing (a
    file argument, ``--exec ./script``), bash completes file names as usual."""
    registered, count = re.subn(r"^(\s*complete )", r"\1-o default ", source, flags=re.M)
    if count != 1:
        raise SystemExit(f"gendocs: no single 'complete' line in click's bash script ({count})")
    return registered


def help_texts(prog: str, command: click.Command) -> dict[tuple[str, str, int], str]:
    """What ``PROG [SUBCOMMAND] --help`` prints, as click renders it for each width in
    :data:`eda.cli.launch.HELP_WIDTHS`: (program, subcommand or "", width) -> text."""
    texts: dict[tuple[str, str, int], str] = {}
    for width in HELP_WIDTHS:
        root = click.Context(command, None, prog, terminal_width=width, **command.context_settings)
        for ctx in walk(root):
            sub = ctx.info_name if ctx is not root and ctx.info_name else ""
            texts[(prog, sub, width)] = ctx.get_help() + "\n"
    return texts


def help_module(texts: dict[tuple[str, str, int], str]) -> str:
    """cli/helptext.py: the help texts ``eda.cli.launch`` prints without importing click."""
    lines = [
        '"""What each program\'s ``--help`` prints, for eda.cli.launch: generated by',
        "scripts/gendocs.py from the click commands (``make docs``; tests/test_docs.py checks",
        'it is current).  Do not edit."""',
        "",
        "# ruff: noqa: E501",
        "",
        "HELP: dict[tuple[str, str, int], str] = {",
    ]
    lines += [f"    {key!r}: {text!r}," for key, text in sorted(texts.items())]
    return "\n".join([*lines, "}", ""])


def generate() -> dict[str, str]:
    """Relative path -> content of every generated file."""
    files: dict[str, str] = {}
    texts: dict[tuple[str, str, int], str] = {}
    for prog, module in sorted(PROGRAMS.items()):
        command: click.Command = importlib.import_module(module).command
        assign_envvars(command, prog)
        files[f"man/{prog}.1"] = man_page(prog, command)
        for shell, name in COMPLETIONS.items():
            files[f"completions/{name.format(prog=prog)}"] = completion(prog, command, shell)
        texts.update(help_texts(prog, command))
    files[HELP_MODULE] = help_module(texts)
    return files


def on_disk(out: Path) -> set[str]:
    """Generated-looking files under *out*, to spot those of removed programs."""
    patterns = ["man/*.1", *(f"completions/{n.format(prog='*')}" for n in COMPLETIONS.values())]
    return {str(path.relative_to(out)) for pattern in patterns for path in out.glob(pattern)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="report stale files, write nothing")
    parser.add_argument("--out", type=Path, default=ROOT, help="root of man/ and completions/")
    args = parser.parse_args(argv)
    files = generate()
    if args.out.resolve() != ROOT:  # the help texts are the package's, kept in this tree only
        files.pop(HELP_MODULE)
    stale = sorted(
        path
        for path, text in files.items()
        if not (args.out / path).is_file() or (args.out / path).read_text("utf-8") != text
    )
    orphans = sorted(on_disk(args.out) - files.keys())
    if args.check:
        for path in stale:
            print(f"gendocs: stale: {path}", file=sys.stderr)
        for path in orphans:
            print(f"gendocs: not generated by any program: {path}", file=sys.stderr)
        if stale or orphans:
            print("gendocs: run 'python scripts/gendocs.py' to regenerate", file=sys.stderr)
            return 1
        return 0
    for path in stale:
        (args.out / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out / path).write_text(files[path], "utf-8")
        print(f"gendocs: wrote {path}", file=sys.stderr)
    for path in orphans:
        (args.out / path).unlink()
        print(f"gendocs: removed {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
