"""eda-txn: distributed transactions -- two-phase commit and sagas with compensation.

The group and its 2PC subcommands (coordinator, participant, commit, resolve),
after the helpers they share; `saga` is in ``txnsaga.py``, `status` in
``txnstatus.py``.  Over 500 lines for a reason: four subcommands whose option
declarations and help texts are most of it; the logic is in ``eda.core.txn``
(``--data`` in ``data.py``, advertised endpoints in ``advertise.py``, the
coordinator found in ``client.py``, whom ``resolve`` asks and how in ``resolve.py``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Exit, Terminated, registry_access, run
from eda.cli.options import (
    LOG_HELP,
    SECONDS,
    SECURE_ENDPOINT,
    allow_option,
    apply_security,
    common_options,
    json_option,
    metrics_option,
    output_options,
    registry_option,
    security_options,
    serve_metrics,
)
from eda.cli.output import Output, for_terminal
from eda.cli.secure import secure_reports
from eda.cli.txnsaga import saga
from eda.cli.txnstatus import status
from eda.core.errors import EdaError, ExitStatus, NotFoundError

if TYPE_CHECKING:
    from rich.text import Text

EPILOG = """\b
Examples:
  eda-txn coordinator --log ./txn                   a 2PC coordinator, announced by mDNS
  eda-txn participant stock --prepare ./reserve.sh --commit ./confirm.sh --abort ./release.sh
  eda-txn commit --participants stock,pay --data '{"order": 7}'   exit 0 committed, 5 aborted
  eda-txn saga order.toml --data '{"order": 7}'     run a saga; progress as JSON Lines
  eda-txn saga --resume ID                          continue a saga after a crash
  eda-txn status                                    where transactions and sagas stand
  eda-txn commit --secure -p stock,pay              CURVE: trusted keys only (eda-keys)
"""


@click.group(epilog=EPILOG, context_settings={"max_content_width": 100})
@common_options
def command(config: str | None, interface: str | None, no_mdns: bool, verbose: bool) -> None:
    """Distributed transactions: two-phase commit (coordinator, participant, commit,
    resolve) and sagas with compensation (saga), with durable logs and crash recovery."""


# -- shared by the subcommands ------------------------------------------------------------


def _access(
    registries: tuple[str, ...],
    interface: str | None,
    no_mdns: bool,
    serverless: bool,
    ctx: Context,
) -> Any:
    """How to find names (registry, else mDNS), or None when neither may be used."""
    if no_mdns and not registries:
        return None
    return registry_access(registries, interface, no_mdns, serverless, ctx)


def _serve(daemon: Any, ctx: Context, what: str) -> None:
    """Run *daemon* until SIGINT/SIGTERM; close it whatever happens."""
    try:
        daemon.serve()
    except Terminated:
        ctx.debug(f"{what}: stopping")
    except KeyboardInterrupt:  # stopped cleanly all the same, and the exit status says 130
        ctx.debug(f"{what}: stopping")
        raise
    finally:
        daemon.close()


def _register(daemon: Any, service: str, access: Any, ctx: Context, **kw: Any) -> Any:
    """Register *daemon* (registry or mDNS); a warning, not an error, when that fails."""
    from eda.core.daemon import port_of
    from eda.core.txn.directory import Registration

    if access is None:
        return None
    try:
        return Registration(daemon, service, port_of(daemon.endpoint), access, **kw)
    except EdaError as exc:
        ctx.warn(f"warning: not registered as {service}: {exc}")
        return None


def _reports(ctx: Context, node: Any, peers: str) -> Any:
    """Report what secure mode skips among the *peers* *node* finds (cli/secure.py's
    rules: a key not trusted is a rate-limited warning, the rest is shown with -v);
    *node* is a finder, or None for lookups of the caller's own (the reports returned)."""
    from types import SimpleNamespace

    from eda.cli.secure import UNTRUSTED_EVERY
    from eda.core import security

    if node is None:
        node = SimpleNamespace(security=security.active(), on_ignored=None, on_refused=None)
    secure_reports(ctx, node, peers)

    def skipped(text: str) -> None:  # an announcement the registry's lookup left out
        if "is not trusted" in text and ctx.due("untrusted", UNTRUSTED_EVERY):
            ctx.warn(f"warning: {text}")
        else:
            ctx.debug(text)

    node.on_skipped = skipped
    return node


