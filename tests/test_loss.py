"""Loss is never silent, and nothing hangs: eda-pub's end of stream, acknowledgements,
dead and unreachable subscribers, and the bounds that keep eda-sub's memory small."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from eda.core import codec, pubsub
from tests.helpers import Procs, command, run, wait_until

FLOOD_EVENTS = 12000


def flood_file(tmp_path: Path) -> Path:
    """24 MB: more than socket buffers hold, so high-water marks must drop."""
    data = tmp_path / "flood.txt"
    data.write_text("".join(f"{i:06d} {'x' * 2000}\n" for i in range(FLOOD_EVENTS)))
    return data


class PipedSub:
    """An eda-sub whose stdout is a pipe this test reads only when it chooses
    (until then the subscriber is stuck writing: a slow reader)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.err_path = tmp_path / f"piped-sub-{time.monotonic_ns()}.err"
        self._err = self.err_path.open("wb")
        self.popen = subprocess.Popen(
            command("eda-sub", "-v", *args),
            stdout=subprocess.PIPE,
            stderr=self._err,
            start_new_session=True,
        )
        self.lines = 0
        self._reader: threading.Thread | None = None

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_stderr(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        return wait_until(lambda: re.search(pattern, self.stderr), timeout, f"stderr ~ {pattern}")

    def drain(self, pause_every: int = 0) -> None:
        """Start reading stdout (counting lines) in the background; with
        *pause_every*, pause 10 ms after every that many lines (a slow reader)."""

        def read() -> None:
            assert self.popen.stdout is not None
            for _ in self.popen.stdout:
                self.lines += 1
                if pause_every and self.lines % pause_every == 0:
                    time.sleep(0.01)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._err.close()


@contextmanager
def piped_sub(tmp_path: Path, *args: str) -> Iterator[PipedSub]:
    sub = PipedSub(tmp_path, *args)
    try:
        yield sub
    finally:
        sub.stop()


def lost_reported(stderr: str) -> int:
    return sum(int(n) for n in re.findall(r"lost (\d+) events from", stderr))


# -- section 3: tail loss and linger expiry ---------------------------------------------


def test_tail_loss_is_reported_by_subscriber_and_publisher(procs: Procs, tmp_path: Path) -> None:
    data = flood_file(tmp_path)
    with piped_sub(tmp_path, "flood", "--hwm", "1", "--raw") as sub:
        subid = sub.wait_stderr(r"announced as (\w+)").group(1)
        with data.open("rb") as fh:
            pub = procs.eda("eda-pub", "-v", "--hwm", "1", "--linger", "60", "flood", stdin=fh)
            # everything is sent (most of it dropped at the high-water marks) while the
            # subscriber is stuck writing; only then does its reader wake up
            pub.wait_stderr(rf"sent {FLOOD_EVENTS} event\(s\)", 60)
        sub.drain()
        assert pub.wait(60) == 5, pub.stderr
        match = re.search(rf"subscriber {subid} lost (\d+) event\(s\)", pub.stderr)
        assert match, pub.stderr
        # the subscriber accounts for every event: delivered or reported lost, by number
        wait_until(
            lambda: sub.lines + lost_reported(sub.stderr) == FLOOD_EVENTS,
            30,
            f"delivered + lost == {FLOOD_EVENTS}",
        )
        assert int(match.group(1)) == FLOOD_EVENTS - sub.lines
        assert "Traceback" not in sub.stderr + pub.stderr


def test_a_subscriber_that_never_confirms_makes_eda_pub_exit_4(
    procs: Procs, tmp_path: Path
) -> None:
    data = flood_file(tmp_path)
    with piped_sub(tmp_path, "busy", "--raw") as sub:
        subid = sub.wait_stderr(r"announced as (\w+)").group(1)
        with data.open("rb") as fh:
            # the subscriber waited for (under load, the default 2 s wait could find no one:
            # then nothing is sent, and eda-pub rightly exits 0)
            flood = procs.eda("eda-pub", "-v", "--linger", "0.5", "--wait-subscribers", "1",
                              "--wait", "30", "busy", stdin=fh)  # fmt: skip
            assert flood.wait(90) == 4, flood.stderr  # the busy one confirmed nothing in 0.5 s
        assert re.search(rf"subscriber {subid} did not confirm", flood.stderr), flood.stderr
        # a one-shot publish to the busy subscriber (its socket takes no new connection
        # while it is stuck): the event does not reach it, which eda-pub says
        result = run("eda-pub", "--wait", "1", "busy", "one more")
        assert result.returncode == 4, result.stderr
        assert f"subscriber {subid} (found by mDNS) not ready after 1s" in result.stderr
        assert sub.popen.poll() is None


@pytest.mark.long
def test_a_slow_subscriber_outlives_a_publisher_that_gave_up(procs: Procs, tmp_path: Path) -> None:
    """The publisher leaves while the subscriber's small queue is full and it reads
    slowly (with ZMTP heartbeats, libzmq 4.3 aborted here: "Assertion failed:
    !_io_error"): it must go on and deliver what it holds."""
    data = tmp_path / "lines.txt"
    data.write_text("".join(f"{i}\n" for i in range(300_000)))
    with piped_sub(tmp_path, "slowly", "--hwm", "10") as sub:
        sub.wait_stderr(r"announced as (\w+)")
        sub.drain(pause_every=100)
        with data.open("rb") as fh:
            pub = procs.eda("eda-pub", "--linger", "2", "slowly", stdin=fh)
            assert pub.wait(60) == 4  # it did not confirm within 2 s
        time.sleep(4)  # a duration (several heartbeat intervals), not a readiness wait
        assert sub.popen.poll() is None and "Assertion" not in sub.stderr, sub.stderr
        before = sub.lines
        wait_until(lambda: sub.lines > before, 30, "more output")


def test_confirmed_delivery_exits_zero(procs: Procs) -> None:
    sub = procs.sub_ready("ok", "-C", "3")
    result = run("eda-pub", "--linger", "60", "ok", "a", "b", "c")
    # 0: the acknowledgement ended the wait (a linger that ran out unconfirmed exits 4)
    assert result.returncode == 0 and result.stderr == ""
    assert sub.wait() == 0 and len(sub.lines()) == 3


def test_a_subscriber_that_leaves_on_purpose_is_not_loss(procs: Procs) -> None:
    sub = procs.sub_ready("part", "-C", "1")
    result = run("eda-pub", "--linger", "20", "part", "a", "b", "c")
    assert sub.wait() == 0
    assert result.returncode == 0 and result.stderr == ""


# -- section 3: unreachable, unresolvable and stalled peers ---------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused, nobody else takes it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_connect_to_a_closed_port_warns_and_exits_4(closed_port: int) -> None:
    endpoint = f"tcp://127.0.0.1:{closed_port}"
    result = run("eda-pub", "--no-mdns", "--connect", endpoint, "--wait", "1", "t", "x")
    assert result.returncode == 4
    assert f"--connect {endpoint}: connection refused after 1s" in result.stderr


def test_an_unresolvable_host_is_an_error_at_once() -> None:
    for program, args in (("eda-pub", ["t", "x"]), ("eda-sub", ["t", "-W", "30"])):
        result = run(program, "--no-mdns", "--connect", "tcp://no-such-host.invalid:5555", *args)
        # an error (exit 1), not a silent wait that ran out (exit 4)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1
        assert "cannot resolve 'no-such-host.invalid'" in result.stderr


def test_eda_sub_warns_about_a_publisher_that_does_not_answer(
    procs: Procs, closed_port: int
) -> None:
    endpoint = f"tcp://127.0.0.1:{closed_port}"
    sub = procs.eda("eda-sub", "--no-mdns", "--connect", endpoint, "t")
    sub.wait_stderr(rf"warning: --connect {re.escape(endpoint)}: connection refused", 15)
    assert sub.popen.poll() is None  # a warning: it keeps trying


def test_connect_to_a_stalled_subscriber_exits_4(procs: Procs) -> None:
    sub = procs.eda("eda-sub", "-v", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t")
    bound = sub.wait_stderr(r"listening on (tcp://\S+)").group(1)
    sub.signal(signal.SIGSTOP)
    try:
        result = run("eda-pub", "--no-mdns", "--connect", bound, "--wait", "1", "t", "x")
    finally:
        sub.signal(signal.SIGCONT)
    assert result.returncode == 4
    assert f"--connect {bound}: no answer after 1s" in result.stderr


FAKE_SUBSCRIBER = """
import socket, sys, time
from zeroconf import IPVersion, ServiceInfo, Zeroconf
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)  # accepts TCP, never speaks ZMTP: a stalled subscriber
zc = Zeroconf(ip_version=IPVersion.V4Only)
zc.register_service(ServiceInfo(
    "_eda-sub._tcp.local.", "sub-fake-5ta11ed0._eda-sub._tcp.local.",
    port=listener.getsockname()[1], addresses=[socket.inet_aton("127.0.0.1")],
    properties={"id": "5ta11ed0", "p": "t", "v": "1"}, server="fake-5ta11ed0.local.",
))
print("announced", file=sys.stderr, flush=True)
time.sleep(120)
"""


def test_a_discovered_subscriber_that_is_not_ready_is_named_and_exit_is_4(
    procs: Procs,
) -> None:
    fake = procs.start([sys.executable, "-c", FAKE_SUBSCRIBER])
    fake.wait_stderr("announced", 15)
    result = run("eda-pub", "--wait", "1", "t", "x")
    assert result.returncode == 4, result.stderr
    assert "subscriber 5ta11ed0 (found by mDNS) does not answer at tcp://" in result.stderr


# -- section 4: --block and a subscriber killed with SIGKILL ------------------------------


def test_block_survives_a_subscriber_killed_with_sigkill(procs: Procs, tmp_path: Path) -> None:
    good = procs.sub_ready("feed", "--raw")
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # keeps the fifo open, like tail -f
    with piped_sub(tmp_path, "feed", "--raw", "--hwm", "1") as stuck:
        stuck_id = stuck.wait_stderr(r"announced as (\w+)").group(1)
        reader = os.open(fifo, os.O_RDONLY)
        pub = procs.eda("eda-pub", "-v", "--block", "--hwm", "1", "feed", stdin=reader)
        os.close(reader)
        try:
            pub.wait_stderr(f"subscriber {stuck_id} ready", 15)
            line = b"y" * 1000 + b"\n"
            total = 40_000  # 40 MB: far more than the stuck subscriber's buffers

            def feed() -> None:
                for _ in range(total // 100):
                    os.write(writer, line * 100)

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            good.wait_lines(1, 30)
            # eda-pub blocks on the stuck subscriber, which now dies
            stuck.popen.send_signal(signal.SIGKILL)
            feeder.join(90)
            assert not feeder.is_alive(), "eda-pub hangs on the killed subscriber"
            pub.wait_stderr(rf"subscriber {stuck_id} is gone", 30)
            os.write(writer, b"after the kill\n")
            wait_until(lambda: good.stdout.endswith("after the kill\n"), 60, "the feed going on")
        finally:
            os.close(writer)
        assert pub.wait(30) == 4
    assert good.stdout.count("\n") == total + 1
    match = re.search(rf"subscriber {stuck_id} is gone .*missed the (\d+) event", pub.stderr)
    assert match and int(match.group(1)) > 0, pub.stderr


@pytest.mark.long
def test_block_keeps_waiting_for_a_slow_subscriber_that_is_alive(
    procs: Procs, tmp_path: Path
) -> None:
    """Only the dead are cut off, not the slow: a subscriber stuck writing its
    output for twice GONE_GRACE (there are no heartbeats to time it out: a stuck
    reader's connection stays open) still gets every event."""
    data = flood_file(tmp_path)
    with piped_sub(tmp_path, "slow", "--raw", "--hwm", "1") as sub:
        subid = sub.wait_stderr(r"announced as (\w+)").group(1)
        with data.open("rb") as fh:
            pub = procs.eda("eda-pub", "-v", "--block", "--hwm", "1", "slow", stdin=fh)
            pub.wait_stderr(f"subscriber {subid} ready", 15)
        # a duration, not a readiness wait: the subscriber must stay stuck this long
        time.sleep(2 * pubsub.GONE_GRACE)
        assert pub.popen.poll() is None and "gone" not in pub.stderr, pub.stderr
        sub.drain()
        assert pub.wait(120) == 0, pub.stderr
        wait_until(lambda: sub.lines == FLOOD_EVENTS, 60, f"{FLOOD_EVENTS} lines")
        assert "lost" not in sub.stderr and "gone" not in pub.stderr


# -- section 6 -----------------------------------------------------------------------------


def test_whole_on_empty_stdin_is_refused() -> None:
    result = run("eda-pub", "--no-mdns", "-s", "t", input=b"")
    assert result.returncode == 1
    assert result.stderr == "eda-pub: error: stdin is empty: -s/--whole has no event to send\n"


def test_a_port_in_use_is_a_runtime_error() -> None:
    holder = zmq.Context.instance().socket(zmq.PUB)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        result = run("eda-pub", "--no-mdns", "--bind", f"tcp://127.0.0.1:{port}", "t", "x")
        assert result.returncode == 1
        assert result.stderr.startswith("eda-pub: error: cannot bind") and "in use" in result.stderr
        bad = run("eda-pub", "--no-mdns", "--bind", "tcp://127.0.0.1:notaport", "t", "x")
        assert bad.returncode == 2  # a malformed endpoint stays a usage error
    finally:
        holder.close(0)


class _QueuedSocket:
    """Stands in for a SUB socket whose queue already holds *messages*."""

    def __init__(self, messages: list[list[bytes]]) -> None:
        self.messages = messages

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.messages:
            raise zmq.Again()
        return self.messages.pop(0)


def test_receive_takes_a_bounded_number_of_events_and_the_queue_is_bounded() -> None:
    sub = pubsub.Subscriber(["burst"], hwm=10_000)
    real = sub.sock
    try:
        # the queue: --hwm batches, but never more than about QUEUE_BYTES of them
        assert real.getsockopt(zmq.RCVHWM) * codec.MAX_BATCH_BYTES <= 2 * pubsub.QUEUE_BYTES
        origin = codec.encode_origin("b1", "eda://test/b1")
        body = b"\n".join([b"e"] * 10_000)
        burst = [
            [b"burst", codec.encode_header(codec.TEXT, 10_000, 1 + n * 10_000, 0.0, origin), body]
            for n in range(300)
        ]
        sub.sock = _QueuedSocket(burst)  # type: ignore[assignment]
        taken = []
        while batches := sub.receive():
            # one loop's work stays small, whatever the burst (it was 256 batches of any size)
            taken.append(sum(b.size for b in batches))
        assert max(taken) <= pubsub.MAX_EVENTS_PER_RECEIVE + 10_000
        assert sum(taken) == 3_000_000  # nothing lost by the bound
    finally:
        sub.sock = real
        sub.close(0)


@pytest.mark.long
def test_a_burst_keeps_eda_sub_memory_bounded(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "burst.txt"
    events = 1_000_000
    data.write_text("".join(f"{i}\n" for i in range(events)))
    sub = procs.sub_ready("burst", "--json")
    with data.open("rb") as fh:
        # what is measured is the subscriber's memory: give a subscriber that a loaded
        # machine slows down all the time it needs to confirm the end of the stream
        # (the default 5 s linger made eda-pub exit 4, "may be lost", in loaded runs)
        published = subprocess.run(
            command("eda-pub", "--linger", "120", "burst"), stdin=fh, timeout=240
        )
        assert published.returncode == 0
    sub.wait_lines(events, 120)
    status = Path(f"/proc/{sub.popen.pid}/status").read_text()
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    assert peak_kb < 250_000, f"eda-sub peaked at {peak_kb} kB"


# -- section 8: close() and contexts -------------------------------------------------------

BOTH_IN_ONE_PROCESS = """
import zmq
from eda.core.pubsub import Publisher, Subscriber
pub = Publisher()
sub = Subscriber(["t"])
other = zmq.Context.instance().socket(zmq.PUB)  # the caller's own socket stays open
sub.close()
pub.close(5)
other.close(0)
print("closed")
"""


def test_closing_a_node_does_not_wait_for_other_sockets() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BOTH_IN_ONE_PROCESS], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout == "closed\n", result.stderr


# -- the end-of-stream decoder is outside input ------------------------------------------


def end_frames(payload: object) -> list[bytes]:
    return [codec.BEACON_PREFIX + b"s1", codec.END_MARK, json.dumps(payload).encode()]


@pytest.mark.parametrize(
    "frames",
    [
        [codec.BEACON_PREFIX + b"s1", codec.END_MARK],
        [codec.BEACON_PREFIX + b"s1", b"other", b"{}"],
        [codec.BEACON_PREFIX + b"s1", codec.END_MARK, b"[" * 100_000],
        [codec.BEACON_PREFIX + b"s1", codec.END_MARK, b"\xff\xfe"],
        [codec.BEACON_PREFIX + b"s1", codec.END_MARK, b" " * (codec.MAX_END_BYTES + 1)],
        end_frames([1, 2]),
        end_frames({"p": "x", "s": "y"}),
        end_frames({"p": "x", "s": "y", "t": {"a": [2, 1]}}),
        end_frames({"p": "x", "s": "y", "t": {"a": [0, 1]}}),
        end_frames({"p": "x", "s": "y", "t": {"a": [1, 2**64]}}),
        end_frames({"p": "x", "s": "y", "t": {"a": [1.0, 2]}}),
        end_frames({"p": "x", "s": "y", "t": {"a": [True, 2]}}),
        end_frames({"p": "x", "s": "y", "t": {"a": "1-2"}}),
        end_frames({"p": 1, "s": "y", "t": {}}),
    ],
)
def test_crafted_end_of_stream_messages_are_rejected(frames: list[bytes]) -> None:
    with pytest.raises(ValueError):
        pubsub.subscriber._parse_end(frames)


def test_a_valid_end_of_stream_message_parses() -> None:
    frames = end_frames({"p": "x", "s": "eda://h/pub/x", "t": {"a.b": [3, 10]}})
    assert pubsub.subscriber._parse_end(frames) == ("x", "eda://h/pub/x", {"a.b": (3, 10)})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
END_PAYLOADS = st.fixed_dictionaries(
    {"p": JSON_VALUES | st.text(max_size=8), "s": JSON_VALUES | st.text(max_size=8)},
    optional={"t": JSON_VALUES | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)},
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), END_PAYLOADS.map(lambda v: json.dumps(v).encode())))
def test_end_of_stream_decoder_yields_valid_ranges_or_value_error(payload: bytes) -> None:
    try:
        pubid, source, due = pubsub.subscriber._parse_end(
            [codec.BEACON_PREFIX + b"s1", codec.END_MARK, payload]
        )
    except ValueError:
        return
    assert isinstance(pubid, str) and isinstance(source, str)
    for first, end in due.values():
        assert type(first) is int and type(end) is int and 1 <= first <= end < 2**63


