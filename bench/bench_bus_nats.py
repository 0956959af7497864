"""eda-bus on its NATS JetStream engine (a 3-node cluster, R3 stream) beside the embedded
engine and beside nats-py publishing to the same cluster directly, in one run.

Three ``nats-server -js`` processes on 127.0.0.1 (own client and cluster ports, routes
to each other, stores in a temporary directory) form one JetStream cluster; every
stream below has 3 replicas and is deleted after its measurement.

* **eda-bus, NATS engine**: ``eda-bus serve --engine nats://A,nats://B,nats://C
  --replicas 3``; ``eda-pub --bus tcp://... --confirm bench.x < file`` timed from start
  to exit 0 (every event confirmed), then ``eda-sub --bus tcp://... '>' --from-start
  --raw -C N`` timed from start to exit, its output equal to the input byte for byte
  (which also shows every confirmed event stored once, in order).  A failed step
  fails its row with the reason; the publish counts only when the replay verifies it.
* **eda-bus, embedded engine**: the same two commands against
  ``eda-bus serve --data DIR --fsync batch`` (the figure the NATS engine is beside).
* **NatsEngine directly**: the engine in this process, the file cut into batches of
  ENGINE_BATCH events, ``append`` + ``commit`` every ENGINE_COMMIT batches, then
  ``read`` of everything, compared with the input; what the engine costs without the
  bus protocol, the processes and the client.
* **the cloudevents format**: the same front with ``--nats-format cloudevents`` (one
  JetStream message per event, in the CloudEvents NATS binding), its publish and
  replay rows beside the default format's in the same run: the cost of the format.
* **anchor**: ``nats_anchor.py pub`` (nats-py, one JetStream message per event, acks
  awaited in a window of 1,000) into an R3 stream on the same cluster, then
  ``nats_anchor.py replay`` (an ordered ephemeral consumer), checked the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench_bus import (
    NATS_ANCHOR,
    NATS_SERVER,
    NATS_WINDOW,
    RATE,
    TOPIC,
    Result,
    exited_ok,
    wait_output,
)
from bench_pubsub import check_identical, fresh, join_notes, judge, make_input, pipe_timeout
from harness import (
    BenchError,
    Procs,
    Row,
    eda_cmd,
    eda_env,
    free_port,
    row,
    scratch,
    tail,
    wait_exit,
    wait_for_text,
)

FULL_EVENTS = 1_000_000
QUICK_EVENTS = 100_000
NODES = 3
PUBLISH_TARGET = 100_000.0  # events/s confirmed through the NATS engine (issue 10)
REPLAY_TARGET = 300_000.0  # events/s replayed through the NATS engine
ENGINE_BATCH = 1000  # events per batch in the engine-level row (~100 KB, as eda-pub sends)
ENGINE_COMMIT = 16  # batches appended between commits (a group commit, as the bus does)
ENGINE_STREAM = "ENGINEBENCH"
ANCHOR_STREAM = "ANCHOR"
ANCHOR_SUBJECT = "anchor.x"
CLUSTER_READY = 60.0  # s for the JetStream meta leader to be elected and a stream created

NATS_FRONT = "eda-bus --engine nats:// (R3)"
EMBEDDED = "eda-bus --data (embedded)"
ANCHOR = "JetStream R3 (nats-py)"
ENGINE = "NatsEngine in-process (R3)"
CLOUDEVENTS_ANCHOR = "the same front, eda format (default)"


def run(quick: bool) -> list[Row]:
    events = QUICK_EVENTS if quick else FULL_EVENTS
    size = f"{events // 1000}k events"
    missing = prerequisites()
    with scratch("eda-bench-bus-nats-") as tmp:
        data = make_input(tmp / "input.txt", events)
        embedded = front(fresh(tmp / "embedded"), data, events, embedded_args(tmp / "embedded"))
        if missing:
            anchor = engine = ((None, missing), (None, missing))
            nats_front = cloudevents = ((None, missing), (None, missing), "")
        else:
            with Procs(tmp) as procs:
                try:
                    urls = start_cluster(procs, fresh(tmp / "cluster"))
                except BenchError as exc:
                    failed = f"the 3-node cluster did not start: {exc}"
                    anchor = engine = ((None, failed), (None, failed))
                    nats_front = cloudevents = ((None, failed), (None, failed), "")
                else:
                    anchor = jetstream_anchor(fresh(tmp / "anchor"), urls, data, events)
                    engine = engine_direct(urls, data, events)
                    nats_front = front_on_nats(fresh(tmp / "front"), urls, data, events)
                    cloudevents = front_on_nats(fresh(tmp / "front-ce"), urls, data, events,
                                                "cloudevents")  # fmt: skip

    rows: list[Row] = []
    # the targets are for 1,000,000 events: at 100k start-up weighs too much,
    # so a quick run shows the rates without judging them
    suffix = " (full run)" if quick else ""
    for k, (what, target) in enumerate(
        (("confirmed publish", PUBLISH_TARGET), ("replay --from-start --raw", REPLAY_TARGET))
    ):
        value, note = (nats_front[0], nats_front[1])[k]
        meets = None if quick or value is None else value >= target
        for anchor_name, (anchor_value, anchor_note), target_text in (
            (ANCHOR, anchor[k], f">= {target:,.0f} events/s{suffix}"),
            (EMBEDDED, embedded[k], ""),
        ):
            rows.append(
                row(
                    f"NATS engine {what} ({size})",
                    value,
                    anchor_name,
                    anchor_value,
                    RATE,
                    higher_is_better=True,
                    target=target_text,
                    ok=judge(note, meets if target_text else None),
                    note=join_notes(note, anchor_note, nats_front[2] if k == 0 else ""),
                )
            )
    # the cost of --nats-format cloudevents: its rows beside the default format's; then
    # the engine in this process beside the anchor
    for k, what in enumerate(("confirmed publish", "replay --from-start --raw")):
        name = f"NATS engine, cloudevents format, {what} ({size})"
        rows.append(beside(name, cloudevents[k], CLOUDEVENTS_ANCHOR, nats_front[k],
                           cloudevents[2] if k == 0 else ""))  # fmt: skip
    for k, what in enumerate(("append+commit", "read")):
        rows.append(beside(f"{ENGINE} {what} ({size})", engine[k], ANCHOR, anchor[k]))
    return rows


def beside(name: str, result: Result, anchor_name: str, anchor: Result, more: str = "") -> Row:
    """A rate row of *result* beside *anchor*'s, with no target."""
    (value, note), (anchor_value, anchor_note) = result, anchor
    return row(name, value, anchor_name, anchor_value, RATE, higher_is_better=True,
               ok=judge(note), note=join_notes(note, anchor_note, more))  # fmt: skip