@command.command(
    epilog="""\b
Examples:
  eda-txn coordinator --log ./txn                    announced by mDNS (or a registry)
  eda-txn coordinator --name c2 --bind 'tcp://*:7731' --log ./txn
  eda-txn coordinator --no-mdns --peer stock=tcp://10.0.0.7:7741 --peer pay=tcp://10.0.0.8:7742
  eda-txn coordinator --secure --allow shop --allow stock --allow pay --log ./txn
  eda-txn coordinator --secure --no-mdns --peer stock=stock@tcp://10.0.0.7:7741
"""
)
@click.option(
    "--name",
    metavar="NAME",
    help="Coordinator name, the prefix of its transaction ids  [default: host name]",
)
@click.option("--log", "log_dir", default="txn", show_default=True, metavar="DIR", help=LOG_HELP)
@click.option(
    "--bind", default="tcp://*:7730", show_default=True, metavar="ENDPOINT", help="Where to listen."
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    metavar="NAME=ENDPOINT",
    help="Where participant NAME listens, without discovery (repeatable); with --secure: "
    "NAME=KEY@tcp://HOST:PORT, KEY the trusted name of its key (eda-keys list).",
)
@click.option(
    "--vote-timeout",
    type=SECONDS,
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Abort a transaction whose votes are not all in by then (a commit may ask for another).",
)
@click.option(
    "--retry-max",
    type=SECONDS,
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest pause between two deliveries of a decision not yet acknowledged.",
)
@allow_option
@security_options
@registry_option
@metrics_option
@common_options
def coordinator(
    name: str | None,
    log_dir: str,
    bind: str,
    peers: tuple[str, ...],
    vote_timeout: float,
    retry_max: float,
    allow: tuple[str, ...],
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    registries: tuple[str, ...],
    serverless: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
    metrics: Any,
) -> None:
    """Run a two-phase commit coordinator: `commit` asks it to run transactions.

    The decision is fsynced before any participant hears it (group commit:
    one fsync for all the decisions of one loop turn); presumed abort.  On
    start, every decided transaction of the journal that is not done is
    driven to the end again.  Participants are found by name: --peer, else
    the registry, else mDNS.  Announced as the service txn-coordinator.  A
    --bind port of '*' is remembered next to the journal: restarted with the
    same command, the coordinator listens where its clients expect it.

    With --secure only trusted keys (eda-keys) reach it, and it asks only
    participants whose key it trusts (pinned from the registry record, the
    announcement, or --peer NAME=KEY@ENDPOINT); one skipped is a warning.
    --allow NAME limits who may call it: the clients that start transactions,
    and the participants, which ask it about transactions in doubt.
    """
    from eda.core.txn.advertise import advertised, default_name
    from eda.core.txn.coordinator import Coordinator, journal_path
    from eda.core.txn.directory import Directory, parse_peers
    from eda.core.txn.protocol import COORDINATOR_SERVICE, check_name

    ctx = Context("eda-txn", verbose)
    apply_security(secure, key_file, trust_dir, allow)
    name = check_name(name or default_name(), "coordinator name")
    access = _access(registries, interface, no_mdns, serverless, ctx)
    directory = Directory(parse_peers(peers), access=access)
    _reports(ctx, directory, "participant")
    coord = Coordinator(
        name, log_dir, directory=directory, bind=bind, vote_timeout=vote_timeout,
        retry_max=retry_max, log=ctx.debug, warn=ctx.warn, interface=access and access.interface,
        remember=True,
    )  # fmt: skip
    registration = None
    try:
        serve_metrics(coord, metrics, ctx.warn)
        registration = _register(
            coord, COORDINATOR_SERVICE, access, ctx,
            inst_id=f"txn-coordinator-{name}"[:63], meta={"name": name},
        )  # fmt: skip
        coord.advertise = advertised(
            coord.endpoint, registration and registration.inst.host, access and access.interface
        )
        where = f", announced by {registration.where}" if registration else ""
        recovering = f", recovering {len(coord.active)}" if coord.active else ""
        ctx.warn(
            f"coordinator {name} listening on {coord.advertise}{where} "
            f"(journal {journal_path(log_dir, name)}{recovering})"
        )
        _serve(coord, ctx, "coordinator")
    finally:
        if registration is not None:
            registration.close()
        coord.close()


