"""The raw pyzmq anchor: what a user would write in ten lines, one message per line.

    python pyzmq_anchor.py sub N OUT     bind, print the endpoint on stderr, write N messages
    python pyzmq_anchor.py pub ENDPOINT  send every stdin line (without its newline)

The subscriber binds and the publisher connects (as eda does).  The publisher
is an XPUB socket so it can wait for the subscription before sending, and both
high-water marks are unlimited, so no line is lost.
"""

from __future__ import annotations

import sys

import zmq


def subscribe(count: int, out_path: str) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.subscribe(b"")
    sock.bind("tcp://127.0.0.1:*")
    sys.stderr.write(f"bound {sock.getsockopt_string(zmq.LAST_ENDPOINT)}\n")
    sys.stderr.flush()
    recv = sock.recv
    with open(out_path, "wb") as out:
        write = out.write
        for _ in range(count):
            write(recv() + b"\n")


def publish(endpoint: str) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 60_000)
    sock.connect(endpoint)
    sock.recv()  # the subscription: from now on nothing sent is dropped
    send = sock.send
    for line in sys.stdin.buffer:
        send(line.rstrip(b"\n"))
    sock.close()
    zmq.Context.instance().term()


if __name__ == "__main__":
    if sys.argv[1] == "sub":
        subscribe(int(sys.argv[2]), sys.argv[3])
    else:
        publish(sys.argv[2])
