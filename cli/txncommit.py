"""eda-txn commit: one transaction, committed or aborted (a one-shot command).

The group (cli/txn.py) imports this module only when ``eda-txn commit`` runs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Exit, Registries
from eda.cli.options import (
    SECURE_ENDPOINT,
    SecureMode,
    common_options,
    output_options,
    registry_option,
    seconds_option,
    security_options,
)
from eda.cli.output import Output, for_terminal
from eda.cli.txn import peer_reports, txn_access
from eda.core.errors import EdaError, ExitStatus

if TYPE_CHECKING:
    from rich.text import Text


RESULT_FIELDS = ("txn", "outcome", "votes", "reason")


@click.command(
    epilog="""\b
Examples:
  eda-txn commit --participants stock,pay --data '{"order": 7, "qty": 2}'
  echo '{"order": 8}' | eda-txn commit --participants stock,pay --data -
  eda-txn commit -p stock -p pay --timeout 2 --format '{outcome} {txn}' || echo "exit $?"
  eda-txn commit --secure --coordinator c1@tcp://10.0.0.5:7730 -p stock,pay --data @order.json
"""
)
@click.option(
    "--participants",
    "-p",
    "participants",
    multiple=True,
    required=True,
    metavar="A,B,...",
    help="Participants by name (comma-separated or repeated).",
)
@click.option(
    "--data",
    default="{}",
    show_default=True,
    metavar="JSON|-",
    help="The transaction's data: a JSON object (@FILE reads it from a file, - from stdin).",
)
@click.option(
    "--coordinator",
    metavar="ENDPOINT",
    help=f"Coordinator to ask (default: the last one found, else discovery); {SECURE_ENDPOINT}.",
)
@seconds_option(
    "--timeout",
    help="Abort the transaction unless every vote is in by then "
    "[default: what the coordinator was started with, 5 s by default]"
)
@seconds_option(
    "--wait",
    help="Give up waiting for the outcome after this long (exit 4: outcome unknown) "
    "[default: --timeout + 10, else 30]"
)
@output_options(
    f"Print the result from a template. Fields: {', '.join(RESULT_FIELDS)}.",
    "JSON even on a terminal.",
)
@security_options
@registry_option
@common_options
def commit(
    participants: tuple[str, ...],
    data: str,
    coordinator: str | None,
    timeout: float | None,
    wait: float | None,
    template: str | None,
    force_json: bool,
    secure: SecureMode,
    registry: Registries,
    ctx: Context,
) -> None:
    """Run one transaction across participants: exit 0 committed, 5 aborted.

    Prints the transaction id, the outcome, each participant's vote and why
    it aborted.  --timeout bounds the voting (a participant silent that long
    aborts the transaction); --wait bounds how long this command waits.

    \b
    Exit status:
      0  committed
      5  aborted (a no vote, a participant silent past --timeout or not found)
      4  no answer from the coordinator within --wait: the outcome is
         unknown (see `status`); or the --coordinator given refused the
         connection: nothing was sent, nothing committed
      3  no coordinator found;  2  bad options or --data;  1  refused (with
         --secure: also a coordinator that does not trust this key)
    """
    from eda.core.reqrep import Unavailable, tcp_reachable
    from eda.core.txn.client import CoordinatorClient
    from eda.core.txn.data import read_data
    from eda.core.txn.protocol import MAX_DATA, check_participants, data_json

    secure.apply()
    names = [n.strip() for item in participants for n in item.split(",") if n.strip()]
    try:
        check_participants(names)
    except EdaError as exc:
        raise click.UsageError(str(exc)) from None
    payload = read_data(data, sys.stdin.buffer, limit=4 * MAX_DATA)
    try:
        data_json(payload)  # too big, or not UTF-8: refused here, not by the coordinator
    except EdaError as exc:
        raise click.UsageError(f"--data: {exc}") from None
    if wait is None:
        wait = 30.0 if timeout is None else timeout + 10.0
    out = Output(
        ctx, template=template, fields=RESULT_FIELDS, force_json=force_json, terminal=_result_text
    )
    access = txn_access(registry, ctx)
    client = CoordinatorClient(coordinator, access, wait)  # (secure mode: KEY@ENDPOINT checked)
    peer_reports(ctx, client, "coordinator")
    if client.explicit and not tcp_reachable(client.explicit[0], 1.0):
        where = client.explicit[0].zmq
        ctx.error(f"cannot reach the coordinator at {where}: nothing was committed")
        raise Exit(ExitStatus.TIMEOUT)
    msg: dict[str, Any] = {"op": "commit", "participants": names, "data": payload}
    if timeout is not None:
        msg["timeout"] = timeout
    try:
        reply = client.request(msg)
    except Unavailable:
        ctx.error(
            f"no answer from the coordinator within {wait:g}s: "
            "the outcome is unknown (see eda-txn status)"
        )
        raise Exit(ExitStatus.TIMEOUT) from None
    finally:
        client.close()
    result = {k: reply.get(k) for k in RESULT_FIELDS}
    out.items([result])
    if result["outcome"] != "committed":
        raise Exit(ExitStatus.LOSS)


def _result_text(result: dict[str, Any]) -> Text:
    from rich.text import Text

    outcome = for_terminal(result.get("outcome"))
    line = Text(outcome, style="green" if outcome == "committed" else "red")
    line.append(f" {for_terminal(result.get('txn'))}  ")
    votes = result.get("votes") or {}
    line.append(" ".join(for_terminal(f"{n}:{v}") for n, v in votes.items()))
    if result.get("reason"):
        line.append(f"  ({for_terminal(result['reason'])})", style="dim")
    return line
