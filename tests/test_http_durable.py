"""A durable HTTP consumer (GET /events?durable=NAME) never skips an event it did not
receive: it is acknowledged only as far as the bytes handed to the kernel, so a client
that leaves, stalls, or a bus that stops, finds again on reconnect every event after the
last one that went out (at least once: duplicates of a partly sent batch, no loss)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.helpers import Procs, run, wait_until
from tests.test_http_bus import start

EVENTS = 3000  # ~2 KB each: far more than socket buffers, less than one client's queue
PAYLOAD = "x" * 2000


def backlog(ep: str) -> None:
    lines = "".join(f'{{"n": {i}, "pad": "{PAYLOAD}"}}\n' for i in range(EVENTS))
    done = run("eda-pub", "--bus", ep, "--confirm", "t.big", input=lines)
    assert done.returncode == 0, done.stderr


class Reader:
    """A raw SSE client with a small receive buffer, reading only as told."""

    def __init__(self, url: str, query: str, last_id: int | None = None) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        extra = f"last-event-id: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(f"GET /events?{query} HTTP/1.1\r\nhost: x\r\n{extra}\r\n".encode())
        self.data = bytearray()  # appended to a few KB at a time, megabytes in all
        self.eof = False

    def ids(self) -> list[int]:
        """The ids of the events received whole (a blank line ended them)."""
        body = self.data.partition(b"\r\n\r\n")[2]
        whole = body.split(b"\n\n")[:-1]
        return [int(ev[4:].split(b"\n", 1)[0]) for ev in whole if ev.startswith(b"id: ")]

    def read(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True  # nothing yet
        self.data += chunk
        self.eof = not chunk
        return True

    def until(self, n: int) -> list[int]:
        self.sock.settimeout(0.5)
        wait_until(lambda: self.read() and (len(self.ids()) >= n or self.eof), what=f"{n} events")
        return self.ids()

    def drain(self) -> list[int]:
        """Everything the server handed to its kernel before it closed.

        Read back to back (each read waits for data, up to 10 s), not polled: megabytes
        of socket buffers come through the small receive buffer a few KB a read, and a
        pause between reads made this most of a test's time."""
        self.sock.settimeout(10)
        deadline = time.monotonic() + 30
        while not self.eof:
            assert time.monotonic() < deadline, "timed out after 30s waiting for the end"
            self.read()
        return self.ids()

    def close(self) -> None:
        self.sock.close()


def resumes_after(url: str, got: list[int], last_id: int | None = None) -> None:
    """Reconnecting as the same durable consumer gives every event after *got*."""
    assert got == list(range(1, len(got) + 1)) and len(got) < EVENTS
    again = Reader(url, "topic=t.>&durable=web", last_id)
    try:
        wait_until(lambda: b": from bus sequence" in again.data or not again.read(), what="stream")
        again.sock.settimeout(0.5)
        for _ in range(20):  # what it is offered at once (a few seconds at most)
            again.read()
            if len(again.ids()) >= 100 or again.eof:
                break
        ids = again.ids()
    finally:
        again.close()
    assert ids, f"nothing offered again after event {got[-1]}: all the rest was lost"
    first = ids[0]
    assert first <= got[-1] + 1, f"events {got[-1] + 1}..{first - 1} were lost"
    assert ids == list(range(first, first + len(ids)))


def test_a_client_that_leaves_finds_every_event_it_did_not_get(procs: Procs, tmp_path: Path) -> None:
    _bus, ep, url = start(procs, tmp_path / "bus")
    backlog(ep)
    reader = Reader(url, "topic=t.>&durable=web")
    assert len(reader.until(20)) >= 20
    reader.sock.shutdown(socket.SHUT_WR)  # it leaves: the server drops what it queued
    got = reader.drain()  # ... and what it had written still arrives
    reader.close()
    resumes_after(url, got)


