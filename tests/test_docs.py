"""Man pages and completions are generated from the click commands and kept current.

Run ``python scripts/gendocs.py`` after changing an option, a docstring or an
epilog; these tests fail until the committed files match the commands.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import click
import pytest

from eda.cli import PROGRAMS
from eda.core import __version__

ROOT = Path(__file__).resolve().parent.parent
GENDOCS = ROOT / "scripts" / "gendocs.py"
BIN = Path(sys.executable).parent


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def gendocs(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, str(GENDOCS), *args)


def command_of(program: str) -> click.Command:
    command: click.Command = importlib.import_module(PROGRAMS[program]).command
    return command


def man_text(program: str) -> str:
    """The man page with roff escapes and font changes undone, as a reader sees it."""
    roff = (ROOT / "man" / f"{program}.1").read_text()
    for escape, plain in [("\\-", "-"), ("\\(aq", "'"), ("\\(ga", "`"), ("\\&", ""), ("\\e", "\\")]:
        roff = roff.replace(escape, plain)
    return re.sub(r"\\f[BIRP]", "", roff)


def commands(program: str) -> list[tuple[list[str], click.Command]]:
    """The program's command and, for a group, its subcommands, with their argv prefix."""
    found: list[tuple[list[str], click.Command]] = []
    todo: list[tuple[list[str], click.Command]] = [([], command_of(program))]
    while todo:
        path, command = todo.pop(0)
        found.append((path, command))
        if isinstance(command, click.Group):
            subs = sorted(command.commands.items())
            todo += [([*path, name], sub) for name, sub in subs if not sub.hidden]
    return found


def options(program: str) -> list[str]:
    return [
        opt
        for _, command in commands(program)
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden
        for opt in [*param.opts, *param.secondary_opts]
    ]


