"""The durable journal of eda-txn: group commit, torn-tail repair, damage refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from eda.core.txn.journal import CorruptJournal, open_journal, read

ROOT = Path(__file__).resolve().parent.parent


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


# -- a disk that fills up -----------------------------------------------------------------------
FULL = textwrap.dedent("""\
    import json, os, subprocess, sys
    from eda.core.txn.journal import JournalError, open_journal, read
    d = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], check=True)
    path = d + "/j.jsonl"
    j = open_journal(path)
    durable, error, n = 0, "", 0
    try:
        while True:  # batches of five records of 2,000 bytes: the last one is cut short
            for _ in range(5):
                n += 1
                j.append({"n": n, "pad": "x" * 2000})
            j.sync()
            durable = n
    except JournalError as exc:
        error = str(exc)
    data = open(path, "rb").read()
    torn_after_failure = not data.endswith(b"\\n") and len(data) > 0
    on_disk = [r["n"] for r in read(path)]
    j.append({"n": n + 1})  # more records while the disk is still full
    n += 1
    try:
        j.sync()
        again = "synced"
    except JournalError as exc:
        again = str(exc)
    k = open_journal(d + "/k.jsonl")  # empty: its compaction has nothing to sync first
    try:
        k.compact([{"pad": "y" * 8000}], lambda r: True)
        compacted = "compacted"
    except JournalError as exc:
        compacted = str(exc)
    k.close()
    leftovers = sorted(os.listdir(d))
    clean_while_full = open(path, "rb").read() == data
    failed = j.failed
    subprocess.run(["mount", "-o", "remount,size=1m", d], check=True)  # room again
    j.write({"n": n + 1})
    n += 1
    j.close()
    reopened = open_journal(path)
    print(json.dumps({
        "error": error, "durable": durable, "on_disk": on_disk, "torn": torn_after_failure,
        "again": again, "compacted": compacted, "leftovers": leftovers, "failed": failed,
        "clean_while_full": clean_while_full, "after": [r["n"] for r in reopened.replay()],
        "repaired": reopened.repaired, "n": n, "healthy": reopened.failed is None,
    }))
    reopened.close()
""")


def test_a_write_to_a_full_disk_leaves_no_torn_line_and_is_retried_when_there_is_room(
    tmp_path: Path,
) -> None:
    """PostgreSQL's rule: a WAL write that failed is not followed by later records.
    The failed batch is cut back off the file, kept buffered, and written whole
    once the disk has room: the journal reopens with every record, in order."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", FULL, str(mnt)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "No space left on device" in out["error"] and out["failed"] == "No space left on device"
    assert out["durable"] >= 5 and not out["torn"]
    assert out["on_disk"] == list(range(1, out["durable"] + 1))  # what sync() promised, no more
    assert "No space left" in out["again"] and out["clean_while_full"]
    assert "cannot compact" in out["compacted"] and out["leftovers"] == ["j.jsonl", "k.jsonl"]
    assert out["after"] == list(range(1, out["n"] + 1)) and out["repaired"] == 0
    assert out["healthy"]


def test_withdrawn_records_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with open_journal(path) as j:
        first = j.append({"n": 1})
        second = j.append({"n": 2})
        j.append({"n": 3})
        assert j.withdraw({second, 99}) == {second}
        j.sync()
        assert j.withdraw({first}) == set()  # durable already: nothing taken back
    assert [r["n"] for r in read(path)] == [1, 3]


# -- compaction and reading stream-wise ---------------------------------------------------------
def test_compaction_keeps_the_head_then_every_record_kept_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with open_journal(path) as j:
        for i in range(20):
            j.append({"txn": f"t{i % 4}", "state": ["preparing", "prepared", "x", "done"][i % 4]})
        j.append({"other": True})  # not held in the buffer: compact() syncs first
        kept = j.compact([{"mark": 1}], lambda r: r.get("txn") in ("t0", "t1"))
        assert kept == 11 and j.count == 11 and j.size == path.stat().st_size
        j.write({"txn": "t9", "state": "new"})  # goes on in the new segment
    records = list(read(path))
    assert records[0] == {"mark": 1} and records[-1] == {"txn": "t9", "state": "new"}
    assert [r["state"] for r in records[1:-1]] == ["preparing", "prepared"] * 5
    assert not (tmp_path / "log.jsonl.compact").exists()


def test_a_crash_during_compaction_leaves_the_old_segment(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with open_journal(path) as j:
        j.write({"txn": "a"})
    (tmp_path / "log.jsonl.compact").write_bytes(b'{"txn": "half')  # a new segment cut short
    with open_journal(path) as j:
        assert [r["txn"] for r in j.replay()] == ["a"]
        j.compact([], lambda r: True)  # the leftover is overwritten, not appended to
    assert [r["txn"] for r in read(path)] == ["a"]


def test_opening_and_reading_stream_the_file_instead_of_loading_it(tmp_path: Path) -> None:
    """Memory while opening, replaying and reading does not grow with the file."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"txn": "c1.0123456789abcdef0", "state": "committed", "pad": "p" * 150})
    with open(path, "w") as f:
        for _ in range(40_000):
            f.write(line + "\n")
    size = path.stat().st_size
    assert size > 7_000_000
    tracemalloc.start()
    try:
        j = open_journal(path)
        replayed = sum(1 for _ in j.replay())
        j.close()
        read_back = sum(1 for _ in read(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert replayed == read_back == 40_000
    assert peak < size // 8, f"peak {peak} bytes for a file of {size}"


def test_an_overlong_line_is_a_bad_record_not_a_memory_hog(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n' + b"x" * (3 << 20) + b'\n{"a":2}\n')
    with pytest.raises(CorruptJournal, match="line 2"):
        open_journal(path)
    path.write_bytes(b'{"a":1}\n' + b"x" * (3 << 20))  # a torn tail, however long
    j = open_journal(path)
    assert j.records == [{"a": 1}] and j.repaired == 3 << 20
    j.close()


def test_compaction_by_transaction_judges_every_record_of_one_alike(tmp_path: Path) -> None:
    """With *txns*, every record of a transaction goes or stays with it, however
    its line is written (read without parsing when the id comes first)."""
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"txn": "c1.a", "state": "preparing"}\n'  # spaces: parsed
        '{"state": "prepared", "txn": "c1.a"}\n'  # the id not first: parsed
        '{"txn":"c1.b","state":"committed"}\n'
        '{"mark": 1}\n'
        '{"txn":"c1.\\u0061","note":"an escaped id"}\n'  # "c1.a", escaped: parsed
        '{"txn":"c1.b","hazard":"x"}\n'
    )
    with open_journal(path) as j:
        j.append({"txn": "c1.a", "state": "new kind"})
        kept = j.compact([{"head": True}], lambda r: "mark" in r, lambda t: t == "c1.a")
    records = list(read(path))
    assert kept == 6 and records == [
        {"head": True},
        {"txn": "c1.a", "state": "preparing"},
        {"state": "prepared", "txn": "c1.a"},
        {"mark": 1},
        {"txn": "c1.a", "note": "an escaped id"},
        {"txn": "c1.a", "state": "new kind"},
    ]
