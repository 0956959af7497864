"""eda-txn saga: run a saga from a TOML file, continue one (--resume), check one
(--dry-run), write a template (init); its progress as JSON Lines or a terminal view."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Exit, Registries, Terminated, write_stdout
from eda.cli.options import (
    SecureMode,
    common_options,
    output_options,
    registry_option,
    security_options,
)
from eda.cli.output import Column, Output, TableView, for_terminal
from eda.core.errors import ExitStatus, UsageError

if TYPE_CHECKING:
    from rich.text import Text


# -- sagas: saga, saga init ----------------------------------------------------------------


SAGA_EPILOG = """\b
Examples:
  eda-txn saga init order.toml                     write a commented template
  eda-txn saga --dry-run order.toml                check the file and print the plan
  eda-txn saga order.toml --data '{"order": 7}'    run it: exit 0 completed, 5 compensated, 1 stuck
  eda-txn saga order.toml --id order-7 --data @order.json   your own id; the data from a file
  eda-txn saga --resume order-7                    go on after a crash, or retry a stuck saga
  eda-txn saga order.toml | jq -c 'select(.event == "step-failed")'
  eda-txn saga --secure order.toml --data @order.json   publish and call steps over CURVE
"""

SAGA_FIELDS = (
    "saga", "event", "time", "step", "attempt", "error", "final", "retry_in", "output",
    "note", "name", "data", "from",
)  # fmt: skip

PLAN_FIELDS = (
    "stage", "step", "line", "action", "compensate", "timeout", "retry", "group", "pivot",
    "retriable",
)  # fmt: skip


SAGA_COLOURS = {
    "saga-started": "bold",
    "step-done": "green",
    "step-failed": "red",
    "saga-aborting": "bold red",
    "compensation-started": "yellow",
    "compensation-done": "yellow",
    "compensation-failed": "red",
    "saga-completed": "bold green",
    "saga-compensated": "bold yellow",
    "saga-stuck": "bold red",
    "saga-resumed": "bold",
}


@click.command("saga", epilog=SAGA_EPILOG)
@click.argument("file", required=False, metavar="[FILE]")
@click.argument("init_file", required=False, metavar="[INIT_FILE]")
@click.option(
    "--data",
    metavar="JSON",
    help="The saga data, a JSON object ('{}' by default): @FILE reads it from a file, - from"
    " stdin.  Every step gets it on stdin.",
)
@click.option(
    "--id",
    "saga_id",
    metavar="ID",
    help="The saga's id (default: NAME-DATE-TIME-RANDOM); one log per id.",
)
@click.option("--resume", metavar="ID", help="Continue saga ID from its log (no FILE).")
@click.option("--dry-run", is_flag=True, help="Check FILE and print the plan; run nothing.")
@click.option(
    "--log",
    "log_dir",
    default="txn",
    show_default=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Log directory; a saga's log is DIR/sagas/ID.jsonl (JSON Lines, fsynced).",
)
@click.option("--force", is_flag=True, help="saga init: overwrite an existing file.")
@output_options(
    "One line per event from a template, e.g. '{event} {step} {error}'. "
    f"Fields: {', '.join(SAGA_FIELDS)}.  With --dry-run, one line per step; "
    f"fields: {', '.join(PLAN_FIELDS)}."
)
@security_options
@registry_option
@common_options
def saga(
    file: str | None,
    init_file: str | None,
    data: str | None,
    saga_id: str | None,
    resume: str | None,
    dry_run: bool,
    log_dir: str,
    force: bool,
    template: str | None,
    force_json: bool,
    secure: SecureMode,
    registry: Registries,
    ctx: Context,
) -> None:
    """Run the saga in FILE (TOML), or continue one with --resume ID.

    Steps run in order (a group's steps in parallel), each a shell command
    (run), an eda-lb service call (call) or a publish; a step that fails for
    good has the completed steps compensated in reverse order.  Progress is
    printed as JSON Lines (a readable view on a terminal), the same records
    as the log.  Exit status: 0 completed, 5 compensated (aborted), 1 stuck
    (a compensation failed for good: fix the cause, then --resume).

    With --secure, publish steps reach only subscribers whose key is trusted
    and call steps only workers whose key is trusted (a step's connect
    endpoints then name the key: NAME@tcp://HOST:PORT).

    'eda-txn saga init [FILE]' writes a commented template to FILE
    (saga.toml by default, - for stdout).
    """
    from eda.core.txn import saga as sagas
    from eda.core.txn import sagafile
    from eda.core.txn.data import read_data

    secure.apply()
    if file == "init" and resume is None and not dry_run:
        _saga_init(ctx, init_file or "saga.toml", force)
        return
    if init_file is not None:
        raise UsageError(f"unexpected argument {init_file!r}: give one FILE")
    if resume is not None and (file is not None or data is not None or saga_id is not None):
        raise UsageError("--resume ID continues a logged saga: no FILE, --data or --id")
    if resume is None and file is None:
        raise UsageError("missing FILE (or --resume ID)")
    if dry_run:
        if file is None:
            raise UsageError("--dry-run checks a FILE")
        plan = sagafile.load(file)
        sagas.check_runnable(plan)
        _saga_plan(ctx, plan, template, force_json)
        return
    out = Output(
        ctx,
        template=template,
        fields=SAGA_FIELDS,
        force_json=force_json,
        terminal=_saga_line,
    )

    def on_stderr(step: str, chunk: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

    printing = [True]

    def on_event(record: dict[str, Any]) -> None:
        if printing[0]:
            try:
                out.items([record])
            except Exit:  # stdout closed (| head): the saga goes on, unprinted
                printing[0] = False

    options: dict[str, Any] = {
        "on_event": on_event,
        "on_stderr": on_stderr,
        "reach": sagas.Reach(
            interface=_interface_address(ctx.interface),
            mdns=not ctx.no_mdns,
            registries=registry.given,
            serverless=registry.serverless,
        ),
    }
    if resume is not None:
        run_ = sagas.resume(log_dir, resume, **options)
        if run_.repaired:
            ctx.warn(f"warning: cut a torn tail of {run_.repaired} bytes from the log of {resume}")
        sagas.check_runnable(run_.plan)
    else:
        assert file is not None
        plan = sagafile.load(file)
        sagas.check_runnable(plan)
        payload = read_data(data, sys.stdin.buffer)
        run_ = sagas.start(plan, payload, log_dir, saga_id=saga_id, **options)
    try:
        status = run_.run()
    except Terminated:
        ctx.warn(f"interrupted: continue with eda-txn saga --resume {run_.saga_id}")
        raise Exit(ExitStatus.INTERRUPTED) from None
    except KeyboardInterrupt:
        ctx.warn(f"interrupted: continue with eda-txn saga --resume {run_.saga_id}")
        raise
    finally:
        run_.close()
    state = run_.state
    if status == sagas.COMPENSATED:
        failed = state.failed_step or ""
        ctx.warn(
            f"saga {run_.saga_id} aborted: step {for_terminal(failed)} failed"
            f" ({for_terminal(state.steps[failed].error)}); completed steps compensated"
        )
        raise Exit(ExitStatus.LOSS)
    if status == sagas.STUCK:
        step = state.stuck_step or ""
        ctx.error(
            f"saga {run_.saga_id} is stuck: compensation of {for_terminal(step)} failed"
            f" ({for_terminal(state.steps[step].error)}); fix it, then run"
            f" eda-txn saga --resume {run_.saga_id}"
        )
        raise Exit(ExitStatus.ERROR)


def _interface_address(interface: str | None) -> str | None:
    if not interface:  # (the usual case: no network module loaded at all)
        return None
    from eda.core.registry.access import resolve_interface

    return resolve_interface(interface)


def _saga_init(ctx: Context, target: str, force: bool) -> None:
    from eda.core.txn.sagafile import template

    text = template()
    if target == "-":
        write_stdout(text.encode())
        return
    try:
        with open(target, "w" if force else "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise UsageError(f"{target} exists already (--force overwrites it)") from None
    ctx.warn(f"wrote {target}: edit it, then eda-txn saga --dry-run {target}")


def _saga_plan(ctx: Context, plan: Any, template: str | None, force_json: bool) -> None:
    """The plan: one JSON object per step (a --format line), or a table on a terminal."""
    rows: list[dict[str, Any]] = []
    for stage, members in enumerate(plan.stages(), 1):
        for step in members:
            comp = step.compensate
            rows.append(
                {
                    "stage": stage,
                    "step": step.name,
                    "line": step.line,
                    "action": step.action.describe(),
                    "compensate": comp.describe() if comp else None,
                    "timeout": step.action.timeout,
                    "retry": step.action.retry.to_dict(),
                    "group": step.group,
                    "pivot": step.pivot,
                    "retriable": step.retriable,
                }
            )
    out = Output(ctx, template=template, fields=PLAN_FIELDS, force_json=force_json)
    out.table(rows, _plan_view(plan.name))


def _plan_cells(r: dict[str, Any]) -> list[Any]:
    note = "pivot" if r["pivot"] else "retriable" if r["retriable"] else ""
    if r["group"]:
        note = f"group {r['group']} {note}".strip()
    tries = "until done" if r["retriable"] else str(r["retry"]["attempts"])
    timeout = f"{r['timeout']:g}s" if r["timeout"] else "-"
    return [str(r["stage"]), r["step"], r["action"], r["compensate"] or "-", timeout, tries, note]


def _plan_view(name: str) -> TableView:
    return TableView(
        (
            Column("STAGE"),
            Column("STEP"),
            Column("ACTION", wrap=True),
            Column("COMPENSATE", priority=1, wrap=True),
            Column("TIMEOUT", priority=3),
            Column("TRIES", priority=4),
            Column("NOTE", priority=2, wrap=True),
        ),
        _plan_cells,
        title=f"saga {name}",
    )


def _saga_line(record: dict[str, Any]) -> Text:
    """One saga event as rich Text (values escaped, never markup)."""
    from rich.text import Text

    event = str(record.get("event", ""))
    line = Text()
    line.append(for_terminal(str(record.get("time", ""))[11:23]), style="dim")
    line.append(" ")
    line.append(f"{for_terminal(event):<21}", style=SAGA_COLOURS.get(event, "cyan"))
    parts: list[str] = []
    if event == "saga-started":
        parts.append(f"{record.get('name')} {record.get('saga')}")
    elif "step" in record:
        parts.append(str(record["step"]))
    if "attempt" in record:
        parts.append(f"try {record['attempt']}")
    if record.get("error"):
        parts.append(str(record["error"]))
    if "retry_in" in record:
        parts.append(f"(again in {record['retry_in']}s)")
    if record.get("output"):
        import json

        parts.append(json.dumps(record["output"], ensure_ascii=False)[:200])
    if record.get("note"):
        parts.append(f"({record['note']})")
    if event == "saga-resumed":
        parts.append(f"{record.get('saga')} from {record.get('from')}")
    line.append(" " + for_terminal(" ".join(parts)))
    return line
