"""Issue 15 point 8: every terminal view is drawn for the injectable Environment, so
it is tested in-process, without a pty -- the ``--watch`` live view included."""

from __future__ import annotations

from typing import Any

from eda.cli.common import Context
from eda.cli.output import Column, Environment, Output, TableView
from eda.cli.watch import watch

VIEW = TableView(
    (Column("TOPIC"), Column("EVENTS", numeric=True)), lambda row: [row["topic"], row["events"]]
)


def test_the_watch_live_view_draws_into_the_injected_environment() -> None:
    screen = bytearray()
    env = Environment(write=screen.extend, stdout_isatty=True, width=60, colour=False)
    out = Output(Context("t", False), env=env)
    counts = iter([3, 7])

    def snapshot() -> list[dict[str, Any]]:
        n = next(counts, None)
        if n is None:
            raise KeyboardInterrupt  # Ctrl-C after two snapshots
        return [{"topic": "t.a", "events": n}]

    watch(out, snapshot, lambda rows: [(rows, VIEW)], key=lambda row: row["topic"],
          counters={"events": "EVENTS/S"}, interval=0.05, title="bus")  # fmt: skip
    text = screen.decode()
    assert text.count("TOPIC") >= 2 and " 7 " in text, text  # two frames, the new count
    assert "\x1b[1A" in text or "\x1b[2K" in text, text  # the second redrawn in place
    assert "EVENTS/S" in text  # the rate column, once there were two snapshots
    assert "\x1b[3" not in text  # colour=False: no colour