# -- prerequisites and the cluster ----------------------------------------------------------


def prerequisites() -> str:
    """Why the NATS rows cannot be measured with this install, or ''."""
    if shutil.which(NATS_SERVER) is None:
        return "nats-server is not installed (bench/setup.sh installs it)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return f"nats-py is not installed in {sys.executable} (`make bench` installs it)"
    return ""


def start_cluster(procs: Procs, work: Path) -> list[str]:
    """Three clustered nats-server -js on 127.0.0.1; their client URLs once each is ready."""
    return [url for url, _ in start_nodes(procs, work)]


def start_nodes(procs: Procs, work: Path) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`start_cluster`, with each node's process (node i + 1 is named ``n{i + 1}``)."""
    clients = [free_port() for _ in range(NODES)]
    routes = [free_port() for _ in range(NODES)]
    nodes: list[tuple[subprocess.Popen[bytes], Path]] = []
    for i in range(NODES):
        peers = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
        log = work / f"n{i + 1}.log"
        proc = procs.start(
            [NATS_SERVER, "-js", "-n", f"n{i + 1}", "-a", "127.0.0.1", "-p", str(clients[i]),
             "-sd", str(work / f"n{i + 1}"), "--cluster_name", "edabench",
             "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", peers],
            stderr=log,
        )  # fmt: skip
        nodes.append((proc, log))
    for proc, log in nodes:
        wait_for_text(log, "Server is ready", 20.0, proc)
    return [(f"nats://127.0.0.1:{p}", proc) for p, (proc, _) in zip(clients, nodes, strict=True)]