@command.command(
    epilog="""\b
Examples:
  eda-txn participant stock --prepare ./reserve.sh --commit ./confirm.sh --abort ./release.sh
  eda-txn participant pay --persistent -- ./pay-agent
  eda-txn participant bank --bind 'tcp://*:7741' --prepare 'jq -e ".amount < 100"'
  eda-txn participant stock --secure --allow c1 --prepare ./reserve.sh --commit ./confirm.sh
"""
)
@click.argument("name")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, metavar="[-- AGENT [ARGS]...]")
@click.option(
    "--prepare",
    "prepare_cmd",
    metavar="CMD",
    help="Shell command voting on a transaction (exit 0: yes).",
)
@click.option(
    "--commit",
    "commit_cmd",
    metavar="CMD",
    help="Shell command making the transaction's work permanent.",
)
@click.option("--abort", "abort_cmd", metavar="CMD", help="Shell command undoing what prepare did.")
@click.option(
    "--persistent", is_flag=True, help="Run the command after -- once, speaking JSON Lines."
)
@click.option("--log", "log_dir", default="txn", show_default=True, metavar="DIR", help=LOG_HELP)
@click.option(
    "--bind",
    default="tcp://*:*",
    show_default=True,
    metavar="ENDPOINT",
    help="Where to listen (tcp://*:* : any free port).",
)
@click.option(
    "--action-timeout",
    type=SECONDS,
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="A command or agent silent this long fails (prepare: votes no).",
)
@click.option(
    "--inquire-after",
    type=SECONDS,
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Ask the coordinator for the outcome of a transaction prepared this long ago.",
)
@allow_option
@security_options
@registry_option
@metrics_option
@common_options
def participant(
    name: str,
    cmd: tuple[str, ...],
    prepare_cmd: str | None,
    commit_cmd: str | None,
    abort_cmd: str | None,
    persistent: bool,
    log_dir: str,
    bind: str,
    action_timeout: float,
    inquire_after: float,
    allow: tuple[str, ...],
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    registries: tuple[str, ...],
    serverless: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
    metrics: Any,
) -> None:
    """Take part in transactions as NAME: vote, then commit or abort.

    Commands run with sh -c, the transaction's data as JSON on stdin and
    EDA_TXN_ID, EDA_PARTICIPANT, EDA_PHASE, EDA_ATTEMPT in their environment.
    Prepare exiting 0 votes yes.  Commit and abort are retried until they
    exit 0, and abort also runs for a prepare cut short by a crash: make them
    idempotent (EDA_TXN_ID is a good key).

    \b
    A --persistent agent reads one JSON request per line on stdin and
    answers one JSON line each, in order:
      {"op": "prepare", "txn": ID, "participant": NAME, "attempt": 1, "data": {...}}
        -> {"vote": "yes"} or {"vote": "no", "reason": "..."}
      {"op": "commit" or "abort", "txn": ID, ...}
        -> {"ok": true} or {"ok": false, "error": "..."}
    Anything else (garbage, silence past --action-timeout) is a no vote or a
    failure.

    The vote is fsynced before it is sent.  A transaction prepared and not
    decided after --inquire-after asks its coordinator; while none answers it
    stays in doubt (see `status`, `resolve`).  Registered as the service
    txn-NAME (registry, else mDNS) so coordinators find it by name.  A --bind
    port of '*' (the default) is remembered next to the journal: restarted
    with the same command, the participant listens where coordinators found it.

    With --secure only trusted keys (eda-keys) may call it; --allow NAME
    limits that to those names (the coordinators, and the operators who run
    `resolve`).  A coordinator it does not allow is refused before any
    request: its transactions abort, saying so.
    """
    from eda.core.txn.actions import Actions, PersistentAgent, ShellActions
    from eda.core.txn.advertise import advertised
    from eda.core.txn.directory import find_coordinators, participant_service
    from eda.core.txn.participant import Participant, journal_path
    from eda.core.txn.protocol import check_name

    ctx = Context("eda-txn", verbose)
    apply_security(secure, key_file, trust_dir, allow)
    check_name(name, "participant name")
    actions: Actions
    if persistent:
        if prepare_cmd or commit_cmd or abort_cmd:
            raise click.UsageError(
                "--persistent takes the agent after --, not --prepare/--commit/--abort"
            )
        agent = PersistentAgent(name, list(cmd), timeout=action_timeout)
        agent.start()
        actions = agent
    else:
        if cmd:
            raise click.UsageError("a command after -- needs --persistent")
        commands = {"prepare": prepare_cmd, "commit": commit_cmd, "abort": abort_cmd}
        actions = ShellActions(name, commands, timeout=action_timeout)
    access = _access(registries, interface, no_mdns, serverless, ctx)
    reports = _reports(ctx, None, "coordinator")

    def find(coordinator: str) -> list[str]:  # (a failure keeps what was found before)
        if access is None:
            return []
        return find_coordinators(access, coordinator, reports.on_ignored, reports.on_skipped)

    try:
        part = Participant(
            name, actions, log_dir, bind=bind, inquire_after=inquire_after, find_coordinator=find,
            log=ctx.debug, warn=ctx.warn, interface=access and access.interface, remember=True,
        )  # fmt: skip
    except BaseException:
        actions.close()
        raise
    registration = None
    try:
        serve_metrics(part, metrics, ctx.warn)
        registration = _register(part, participant_service(name), access, ctx)
        where = f", announced by {registration.where}" if registration else ""
        doubt = sum(1 for r in part.txns.values() if r.get("state") == "prepared")
        in_doubt = f", {doubt} in doubt" if doubt else ""
        reached = advertised(
            part.endpoint, registration and registration.inst.host, access and access.interface
        )
        ctx.warn(
            f"participant {name} listening on {reached}{where} "
            f"(journal {journal_path(log_dir, name)}{in_doubt})"
        )
        _serve(part, ctx, "participant")
    finally:
        if registration is not None:
            registration.close()
        part.close()


