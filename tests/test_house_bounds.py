"""Issue 15 point 12: state keyed by what a peer sends is bounded, evictions counted.

The audit of every such map in core/ (ARCHITECTURE.md, "Per-peer state is
bounded") found these left unbounded; each test failed before its fix.
"""

from __future__ import annotations

from eda.core.txn.directory import MAX_NAMES, Lookups


def test_a_flood_of_made_up_participant_names_leaves_the_lookup_cache_bounded() -> None:
    """A commit names any participant it likes: each name looked up was kept for ever."""
    lookups = Lookups(lambda name: [], ttl=60.0, miss_ttl=60.0)
    flood = 3 * MAX_NAMES
    for i in range(flood):
        assert lookups.lookup_now(f"ghost-{i}") == []
    assert len(lookups.cache) <= MAX_NAMES
    assert lookups.cache.evicted == flood - len(lookups.cache)
    # a name in use stays answered from the cache while the flood goes on
    asked: list[str] = []

    def find(name: str) -> list[str]:
        asked.append(name)
        return ["tcp://127.0.0.1:7731"] if name == "stock" else []

    known = Lookups(find, ttl=60.0, miss_ttl=60.0)
    for i in range(flood):
        assert known.lookup_now("stock") == ["tcp://127.0.0.1:7731"]
        known.lookup_now(f"ghost-{i}")
    assert asked.count("stock") == 1  # looked up once, never forgotten