def test_last_event_id_brings_back_what_sat_in_socket_buffers(procs: Procs, tmp_path: Path) -> None:
    _bus, ep, url = start(procs, tmp_path / "bus")
    backlog(ep)
    reader = Reader(url, "topic=t.>&durable=web")
    got = reader.until(20)
    reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    reader.close()  # a reset: what was in flight is gone with it
    resumes_after(url, got, last_id=got[-1])


def test_a_stalled_reader_of_a_bus_that_stops_loses_nothing(procs: Procs, tmp_path: Path) -> None:
    bus, ep, url = start(procs, tmp_path / "bus")
    backlog(ep)
    reader = Reader(url, "topic=t.>&durable=web")
    assert len(reader.until(20)) >= 20  # then it reads nothing more: its queue stays full
    bus.signal(15)
    assert bus.wait() == 0
    got = reader.drain()
    reader.close()
    _bus, ep, url = start(procs, tmp_path / "bus")
    resumes_after(url, got)


def test_a_durable_stream_cut_by_the_output_budget_loses_nothing(tmp_path: Path) -> None:
    """In process, with a small budget: two readers that stop reading pass it together,
    the slowest (the durable one) is cut; what it had queued is offered again."""

    from eda.core import codec
    from eda.core.bus import SQLiteEngine
    from eda.core.bus.http import BusHttp
    from eda.core.bus.server import BusServer, Settings
    from eda.core.http import Limits

    engine = SQLiteEngine(tmp_path / "bus.db")
    origin = codec.encode_origin("p1", "src")
    for i in range(EVENTS):
        header = codec.encode_header(codec.TEXT, 1, i + 1, time.time(), origin)
        engine.append([codec.decode([b"t.big", header, PAYLOAD.encode()])])
    engine.commit()
    server = BusServer(engine, Settings(bind="tcp://127.0.0.1:0", mdns=False))
    api = BusHttp(server, "127.0.0.1:0")
    api.server.limits = Limits(output_bytes=1 << 20, output_budget=3 << 19, stalled_time=600)
    server.every(0.02, "test", lambda: None)  # (the loop looks at *until* often)
    try:
        durable = Reader(api.url, "topic=t.>&durable=web")
        durable.sock.setblocking(False)
        server.serve(until=lambda: b"id: " in _peek(durable))  # it starts, then reads no more
        other = Reader(api.url, "topic=t.>&from-start")
        other.sock.setblocking(False)
        server.serve(until=lambda: api.server.cut > 0)
        assert api.server.cut == 1 and [r.durable for r in api.readers.values()] == [None]

        def drained() -> bool:
            _peek(durable, everything=True)
            return durable.eof

        server.serve(until=drained)  # what was written before the cut still arrives
        got = durable.ids()
        durable.close()
        other.close()
        assert got == list(range(1, len(got) + 1)) and len(got) < EVENTS
        again = Reader(api.url, "topic=t.>&durable=web")
        again.sock.setblocking(False)
        deadline = time.monotonic() + 20

        def offered() -> bool:
            _peek(again)
            return len(again.ids()) >= 100 or time.monotonic() > deadline

        server.serve(until=offered)
        ids = again.ids()[:100]
        again.close()
        assert ids, f"nothing offered again after event {got[-1]}: all the rest was lost"
        assert ids[0] <= got[-1] + 1, f"events {got[-1] + 1}..{ids[0] - 1} were lost"
        assert ids == list(range(ids[0], ids[0] + 100))
    finally:
        api.close()
        server.close()


def _peek(reader: Reader, everything: bool = False) -> bytes:
    """What *reader* received so far, reading what is there without waiting (one read,
    or with *everything* as many as there is data for: its receive buffer is small)."""
    while not reader.eof:
        try:
            chunk = reader.sock.recv(65536)
        except BlockingIOError:
            break
        reader.data += chunk
        reader.eof = not chunk
        if not everything:
            break
    return reader.data
