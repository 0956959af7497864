"""eda-txn resolve: settle transactions left in doubt.

The group (cli/txn.py) imports this module only when ``eda-txn resolve`` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Exit, Registries
from eda.cli.options import (
    LOG_HELP,
    SecureMode,
    common_options,
    json_option,
    registry_option,
    seconds_option,
    security_options,
)
from eda.cli.output import Output
from eda.cli.txn import peer_reports, txn_access
from eda.core.errors import EdaError, ExitStatus, NotFoundError

if TYPE_CHECKING:
    pass


@click.command(
    epilog="""\b
Examples:
  eda-txn resolve c1.18f3a2b4c5d6e7 --commit             participants of ./txn in doubt about it
  eda-txn resolve c1.18f3a2b4c5d6e7 --abort --participant stock
  eda-txn resolve --abort --coordinator ghost            all those of coordinator ghost, at once
  eda-txn resolve --abort --unanswered --older-than 3600 --participant stock
"""
)
@click.argument("txn_id", metavar="[ID]", required=False)
@click.option("--commit", is_flag=True, help="Commit it at the participants in doubt.")
@click.option("--abort", is_flag=True, help="Abort it at the participants in doubt.")
@click.option(
    "--participant",
    "names",
    multiple=True,
    metavar="NAME",
    help="Participant to settle, found by name (default: those of --log in doubt about ID).",
)
@click.option(
    "--coordinator",
    "coordinator",
    metavar="NAME",
    help="No ID: every transaction in doubt that coordinator NAME started.",
)
@seconds_option(
    "--older-than", type=click.FloatRange(min=0),
    help="No ID: every transaction in doubt that was prepared at least SECONDS ago."
)
@click.option(
    "--unanswered",
    is_flag=True,
    help="No ID: every transaction in doubt whose coordinator does not answer.",
)
@seconds_option(
    "--timeout",
    help="Give up on a participant that has not answered after this long (exit 1) "
    "[default: 15 s for an ID, 60 s for each page of a selection]"
)
@click.option("--log", "log_dir", default="txn", show_default=True, metavar="DIR", help=LOG_HELP)
@json_option("JSON even on a terminal.")
@security_options
@registry_option
@common_options
def resolve(
    txn_id: str | None,
    commit: bool,
    abort: bool,
    names: tuple[str, ...],
    coordinator: str | None,
    older_than: float | None,
    unanswered: bool,
    timeout: float | None,
    log_dir: str,
    force_json: bool,
    secure: SecureMode,
    registry: Registries,
    ctx: Context,
) -> None:
    """Settle an in-doubt transaction by hand (a heuristic decision), or every one
    that --coordinator, --older-than and --unanswered select (all given must hold).

    The participants apply the outcome at once and record that an operator
    chose it; if the coordinator later decides otherwise, both report a
    heuristic hazard (see `status`) instead of hiding it.  Prints one line
    per transaction settled at a participant.  Exit status: 0 done, 3 none
    in doubt (or matching), 1 a participant failed, could not be reached or
    did not answer within --timeout.
    With --secure, a participant is asked under the key its journal records
    (or its registry record), when that key is trusted.
    """
    from eda.core.txn.directory import Directory
    from eda.core.txn.protocol import check_name, check_txn
    from eda.core.txn.resolve import settle, whom

    secure.apply()
    if commit == abort:
        raise click.UsageError(
            "say --commit or --abort" if not commit else "--commit and --abort conflict: say one"
        )
    outcome = "commit" if commit else "abort"
    filtered = coordinator is not None or older_than is not None or unanswered
    if txn_id is not None and filtered:
        raise click.UsageError("give an ID, or --coordinator/--older-than/--unanswered: not both")
    if txn_id is None and not filtered:
        raise click.UsageError("give an ID, or select with --coordinator/--older-than/--unanswered")
    try:
        if txn_id is not None:
            check_txn(txn_id)
        if coordinator is not None:
            check_name(coordinator, "coordinator name")
    except EdaError as exc:
        raise click.UsageError(str(exc)) from None

    access = txn_access(registry, ctx)
    directory = Directory(access=access)
    peer_reports(ctx, directory, "participant")
    targets = whom(log_dir, txn_id, coordinator, names, directory)
    if not targets:
        which = txn_id or "the transactions selected"
        raise NotFoundError(f"no participant in {log_dir} is in doubt about {which}")
    out = Output(ctx, force_json=force_json)
    failed = settled = 0
    request: dict[str, Any] = {"op": "resolve", "outcome": outcome}
    if txn_id is not None:
        request["txn"] = txn_id
    else:
        selection = {"coordinator": coordinator, "older_than": older_than, "limit": 100}
        request.update({k: v for k, v in selection.items() if v is not None})
        if unanswered:
            request["unanswered"] = True
    for name, endpoint in sorted(targets.items()):
        try:
            for done, failures in settle(name, endpoint, request, timeout):
                settled += len(done)
                out.items(done)
                for item in failures:
                    failed += 1
                    ctx.error(f"{name}: {item.get('txn')}: {item.get('error')}")
        except EdaError as exc:
            failed += 1
            ctx.error(f"{name}: {exc}")
    if failed:
        raise Exit(ExitStatus.ERROR)
    if not settled:
        raise NotFoundError("no transaction in doubt matches at the participants asked")
