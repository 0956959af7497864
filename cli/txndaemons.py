"""eda-txn coordinator and participant: the two-phase commit daemons.

The group (cli/txn.py) imports this module only when one of them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from eda.cli.common import Context, Registries, Terminated
from eda.cli.options import (
    LOG_HELP,
    SecureMode,
    allow_option,
    common_options,
    metrics_option,
    registry_option,
    seconds_option,
    security_options,
    serve_metrics,
)
from eda.cli.txn import peer_reports, txn_access
from eda.core.errors import EdaError

if TYPE_CHECKING:
    pass


def _run(
    daemon: Any, ctx: Context, who: str, journal: Any, note: str, metrics: Any, service: str,
    access: Any, **kw: Any,
) -> None:
    """Serve *daemon*'s metrics, register it as *service*, say where *who* listens, and
    run it until SIGINT/SIGTERM; close it (and leave the registry) whatever happens."""
    from eda.core.txn.advertise import advertised

    registration = None
    try:
        serve_metrics(daemon, metrics, ctx.warn)
        registration = _register(daemon, service, access, ctx, **kw)
        host = registration and registration.inst.host
        reached = advertised(daemon.endpoint, host, access and access.interface)
        if hasattr(daemon, "advertise"):  # the coordinator's, told to participants in doubt
            daemon.advertise = reached
        where = f", announced by {registration.where}" if registration else ""
        ctx.warn(f"{who} listening on {reached}{where} (journal {journal}{note})")
        _serve(daemon, ctx, who.partition(" ")[0])
    finally:
        if registration is not None:
            registration.close()
        daemon.close()


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


@click.command(
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
@seconds_option(
    "--vote-timeout", default=5.0,
    help="Abort a transaction whose votes are not all in by then (a commit may ask for another)."
)
@seconds_option(
    "--retry-max", default=2.0,
    help="Longest pause between two deliveries of a decision not yet acknowledged."
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
    secure: SecureMode,
    registry: Registries,
    metrics: Any,
    ctx: Context,
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
    from eda.core.txn.advertise import default_name
    from eda.core.txn.coordinator import Coordinator, journal_path
    from eda.core.txn.directory import Directory, parse_peers
    from eda.core.txn.protocol import COORDINATOR_SERVICE, check_name

    secure.apply()
    name = check_name(name or default_name(), "coordinator name")
    access = txn_access(registry, ctx)
    directory = Directory(parse_peers(peers), access=access)
    peer_reports(ctx, directory, "participant")
    coord = Coordinator(
        name, log_dir, directory=directory, bind=bind, vote_timeout=vote_timeout,
        retry_max=retry_max, log=ctx.debug, warn=ctx.warn, interface=access and access.interface,
        remember=True,
    )  # fmt: skip
    recovering = f", recovering {len(coord.active)}" if coord.active else ""
    _run(
        coord, ctx, f"coordinator {name}", journal_path(log_dir, name), recovering, metrics,
        COORDINATOR_SERVICE, access, inst_id=f"txn-coordinator-{name}"[:63], meta={"name": name},
    )  # fmt: skip


@click.command(
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
@seconds_option(
    "--action-timeout", default=10.0,
    help="A command or agent silent this long fails (prepare: votes no)."
)
@seconds_option(
    "--inquire-after", default=2.0,
    help="Ask the coordinator for the outcome of a transaction prepared this long ago."
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
    secure: SecureMode,
    registry: Registries,
    metrics: Any,
    ctx: Context,
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
    from eda.core.txn.directory import find_coordinators, participant_service
    from eda.core.txn.participant import Participant, journal_path
    from eda.core.txn.protocol import check_name

    secure.apply()
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
    access = txn_access(registry, ctx)
    reports = peer_reports(ctx, None, "coordinator")

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
    doubt = sum(1 for r in part.txns.values() if r.get("state") == "prepared")
    in_doubt = f", {doubt} in doubt" if doubt else ""
    _run(
        part, ctx, f"participant {name}", journal_path(log_dir, name), in_doubt, metrics,
        participant_service(name), access,
    )  # fmt: skip