def test_crafted_control_subscriptions_never_become_publisher_state() -> None:
    pub = pubsub.Publisher()
    rogue = zmq.Context.instance().socket(zmq.XSUB)
    try:
        endpoint = pub.bind("tcp://127.0.0.1:*")
        rogue.connect(endpoint)
        crafted = [
            codec.BEACON_PREFIX + b"\x1b]0;pwned\x07",
            codec.BEACON_PREFIX + b"x" * 100_000,
            codec.BEACON_PREFIX + b"\xff\xfe",
            codec.BEACON_PREFIX,
            codec.BYE_PREFIX + b"\x1b[2J",
            codec.ACK_PREFIX + pub.pubid.encode() + b" nobody 99",
            codec.ACK_PREFIX + pub.pubid.encode() + b" x 99999999999999999999999999999",
            codec.ACK_PREFIX + b"\x00" * 50,
        ]
        for topic in crafted:
            rogue.send(b"\x01" + topic)
        rogue.send(b"\x01" + codec.BEACON_PREFIX + b"r0gue")  # a well-formed one, last
        wait_until(lambda: (pub.service(), "r0gue" in pub.subscribers)[1], 15, "the beacon")
        assert pub.subscribers == {"r0gue"}
        rogue.send(b"\x01" + codec.ACK_PREFIX + pub.pubid.encode() + b" r0gue 99999999999999999999")
        outcome = pub.finish(5)
        assert outcome.lost == {"r0gue": 999999999999999999} and not outcome.unconfirmed
    finally:
        rogue.close(0)
        pub.close(0)


def test_sigterm_while_writing_ends_after_the_last_whole_line(procs: Procs, tmp_path: Path) -> None:
    data = flood_file(tmp_path)
    with piped_sub(tmp_path, "flood", "--raw") as sub:
        sub.wait_stderr(r"announced as")
        with data.open("rb") as fh:
            procs.eda("eda-pub", "--linger", "0", "flood", stdin=fh)
        wchan = Path(f"/proc/{sub.popen.pid}/wchan")
        # the subscriber is stuck writing into the full pipe nobody reads yet
        wait_until(lambda: "pipe_write" in wchan.read_text(), 30, "eda-sub blocked writing")
        sub.popen.send_signal(signal.SIGTERM)
        assert sub.popen.stdout is not None
        out = sub.popen.stdout.read()  # reading lets the write finish, then SIGTERM acts
        assert sub.popen.wait(15) == 0, sub.stderr
    lines = out.split(b"\n")
    assert out and lines.pop() == b"", "the output ends in the middle of a line"
    assert all(re.fullmatch(rb"\d{6} x{2000}", line) for line in lines)