def js_call(urls: list[str], action: str, stream: str, subjects: str = "") -> None:
    """Create (R3, file-backed) or delete *stream* with nats-py; a creation is retried
    until the cluster has elected its JetStream meta leader (CLUSTER_READY s)."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    async def call() -> None:
        nc = await nats.connect(servers=urls, allow_reconnect=False, connect_timeout=5)
        try:
            js = nc.jetstream(timeout=10)
            if action == "delete":
                await js.delete_stream(stream)
                return
            deadline = time.monotonic() + CLUSTER_READY
            while True:
                try:
                    await js.add_stream(
                        StreamConfig(
                            name=stream,
                            subjects=[subjects],
                            storage=StorageType.FILE,
                            num_replicas=NODES,
                        )
                    )
                    return
                except Exception as exc:  # 503 / timeout while no meta leader yet
                    if time.monotonic() > deadline:
                        raise BenchError(f"creating R{NODES} stream {stream}: {exc!r}") from None
                    await asyncio.sleep(0.25)
        finally:
            await nc.close()

    try:
        asyncio.run(call())
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"JetStream {action} {stream}: {type(exc).__name__}: {exc}") from None


def js_info(urls: list[str], stream: str) -> tuple[int, int]:
    """(messages, replicas) of *stream*."""
    import nats

    async def call() -> tuple[int, int]:
        nc = await nats.connect(servers=urls, allow_reconnect=False, connect_timeout=5)
        try:
            info = await nc.jetstream(timeout=10).stream_info(stream)
            return info.state.messages, info.config.num_replicas or 1
        finally:
            await nc.close()

    try:
        return asyncio.run(call())
    except Exception as exc:
        raise BenchError(f"JetStream info {stream}: {type(exc).__name__}: {exc}") from None


# -- the anchor -----------------------------------------------------------------------------


def jetstream_anchor(work: Path, urls: list[str], data: Path, events: int) -> tuple[Result, Result]:
    """nats_anchor.py pub into an R3 stream of the cluster, then its ordered-consumer replay."""
    anchor = [sys.executable, str(NATS_ANCHOR)]
    out, err = work / "out", work / "anchor.err"
    with Procs(work) as procs:
        try:
            js_call(urls, "create", ANCHOR_STREAM, "anchor.>")
            start = time.perf_counter()
            pub = procs.start(
                [*anchor, "pub", urls[0], ANCHOR_SUBJECT, str(NATS_WINDOW)], stdin=data, stderr=err
            )
            wait_exit(pub, pipe_timeout(events) * 4, "nats_anchor.py pub")
            elapsed = time.perf_counter() - start
            exited_ok(pub, err, "nats_anchor.py pub")
        except BenchError as exc:
            return (None, str(exc)), (None, "not measured: the publish failed")
        published = events / elapsed
        try:
            start = time.perf_counter()
            sub = procs.start(
                [*anchor, "replay", urls[0], "anchor.>", str(events), str(out)], stderr=err
            )
            wait_output(sub, out, "nats_anchor.py replay", pipe_timeout(events) * 4)
            elapsed = time.perf_counter() - start
            exited_ok(sub, err, "nats_anchor.py replay")
            check_identical(data, out, events)
        except BenchError as exc:
            return (None, f"stored events not verified: {exc}"), (None, str(exc))
        finally:
            with contextlib.suppress(OSError):
                out.unlink()
            with contextlib.suppress(BenchError):
                js_call(urls, "delete", ANCHOR_STREAM)
    return (published, ""), (events / elapsed, "")


# -- NatsEngine in this process ---------------------------------------------------------------


def batches(data: Path) -> Iterator[tuple[int, bytes, int]]:
    """(first publisher sequence, body, count) of ENGINE_BATCH lines each, as on the wire."""
    seq = 1
    with open(data, "rb") as f:
        while True:
            lines = [line.rstrip(b"\n") for _, line in zip(range(ENGINE_BATCH), f, strict=False)]
            if not lines:
                return
            yield seq, b"\n".join(lines), len(lines)
            seq += len(lines)


def engine_direct(urls: list[str], data: Path, events: int) -> tuple[Result, Result]:
    """NatsEngine append+commit of the file in batches, then a read of all of it."""
    from eda.core import codec
    from eda.core.bus.engine import StoreError
    from eda.core.bus.nats import NatsEngine

    try:
        js_call(urls, "create", "WARMUP", "warmup.>")  # waits for the meta leader
        js_call(urls, "delete", "WARMUP")
        engine = NatsEngine(urls, stream=ENGINE_STREAM, prefix="enginebench", replicas=NODES)
    except (BenchError, StoreError) as exc:
        return (None, f"NatsEngine did not open: {exc}"), (None, "not measured")
    try:
        now = time.time()
        wire = [
            codec.Batch(TOPIC, codec.TEXT, n, seq, now, "benchpub", "bench", body)
            for seq, body, n in batches(data)
        ]
        try:
            start = time.perf_counter()
            for i in range(0, len(wire), ENGINE_COMMIT):
                engine.append(wire[i : i + ENGINE_COMMIT])
                engine.commit()
            elapsed = time.perf_counter() - start
            if engine.durable_seq != events:
                raise BenchError(f"durable_seq {engine.durable_seq} after {events} events")
        except (BenchError, StoreError) as exc:
            return (None, str(exc)), (None, "not measured: the append failed")
        published = events / elapsed
        try:
            start = time.perf_counter()
            got = b"".join(r.body + b"\n" for r in engine.read(1))
            elapsed = time.perf_counter() - start
            if got != data.read_bytes():
                n = got.count(b"\n")
                raise BenchError(
                    "read is not the input: "
                    + ("content differs" if n == events else f"{n} of {events} events")
                )
        except (BenchError, StoreError) as exc:
            return (None, f"stored events not verified: {exc}"), (None, str(exc))
        return (published, ""), (events / elapsed, "")
    finally:
        with contextlib.suppress(Exception):
            engine.close()
        with contextlib.suppress(BenchError):
            js_call(urls, "delete", ENGINE_STREAM)
            js_call(urls, "delete", f"KV_{ENGINE_STREAM}_consumers")  # its key-value bucket


# -- eda-bus fronts ---------------------------------------------------------------------------


def embedded_args(work: Path) -> list[str]:
    return ["--data", str(work / "data"), "--fsync", "batch"]


def front_on_nats(
    work: Path, urls: list[str], data: Path, events: int, message_format: str = "eda"
) -> tuple[Result, Result, str]:
    """The front on the cluster (its stream in *message_format*); the third item says how
    the stream holds the events."""
    option = "--engine" if message_format == "eda" else "--nats-format"
    if not engine_option(option):
        why = f"{eda_cmd('eda-bus')} serve has no {option} option (this install predates it)"
        return (None, why), (None, why), ""
    args = ["--engine", ",".join(urls), "--replicas", str(NODES)]
    if message_format != "eda":
        args += ["--nats-format", message_format]
    try:
        # one JetStream message per event is an order of magnitude slower: more patience
        patience = 1 if message_format == "eda" else 10
        published, replayed = front(work, data, events, args, "serving NATS stream EDA",
                                    patience)  # fmt: skip
        if published[0] is not None:
            try:
                messages, replicas = js_info(urls, "EDA")
            except BenchError as exc:
                return (None, f"stream EDA not inspected: {exc}"), replayed, ""
            if replicas != NODES or not messages:
                why = f"stream EDA has {messages} messages and {replicas} replicas"
                return (None, why), replayed, ""
            each = f"{events / messages:,.0f}"
            return published, replayed, f"stream EDA: {messages:,} messages, {each} events each"
        return published, replayed, ""
    finally:
        with contextlib.suppress(BenchError):
            js_call(urls, "delete", "EDA")
            js_call(urls, "delete", "KV_EDA_consumers")


def engine_option(option: str = "--engine") -> bool:
    try:
        done = subprocess.run(
            [eda_cmd("eda-bus"), "serve", "--help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in done.stdout


def front(
    work: Path,
    data: Path,
    events: int,
    serve_args: list[str],
    serving: str = "serving ",
    patience: int = 1,
) -> tuple[Result, Result]:
    """``eda-bus serve SERVE_ARGS`` on a known endpoint; the confirmed publish of the file
    through it, then its replay, which must equal the file (each given *patience* times
    the usual time)."""
    env = eda_env(work)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bus_err, pub_err = work / "bus.err", work / "pub.err"
    out, sub_err = work / "replay.out", work / "replay.err"
    with Procs(work, env) as procs:
        try:
            if not Path(eda_cmd("eda-bus")).exists():
                raise BenchError(f"{eda_cmd('eda-bus')} is not installed")
            bus = procs.start(
                [eda_cmd("eda-bus"), "serve", *serve_args, "--bind", endpoint, "--no-mdns"],
                stderr=bus_err,
            )
            wait_for_text(bus_err, serving, 120.0, bus)
        except BenchError as exc:
            failed = f"eda-bus serve did not start: {exc}"
            return (None, failed), (None, failed)
        try:
            start = time.perf_counter()
            pub = procs.start(
                [eda_cmd("eda-pub"), "--bus", endpoint, "--confirm", TOPIC],
                stdin=data,
                stderr=pub_err,
            )
            wait_exit(pub, pipe_timeout(events) * 4 * patience, "eda-pub --bus --confirm")
            elapsed = time.perf_counter() - start
            exited_ok(pub, pub_err, "eda-pub --bus --confirm")
            if bus.poll() is not None:
                raise BenchError(f"eda-bus exited {bus.returncode}: {tail(bus_err)}")
        except BenchError as exc:
            return (None, str(exc)), (None, "not measured: the publish failed")
        published = events / elapsed
        try:
            start = time.perf_counter()
            sub = procs.start(
                [eda_cmd("eda-sub"), "--bus", endpoint, ">", "--from-start", "--raw",
                 "-C", str(events)],
                stdout=out,
                stderr=sub_err,
            )  # fmt: skip
            wait_output(sub, out, "eda-sub --bus --from-start", pipe_timeout(events) * 2 * patience)
            elapsed = time.perf_counter() - start
            exited_ok(sub, sub_err, "eda-sub --bus --from-start")
            check_identical(data, out, events)
        except BenchError as exc:
            return (None, f"stored events not verified by the replay: {exc}"), (None, str(exc))
        finally:
            with contextlib.suppress(OSError):
                out.unlink()
    return (published, ""), (events / elapsed, "")
