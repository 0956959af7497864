"""A JetStream stream that reports less than it acknowledged (issue 18, nemesis seed 2).

In the long nemesis run (seed 2: kills, freezes and partitions of three
nats-server 2.9.10 nodes), a node whose copy of the stream lagged (16
messages where the others held 25) became the stream's leader. A front
resynchronising after a failed commit read the stream's last sequence from it
(16), took it as its own, and wrote its next batches expecting 16 and 17: the
lagging leader stored and acknowledged them at sequences the majority held
other events at, so two confirmed batches were lost and a later read found
another event at their bus sequences.  A front never writes expecting less
than a sequence it has seen acknowledged: such a leader refuses the write
(wrong last sequence) and nothing is confirmed until the stream is whole.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests import bus_engines
from tests.bus_engines import Opener
from tests.test_bus_store import batch

server, nats_opener = bus_engines.server, bus_engines.nats_opener  # fixtures


def test_a_front_never_writes_expecting_less_than_it_saw_acknowledged(
    nats_opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    with nats_opener() as s:
        for first in (1, 4):
            s.append([batch(first, 3)])
            s.commit()
        acked = s._heads[-1].sseq  # type: ignore[attr-defined]
        real = s._js.stream_info  # type: ignore[attr-defined]

        async def lagging(stream: str, *args: Any, **kw: Any) -> Any:
            info = await real(stream, *args, **kw)
            info.state.last_seq = acked - 1  # a leader whose copy lags behind
            return info

        monkeypatch.setattr(s._js, "stream_info", lagging)  # type: ignore[attr-defined]
        s._resync()  # type: ignore[attr-defined]  # as after a failed commit
        monkeypatch.undo()
        s.append([batch(7, 3)])
        headers = s._outbox[-1][2]  # type: ignore[attr-defined]
        assert headers["Eda-Seq"] == "7"
        assert int(headers["Nats-Expected-Last-Sequence"]) == acked
        s.commit()  # the stream, whole again, takes it where it belongs
        assert s._heads[-1].sseq == acked + 1  # type: ignore[attr-defined]
