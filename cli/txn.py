"""eda-txn: distributed transactions -- two-phase commit and sagas with compensation.

The group and the helpers its subcommands share; each subcommand lives in a
module imported only when it runs (:class:`~eda.cli.lazygroup.LazyGroup`):
``txndaemons.py`` (coordinator, participant), ``txncommit.py``,
``txnresolve.py``, ``txnsaga.py``, ``txnstatus.py``.  The logic is in
``eda.core.txn`` (``--data`` in ``data.py``, advertised endpoints in
``advertise.py``, the coordinator found in ``client.py``, whom ``resolve`` asks
and how in ``resolve.py``).
"""

from __future__ import annotations

from typing import Any

from eda.cli.common import Context, Registries, registry_access, run
from eda.cli.options import program_group
from eda.cli.secure import secure_reports

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

SUBCOMMANDS = {
    "coordinator": "eda.cli.txndaemons:coordinator",
    "participant": "eda.cli.txndaemons:participant",
    "commit": "eda.cli.txncommit:commit",
    "resolve": "eda.cli.txnresolve:resolve",
    "saga": "eda.cli.txnsaga:saga",
    "status": "eda.cli.txnstatus:status",
}


@program_group(SUBCOMMANDS, EPILOG)
def command(**options: Any) -> None:
    """Distributed transactions: two-phase commit (coordinator, participant, commit,
    resolve) and sagas with compensation (saga), with durable logs and crash recovery."""


# -- shared by the subcommands ------------------------------------------------------------


def txn_access(registry: Registries, ctx: Context) -> Any:
    """How to find names (registry, else mDNS), or None when neither may be used."""
    if ctx.no_mdns and not registry.given:
        return None
    return registry_access(registry, ctx)


def peer_reports(ctx: Context, node: Any, peers: str) -> Any:
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


def main() -> None:
    run(command, "eda-txn")


if __name__ == "__main__":
    main()
