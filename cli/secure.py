"""What secure mode reports, the same in every program: peers skipped, keys refused."""

from __future__ import annotations

from typing import Any

from eda.cli.common import Context
from eda.cli.output import for_terminal

UNTRUSTED_EVERY = 5.0  # s: at most one warning this often about peers with untrusted keys


def secure_reports(ctx: Context, node: Any, peers: str) -> list[str]:
    """Report what secure mode (or its absence) made *node* skip or refuse; the list
    of refusals grows as servers refuse this program's key (each one is an error line).

    A peer announcing a key that is not trusted is a warning, at most once per
    :data:`UNTRUSTED_EVERY` seconds (forged announcements cannot flood stderr);
    a peer that is not secure while this program is, or the other way round, is
    only shown with -v (both are normal on a LAN where some programs are secure).
    """
    refusals: list[str] = []

    def ignored(peer: Any, why: str) -> None:
        text = f"ignoring {peers} {for_terminal(peer.id)} at {for_terminal(peer.endpoint)}: {why}"
        if node.security is not None and peer.key and ctx.due("untrusted", UNTRUSTED_EVERY):
            ctx.warn(f"warning: {text}")
        else:
            ctx.debug(text)

    def refused(endpoint: str, why: str) -> None:
        refusals.append(endpoint)
        key = node.security.public_key if node.security is not None else ""
        ctx.error(f"the {peers} at {for_terminal(endpoint)} {why} (eda-keys show: {key})")

    node.on_ignored = ignored
    node.on_refused = refused
    return refusals