RESULT_FIELDS = ("txn", "outcome", "votes", "reason")


@command.command(
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
@click.option(
    "--timeout",
    type=SECONDS,
    metavar="SECONDS",
    help="Abort the transaction unless every vote is in by then "
    "[default: what the coordinator was started with, 5 s by default]",
)
@click.option(
    "--wait",
    type=SECONDS,
    metavar="SECONDS",
    help="Give up waiting for the outcome after this long (exit 4: outcome unknown) "
    "[default: --timeout + 10, else 30]",
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
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    registries: tuple[str, ...],
    serverless: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
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

    ctx = Context("eda-txn", verbose)
    apply_security(secure, key_file, trust_dir)
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
    access = _access(registries, interface, no_mdns, serverless, ctx)
    client = CoordinatorClient(coordinator, access, wait)  # (secure mode: KEY@ENDPOINT checked)
    _reports(ctx, client, "coordinator")
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


@command.command(
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
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="No ID: every transaction in doubt that was prepared at least SECONDS ago.",
)
@click.option(
    "--unanswered",
    is_flag=True,
    help="No ID: every transaction in doubt whose coordinator does not answer.",
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
    log_dir: str,
    force_json: bool,
    secure: bool,
    key_file: str | None,
    trust_dir: str | None,
    registries: tuple[str, ...],
    serverless: bool,
    config: str | None,
    interface: str | None,
    no_mdns: bool,
    verbose: bool,
) -> None:
    """Settle an in-doubt transaction by hand (a heuristic decision), or every one
    that --coordinator, --older-than and --unanswered select (all given must hold).

    The participants apply the outcome at once and record that an operator
    chose it; if the coordinator later decides otherwise, both report a
    heuristic hazard (see `status`) instead of hiding it.  Prints one line
    per transaction settled at a participant.  Exit status: 0 done, 3 none
    in doubt (or matching), 1 a participant failed or could not be reached.
    With --secure, a participant is asked under the key its journal records
    (or its registry record), when that key is trusted.
    """
    from eda.core.txn.directory import Directory
    from eda.core.txn.protocol import check_name, check_txn
    from eda.core.txn.resolve import settle, whom

    ctx = Context("eda-txn", verbose)
    apply_security(secure, key_file, trust_dir)
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

    access = _access(registries, interface, no_mdns, serverless, ctx)
    directory = Directory(access=access)
    _reports(ctx, directory, "participant")
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
            for done, failures in settle(name, endpoint, request):
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


command.add_command(saga)
command.add_command(status)


def main() -> None:
    run(command, "eda-txn")


if __name__ == "__main__":
    main()
