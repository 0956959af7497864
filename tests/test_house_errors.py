"""Issue 15 point 7: garbage from a peer is never a usage error (exit 2), whatever the
client (core/reqrep.py's ProtocolError was a UsageError).  A client drops a garbled
reply as malformed (CONVENTIONS §7: a hostile peer cannot end a request) and the
request ends as one no server answered: the registry's exit 1, the bus's 4."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from tests.helpers import run


@pytest.fixture
def garbage_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A ROUTER answering every request, with its envelope (and the bus's answer tag),
    by a frame that is not JSON."""
    tag: list[bytes] = request.param
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(50):
                frames = sock.recv_multipart()
                route = frames[:-2] if tag else frames[:-1]
                sock.send_multipart([*route, *tag, b"\xff{not json"])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join(5)
    sock.close()


@pytest.mark.parametrize(
    ("garbage_server", "argv", "status", "said"),
    [
        ([], ["eda-registry", "lookup", "--no-mdns", "--registry", "{ep}", "orders"], 1,
         "no registry answered"),
        ([b"A"], ["eda-bus", "stats", "--no-mdns", "--bus", "{ep}", "--timeout", "1"], 4, "did not answer"),
    ],
    ids=["registry", "bus"],
    indirect=["garbage_server"],
)
def test_a_garbled_reply_is_dropped_never_a_usage_error(
    garbage_server: str, argv: list[str], status: int, said: str
) -> None:
    done = run(*[a.replace("{ep}", garbage_server) for a in argv])
    assert done.returncode == status, done.stderr
    assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
