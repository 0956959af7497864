"""The durable journal of eda-txn: group commit, torn-tail repair, damage refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eda.core.txn.journal import CorruptJournal, open_journal, read


def test_records_survive_reopen_and_group_commit_syncs_once(tmp_path: Path) -> None:
    path = tmp_path / "j" / "log.jsonl"
    with open_journal(path) as j:
        for i in range(10):
            j.append({"txn": i, "state": "committed"})
        assert j.pending == 10
        j.sync()
        assert j.fsyncs == 1 and j.pending == 0
        j.write({"txn": 10})
        assert j.fsyncs == 2
    again = open_journal(path)
    assert [r["txn"] for r in again.records] == list(range(11))
    assert again.repaired == 0
    again.close()
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_torn_tail_is_cut_at_the_last_good_record(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":3,"b":')
    j = open_journal(path)
    assert [r["a"] for r in j.records] == [1, 2]
    assert j.repaired == len(b'{"a":3,"b":')
    j.write({"a": 4})
    j.close()
    assert [r["a"] for r in read(path)] == [1, 2, 4]


def test_garbage_lines_at_the_end_are_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n\x00\x00\x00\n[1]\n')
    j = open_journal(path)
    assert j.records == [{"a": 1}] and j.repaired == 8
    j.close()
    assert path.read_bytes() == b'{"a":1}\n'


def test_damage_before_good_records_is_refused_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    data = b'{"a":1}\nnot json\n{"a":3}\n'
    path.write_bytes(data)
    with pytest.raises(CorruptJournal, match="line 2"):
        open_journal(path)
    assert path.read_bytes() == data  # nothing cut


def test_unsynced_records_are_lost_by_a_crash_and_synced_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    code = (
        "import sys; from eda.core.txn.journal import open_journal; from eda.core.txn import crash\n"
        f"j = open_journal({str(path)!r}); j.write({{'n': 1}}); j.append({{'n': 2}})\n"
        "crash.point('test', 'here'); sys.exit(3)\n"
    )
    env = {**os.environ, "EDA_CRASH_AT": "test:here"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -9  # killed by its crash point, not exited
    assert [r["n"] for r in read(path)] == [1]
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)  # not armed
    assert proc.returncode == 3


def test_crash_point_fires_on_its_nth_passage(tmp_path: Path) -> None:
    code = (
        "from eda.core.txn import crash\n"
        "for i in range(5):\n    print(i, flush=True); crash.point('p', 'loop')\n"
    )
    env = {**os.environ, "EDA_CRASH_AT": "other:x, p:loop@3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9 and proc.stdout.split() == ["0", "1", "2"]