def test_generated_files_are_current() -> None:
    result = gendocs("--check")
    assert result.returncode == 0, f"run 'python scripts/gendocs.py':\n{result.stderr}"
    assert result.stdout == ""


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    """A copy of man/ and completions/ the test may alter (the real ones stay untouched)."""
    for folder in ("man", "completions"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


def test_check_names_an_altered_man_page(docs_copy: Path) -> None:
    assert gendocs("--check", "--out", str(docs_copy)).returncode == 0
    page = docs_copy / "man" / "eda-pub.1"
    page.write_text(page.read_text().replace(".SH OPTIONS", ".SH OPTIONS\nStale text."))

    result = gendocs("--check", "--out", str(docs_copy))

    assert result.returncode == 1
    assert "man/eda-pub.1" in result.stderr
    assert "completions/" not in result.stderr
    assert result.stdout == ""


def test_check_names_missing_and_orphaned_files(docs_copy: Path) -> None:
    (docs_copy / "completions" / "eda-sub.fish").unlink()
    (docs_copy / "man" / "eda-gone.1").write_text(".TH EDA-GONE 1\n")

    result = gendocs("--check", "--out", str(docs_copy))

    assert result.returncode == 1
    assert "completions/eda-sub.fish" in result.stderr
    assert "man/eda-gone.1" in result.stderr


def test_regenerating_fixes_the_tree(docs_copy: Path) -> None:
    (docs_copy / "man" / "eda-sub.1").write_text("garbage\n")
    (docs_copy / "man" / "eda-gone.1").write_text(".TH EDA-GONE 1\n")

    assert gendocs("--out", str(docs_copy)).returncode == 0

    assert gendocs("--check", "--out", str(docs_copy)).returncode == 0
    assert (docs_copy / "man" / "eda-sub.1").read_text() == (ROOT / "man" / "eda-sub.1").read_text()
    assert not (docs_copy / "man" / "eda-gone.1").exists()


def test_generating_into_an_empty_tree_matches_the_committed_files(tmp_path: Path) -> None:
    assert gendocs("--out", str(tmp_path)).returncode == 0
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert len(made) == 4 * len(PROGRAMS)
    for path in made:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), path


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_option_is_in_the_man_page(program: str) -> None:
    text = man_text(program)
    # options of subcommands are documented under COMMANDS
    documented = text.split(".SH OPTIONS", 1)[1].split(".SH EXAMPLES", 1)[0]
    lines = documented.splitlines()
    tags = [line for before, line in pairwise(lines) if before == ".TP"]
    flags = {word for tag in tags for word in re.split(r"[\s,/]+", tag)}
    for opt in options(program):
        assert opt in flags, f"{opt} is not listed in man/{program}.1"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_man_page_structure(program: str) -> None:
    roff = (ROOT / "man" / f"{program}.1").read_text()
    lines = roff.splitlines()
    assert lines[0].startswith(".TH ")
    assert __version__ in lines[0]
    sections = [line[4:].strip('"') for line in lines if line.startswith(".SH ")]
    for needed in (
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "EXAMPLES",
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
    ):
        assert needed in sections
    if len(PROGRAMS) > 1:
        assert "SEE ALSO" in sections
    name_line = lines[lines.index(".SH NAME") + 1]
    assert name_line.startswith(program.replace("-", "\\-") + " \\- ")
    # a text line starting with a dot or an apostrophe would be read as a request
    for line in lines:
        if line and line[0] in ".'":
            assert re.match(r"\.(TH|SH|SS|PP|TP|br|nf|fi)\b", line), line
    text = man_text(program)
    for code in ("0", "1", "2", "3", "4", "5", "130"):
        assert f"\n{code}\n" in text
    for var in ("EDA_CONFIG", "EDA_INTERFACE", "EDA_NO_MDNS", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        assert var in text
    assert "$XDG_CACHE_HOME/eda/discovery.json" in text
    for other in set(PROGRAMS) - {program}:
        assert f"{other}(1)" in text.split(".SH SEE ALSO", 1)[1]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_has_examples_and_version_prints(program: str) -> None:
    for path, _ in commands(program):
        helped = run(sys.executable, "-m", PROGRAMS[program], *path, "--help")
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith(f"Usage: {' '.join([program, *path])} ")
        assert helped.stderr == ""
        after = helped.stdout.split("Examples:", 1)
        assert len(after) == 2, f"no Examples: section in {program} {' '.join(path)} --help"
        examples = [line for line in after[1].splitlines() if line.strip()]
        assert examples and all(line.startswith("    ") for line in examples)

    version = run(sys.executable, "-m", PROGRAMS[program], "--version")
    assert (version.returncode, version.stderr) == (0, "")
    assert version.stdout == f"{program} {__version__}\n"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_console_script_answers_completion_requests(program: str) -> None:
    """The completion scripts call the installed program with _<PROG>_COMPLETE set."""
    script = BIN / program
    assert script.exists(), f"{program} is not installed as a console script"
    var = "_{}_COMPLETE".format(program.replace("-", "_").upper())
    assert var in (ROOT / "completions" / f"{program}.bash").read_text()
    request = {var: "bash_complete", "COMP_WORDS": f"{program} --", "COMP_CWORD": "1"}
    result = run(str(script), env=request)
    assert result.returncode == 0, result.stderr
    assert "plain,--help" in result.stdout.splitlines()


def test_readme_exit_table_is_the_exit_status_enum() -> None:
    from eda.cli.common import EXIT_MEANINGS, ExitStatus

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    assert [(int(code), meaning.strip()) for code, meaning in rows] == [
        (int(code), meaning) for code, meaning in EXIT_MEANINGS.items()
    ]
    assert set(EXIT_MEANINGS) == set(ExitStatus)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_option_has_an_environment_variable_the_readme_explains(program: str) -> None:
    from eda.cli.common import SHARED_ENVVARS, assign_envvars, envvar_prefix

    command = command_of(program)
    assign_envvars(command, program)
    readme = (ROOT / "README.md").read_text().split("**Environment variables.**", 1)[1]
    readme = readme.split("\n\n", 1)[0]
    man = man_text(program).split(".SH ENVIRONMENT", 1)[1]
    for _, cmd in commands(program):
        for param in cmd.params:
            if not isinstance(param, click.Option) or not param.expose_value:
                continue
            long = next(opt for opt in param.opts if opt.startswith("--"))
            rule = f"{envvar_prefix(program)}_{long[2:].replace('-', '_').upper()}"
            assert param.envvar, f"{program} {long} has no environment variable"
            if param.envvar != rule:  # an exception: named in the README
                assert f"`{param.envvar}`" in readme, f"{param.envvar} ({long}) not in README"
            assert param.envvar in man, f"{param.envvar} not in man/{program}.1"
    assert all(f"`{name}`" in readme for name in SHARED_ENVVARS.values())


def test_environment_variables_sit_between_flags_and_config(tmp_path: Path) -> None:
    (tmp_path / "eda.toml").write_text("[sub]\ntimeout = 30\n")
    argv = [sys.executable, "-m", "eda.cli.sub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t"]
    env = {**os.environ, "EDA_SUB_TIMEOUT": "0.2"}
    by_env = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert by_env.returncode == 4 and "no event for 0.2 s" in by_env.stderr  # env beats the file
    by_flag = subprocess.run(
        [*argv, "-W", "0.1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert by_flag.returncode == 4 and "no event for 0.1 s" in by_flag.stderr  # the flag beats env
    bad = subprocess.run(
        argv,
        cwd=tmp_path,
        env={**env, "EDA_SUB_HWM": "lots"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "hwm" in bad.stderr.lower()


def test_a_group_without_a_subcommand_prints_its_help_not_an_error() -> None:
    result = run(sys.executable, "-m", PROGRAMS["eda-registry"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("Usage: eda-registry ") and "error:" not in result.stderr
    assert "Commands:" in result.stderr


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_mentions_only_options_the_command_has(program: str) -> None:
    for path, command in commands(program):
        ctx = click.Context(command, info_name=" ".join([program, *path]))
        text = command.get_help(ctx).split("Examples:", 1)[0]  # examples may pipe to others
        sub_commands = [c for _, c in commands(program)] if isinstance(command, click.Group) else []
        known = {
            opt
            for cmd in [command, *sub_commands]
            for param in cmd.params
            for opt in [*param.opts, *param.secondary_opts]
        }
        mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))
        assert mentioned <= known, f"{program} {' '.join(path)}: {sorted(mentioned - known)}"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_bash_completion_falls_back_to_file_names(program: str) -> None:
    """Registered with ``-o default``: `eda-txn saga or<TAB>`, `eda-sub --exec ./h<TAB>`
    complete file names where the program itself offers nothing."""
    bash = shutil.which("bash")
    assert bash is not None
    script = ROOT / "completions" / f"{program}.bash"
    result = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", f'source "$1" && complete -p {program}', "-", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")
    registration = result.stdout.split()
    assert registration[0] == "complete" and registration[-1] == program, result.stdout
    assert "default" in [b for a, b in pairwise(registration) if a == "-o"], result.stdout
