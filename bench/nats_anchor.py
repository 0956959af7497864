"""The NATS JetStream anchor of bench_bus: what a Python user would write with nats-py.

    nats_anchor.py create URL STREAM SUBJECTS   # a file-backed stream
    nats_anchor.py pub URL SUBJECT WINDOW       # stdin lines, acks awaited, WINDOW in flight
    nats_anchor.py replay URL SUBJECT N OUT     # ordered ephemeral consumer, N payloads to OUT

``pub`` publishes every stdin line (without its newline) with
``publish_async``, at most WINDOW unacknowledged, and exits 0 only when every
publish was acknowledged by the stream.  ``replay`` writes each payload and a
newline to OUT and exits 0 after N messages.  Errors go to stderr, exit 1.
"""

from __future__ import annotations

import asyncio
import sys

import nats
from nats.js.api import DeliverPolicy, StorageType, StreamConfig


async def create(url: str, stream: str, subjects: str) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name=stream, subjects=subjects.split(","), storage=StorageType.FILE)
        )
    finally:
        await nc.close()
    print(f"stream {stream} created", file=sys.stderr)
    return 0


async def pub(url: str, subject: str, window: int) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    js = nc.jetstream(publish_async_max_pending=window)
    sent = 0
    failed: list[BaseException] = []

    def done(future: asyncio.Future[object]) -> None:
        if future.cancelled():
            failed.append(asyncio.CancelledError())
        elif (exc := future.exception()) is not None:
            failed.append(exc)

    try:
        for line in sys.stdin.buffer:
            future = await js.publish_async(subject, line.rstrip(b"\n"))
            future.add_done_callback(done)
            sent += 1
        await asyncio.wait_for(js.publish_async_completed(), 60.0)
    finally:
        await nc.close()
    if failed:
        print(f"{len(failed)} of {sent} publishes failed: {failed[0]!r}", file=sys.stderr)
        return 1
    print(f"acked {sent}", file=sys.stderr)
    return 0


async def replay(url: str, subject: str, count: int, out_path: str) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    finished = asyncio.Event()
    received = 0
    with open(out_path, "wb", buffering=1 << 20) as out:

        async def on_message(msg: nats.aio.msg.Msg) -> None:
            nonlocal received
            if received >= count:
                return
            out.write(msg.data)
            out.write(b"\n")
            received += 1
            if received == count:
                finished.set()

        try:
            js = nc.jetstream()
            await js.subscribe(
                subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=on_message
            )
            await finished.wait()
        finally:
            await nc.close()
    print(f"received {received}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["create"] and len(argv) == 4:
            return asyncio.run(create(argv[1], argv[2], argv[3]))
        if argv[:1] == ["pub"] and len(argv) == 4:
            return asyncio.run(pub(argv[1], argv[2], int(argv[3])))
        if argv[:1] == ["replay"] and len(argv) == 5:
            return asyncio.run(replay(argv[1], argv[2], int(argv[3]), argv[4]))
    except Exception as exc:  # the benchmark reads the reason from stderr
        print(f"nats anchor failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
