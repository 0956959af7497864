"""eda-txn: distributed transactions -- two-phase commit and sagas with compensation."""

from __future__ import annotations

import click

from eda.cli.common import common_options, run

EPILOG = """\b
Examples:
  eda-txn coordinator --log ./txn                   a 2PC coordinator, announced by mDNS
  eda-txn participant stock --prepare ./reserve.sh --commit ./confirm.sh --abort ./release.sh
  eda-txn commit --participants stock,pay --data '{"order": 7}'   exit 0 committed, 5 aborted
  eda-txn saga order.toml --data '{"order": 7}'     run a saga; progress as JSON Lines
  eda-txn saga --resume ID                          continue a saga after a crash
  eda-txn status                                    where transactions and sagas stand
"""


@click.group(epilog=EPILOG, context_settings={"max_content_width": 100})
@common_options
def command(config: str | None, interface: str | None, no_mdns: bool, verbose: bool) -> None:
    """Distributed transactions: two-phase commit (coordinator, participant, commit,
    resolve) and sagas with compensation (saga), with durable logs and crash recovery."""


# -- two-phase commit: coordinator, participant, commit, resolve ---------------------------


# -- sagas: saga, saga init ----------------------------------------------------------------


# -- status (both) -------------------------------------------------------------------------


def main() -> None:
    run(command, "eda-txn")


if __name__ == "__main__":
    main()
