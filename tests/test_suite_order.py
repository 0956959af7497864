"""The suite's own order (tests/conftest.py): tests marked ``long`` start first on
every xdist worker, so a run never ends with one worker on a long test.

Checked against xdist's own worksteal scheduler (the one ``make test`` uses),
not a model of it: what each worker is handed first, and what a worker that runs
out steals (the tail of the longest queue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from xdist.scheduler.worksteal import WorkStealingScheduling

from tests.conftest import _long_first


@dataclass
class FakeItem:
    nodeid: str
    long: bool

    def get_closest_marker(self, name: str) -> object | None:
        return object() if name == "long" and self.long else None


@dataclass(eq=False)  # hashable by identity, as the scheduler keys its tables by node
class FakeNode:
    """What the scheduler needs of a worker: it is sent test indices, asked to give some back."""

    name: str
    sent: list[int] = field(default_factory=list)
    shutting_down: bool = False

    @property
    def gateway(self) -> Any:
        return SimpleNamespace(id=self.name)

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(indices)

    def send_steal(self, indices: list[int]) -> None:
        self.steal = indices

    def shutdown(self) -> None:
        self.shutting_down = True


def handed_out(items: list[FakeItem], workers: int) -> tuple[Any, list[FakeNode]]:
    """xdist's worksteal scheduler after collection of *items* in the hook's order."""
    config = SimpleNamespace(getvalue=lambda name: [f"{workers}*popen"])
    sched = WorkStealingScheduling(config)  # type: ignore[arg-type]
    nodes = [FakeNode(f"gw{k}") for k in range(workers)]
    ordered = _long_first(items, workers)
    for node in nodes:
        sched.add_node(node)  # type: ignore[arg-type]
        sched.add_node_collection(node, [item.nodeid for item in ordered])  # type: ignore[arg-type]
    sched.schedule()
    return sched, nodes


def suite(n: int, long_at: set[int]) -> list[FakeItem]:
    return [FakeItem(f"t{i}", i in long_at) for i in range(n)]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_worker_starts_with_its_share_of_the_long_tests(workers: int) -> None:
    # long tests bunched in two modules, as in the suite (the multi-host files)
    items = suite(200, {*range(40, 47), *range(150, 155)})
    sched, nodes = handed_out(items, workers)
    ids = sched.collection
    assert sorted(ids) == sorted(item.nodeid for item in items)  # each test once
    longs = {item.nodeid for item in items if item.long}
    shares = []
    for node in nodes:
        first = [ids[i] for i in node.sent]
        share = sum(1 for t in first if t in longs)
        assert all(t in longs for t in first[:share])  # the long ones come first
        shares.append(share)
    assert sum(shares) == len(longs) and max(shares) - min(shares) <= 1
    # a worker that runs out steals the tail of the longest queue: never a long test
    for node in nodes[1:]:
        sched.node2pending[node].clear()
    sched.check_schedule()
    assert workers == 1 or not any(ids[i] in longs for i in nodes[0].steal)


def test_without_long_tests_the_collection_order_is_kept() -> None:
    items = suite(50, set())
    assert _long_first(items, 4) == items  # type: ignore[arg-type]


def test_more_long_tests_than_a_chunk_holds_are_all_kept() -> None:
    items = suite(6, {0, 1, 2, 3, 4})  # chunks of 1, 1, 2 and 2 tests
    sched, nodes = handed_out(items, 4)
    assert sorted(sched.collection) == [f"t{i}" for i in range(6)]
    for node in nodes:
        first = [sched.collection[i] for i in node.sent]
        assert first[0] != "t5"  # every worker begins with a long one
