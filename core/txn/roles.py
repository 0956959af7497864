"""What the two 2PC daemons (coordinator, participant) do alike: their files, and closing.

Each keeps in its ``--log`` directory, named after its role and name,
``coordinator-c1.jsonl`` / ``participant-stock.jsonl``: its journal (:mod:`.journal`);
``coordinator-c1.port`` / ``participant-stock.port``: the port it bound as ``*``, so that
restarted with the same command it comes back where its peers found it (commit clients and
participants in doubt find the coordinator there, coordinators the participant).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from .. import security
from ..daemon import Daemon, port_file
from .journal import Journal, open_journal


def journal_path(role: str, log_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(log_dir) / f"{role}-{name}.jsonl"


def open_role_journal(
    daemon: Daemon,
    role: str,
    log_dir: str | os.PathLike[str],
    name: str,
    fold: Callable[[dict[str, Any]], None],
) -> Journal:
    """The journal of *daemon* (*role* *name*), each record read given to *fold*."""
    return repaired(daemon, open_journal(journal_path(role, log_dir, name), fold))


def repaired(daemon: Daemon, journal: Journal) -> Journal:
    """*journal*, a torn tail cut off it on opening (a crash mid-write) warned of."""
    if journal.repaired:
        daemon.warn(f"warning: cut a torn tail of {journal.repaired} bytes off the journal")
    return journal


def bind_role(
    daemon: Daemon,
    sock: zmq.Socket[bytes],
    role: str,
    log_dir: str | os.PathLike[str],
    name: str,
    bind: str,
    remember: bool,
) -> str:
    """Bind *sock* at *bind*; with *remember*, a port ``*`` is the one remembered next to
    the journal (:meth:`~eda.core.daemon.Daemon.bind_remembered`)."""
    state = port_file(f"{role}-{name}", log_dir, f"{role}-{name}.port") if remember else None
    return daemon.bind_remembered(sock, bind, state)


def close(daemon: Daemon, parts: list[Any], close_daemon: Callable[[], None]) -> None:
    """Close *parts* in order (the journal last: a disk still full raises, the rest is
    closed), then the daemon (*close_daemon*) and, in secure mode, its ZAP handler."""
    try:
        for part in parts:
            part.close()
    finally:
        close_daemon()
        secure = security.active()
        if secure is not None:
            secure.release(daemon.zctx)  # before the context ends
