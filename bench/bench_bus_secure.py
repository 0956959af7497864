"""eda-bus in secure mode: confirmed publishing with CurveZMQ against the same without it.

    python bench/run.py --only bus_secure

The load of bench_bus's confirmed publishing: a file of 100-byte lines through
``eda-pub --bus --confirm`` into a fresh ``eda-bus serve --data DIR --fsync
batch``, timed from starting eda-pub until it exits 0 (every event
confirmed), the bus found by mDNS; afterwards ``eda-bus stats`` must count
every event.  Three ways, in turn, ROUNDS times each (medians), on the same
machine in the same run:

* insecure (the anchor);
* ``--secure`` on both sides: one identity (``eda-keys init``) that trusts
  itself, so the bus and the publisher each pin the other's key;
* ``--secure`` and ``--acl`` (the publisher's name may publish ``bench.>``):
  the per-batch check of the ACL on top.

Issue 17's target: secure >= 0.6x insecure (CurveZMQ's per-message cost).
The rows give both absolute rates.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench_bus import TOPIC, Bus, in_fresh
from bench_pubsub import fresh, interleave, join_notes, judge, make_input, pipe_timeout
from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    median,
    row,
    scratch,
    tail,
    wait_exit,
)

FULL_EVENTS = 1_000_000
QUICK_EVENTS = 100_000
ROUNDS = 3
TARGET = 0.6  # secure >= 0.6x insecure
RATE = "events/s"
ACL = '["self"]\npublish = ["bench.>"]\nsubscribe = [">"]\n'


def run(quick: bool) -> list[Row]:
    events = QUICK_EVENTS if quick else FULL_EVENTS
    size = f"{events // 1000}k events"
    with scratch("eda-bench-bus-secure-") as tmp:
        data = make_input(tmp / "input.txt", events)

        def way(name: str, secure: bool, acl: bool) -> Callable[[int], float]:
            return lambda i: in_fresh(
                tmp / f"{name}{i}", lambda w: publish(w, data, events, secure=secure, acl=acl)
            )

        (plain, plain_note), (sec, sec_note), (acl, acl_note) = [
            (median(rates) if rates and not note else None, note)
            for rates, note in interleave(
                ROUNDS,
                [way("plain", False, False), way("secure", True, False), way("acl", True, True)],
            )
        ]
    rows = []
    for name, value, note in (
        (f"confirmed bus publish --secure ({size})", sec, sec_note),
        (f"confirmed bus publish --secure --acl ({size})", acl, acl_note),
    ):
        meets = None if value is None or plain is None else value >= TARGET * plain
        rows.append(
            row(
                name,
                value,
                "eda insecure",
                plain,
                RATE,
                higher_is_better=True,
                target=f"secure >= {TARGET:g}x insecure",
                ok=judge(note, meets),
                note=join_notes(note, plain_note),
            )
        )
    return rows


def identity(env: dict[str, str]) -> None:
    """This run's key pair, trusted by itself under the name ``self``."""
    keys = eda_cmd("eda-keys")
    done = subprocess.run([keys, "init"], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"eda-keys init exited {done.returncode}: {done.stderr.strip()}")
    subprocess.run([keys, "trust", "self", done.stdout.strip()], env=env, check=True)


def publish(work: Path, data: Path, events: int, *, secure: bool, acl: bool) -> float:
    """Events/s of ``eda-pub --bus --confirm`` of *data* into a fresh bus (see the module)."""
    fresh(work)
    env = eda_env(work)
    client: tuple[str, ...] = ()
    serve: tuple[str, ...] = ()
    if secure:
        identity(env)
        client = ("--secure",)
    if acl:
        (work / "acl.toml").write_text(ACL)
        serve = ("--acl", str(work / "acl.toml"))
    with Procs(work, env) as procs:
        bus = Bus(procs, work, env, serve_args=serve, client_args=client)
        pub_err = work / "pub.err"
        start = time.perf_counter()
        pub = procs.start(
            [eda_cmd("eda-pub"), "--bus", "--confirm", *client, TOPIC], stdin=data, stderr=pub_err
        )
        code = wait_exit(pub, pipe_timeout(events) * 2, "eda-pub --bus --confirm")
        elapsed = time.perf_counter() - start
        if code != 0:
            raise BenchError(f"eda-pub --bus --confirm exited {code}: {tail(pub_err)}")
        bus.check_alive()
        stored = stored_events(work, env, client)
        if stored != events:
            raise BenchError(f"the bus stored {stored} events, not {events}")
    return events / elapsed


def stored_events(work: Path, env: dict[str, str], client: tuple[str, ...]) -> int:
    out, err = work / "count.out", work / "count.err"
    with Procs(work, env) as procs:
        stats = procs.start(
            [eda_cmd("eda-bus"), "stats", "--json", *client], stdout=out, stderr=err
        )
        if wait_exit(stats, 20.0, "eda-bus stats") != 0:
            raise BenchError(f"eda-bus stats exited {stats.returncode}: {tail(err)}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return int(next(r for r in rows if r["kind"] == "bus")["events"])
