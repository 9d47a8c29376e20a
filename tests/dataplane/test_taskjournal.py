"""The client's task journal: atomic, checksummed records that survive a crash, and refuse damage by name."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import trio

from p2pgpu.taskjournal import (
    HEADER_SIZE,
    JournalCorrupt,
    ResultLocation,
    TaskEntry,
    TaskJournal,
    decode_entry,
    encode_entry,
)


def entry(n: int = 1, **changes) -> TaskEntry:
    base = TaskEntry(
        task_id=bytes([n]) * 32, post_nonce=n, post_tx=b"\x01\x02signed", spec=b"\x03spec", max_unit_price=5000,
        kind="batch", units=1, bid_window=10, exec_blocks=20, audit_rate_bps=0, fee=1, enough_bids=3,
        max_wait_blocks=5, submit_height=7, created_ms=1_700_000_000_000 + n,
        inputs=((b"\xaa" * 32, b"\xbb" * 32),), timings=(("posted", 7, 1_700_000_000_001),),
    )
    return base.bump(**changes) if changes else base


def test_a_record_round_trips_with_every_field():
    e = entry(3, stage="settled", outcome="paid", detail="provider paid", ledger_task=b"\x09task",
              result=ResultLocation(result_hash=b"\x11" * 32, body=b"\x22" * 32, fetched_ms=5), closed_ms=6,
              bids=(b"\x91signed bid of p0", b"\x92signed bid of p1"))
    assert decode_entry(encode_entry(e)) == e


@pytest.mark.parametrize("damage, words", [
    (lambda d: d[: HEADER_SIZE - 3], "shorter than"),
    (lambda d: d[:-5], "torn write"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "SHA-256"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: b"", "shorter than"),
])
def test_a_torn_or_damaged_record_is_refused_with_the_reason(damage, words):
    with pytest.raises(JournalCorrupt, match=words):
        decode_entry(damage(encode_entry(entry())))


def test_write_is_durable_and_leaves_no_temp_file(tmp_path: Path):
    j = TaskJournal(tmp_path)
    e = entry()
    assert j.write(e)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [f"{e.task_id.hex()}.task"]
    assert TaskJournal(tmp_path).load_all().entries == [e]  # a fresh process reads what was written


def test_an_older_version_never_overwrites_a_newer_one(tmp_path: Path):
    j = TaskJournal(tmp_path)
    first = entry()
    newer = first.bump(stage="assigned")
    assert j.write(newer)
    assert not j.write(first)  # the thread that carried the older snapshot lost the race: dropped
    assert j.read(first.task_id).stage == "assigned"


def test_a_crash_mid_write_leaves_the_old_record_and_the_temp_file_is_cleaned(tmp_path: Path):
    j = TaskJournal(tmp_path)
    e = entry()
    j.write(e)
    # what a process killed between write and rename leaves behind: a half-written temp file
    (tmp_path / f"{e.task_id.hex()}.task.12345.tmp").write_bytes(encode_entry(e.bump(stage="x"))[:20])
    report = TaskJournal(tmp_path).load_all()
    assert report.entries == [e] and not report.quarantined
    assert not list(tmp_path.glob("*.tmp"))


def test_a_torn_file_is_quarantined_named_in_the_log_and_the_rest_load(tmp_path: Path, caplog):
    j = TaskJournal(tmp_path)
    good, bad = entry(1), entry(2)
    j.write(good)
    j.write(bad)
    path = j.path_of(bad.task_id)
    path.write_bytes(path.read_bytes()[:-7])  # a file system that lost the tail after the rename
    with caplog.at_level(logging.ERROR, logger="p2pgpu.taskjournal"):
        report = TaskJournal(tmp_path).load_all()
    assert report.entries == [good]
    assert len(report.quarantined) == 1
    moved, why = report.quarantined[0]
    assert moved.parent.name == "quarantine" and moved.exists() and not path.exists()
    assert "torn write" in why
    assert any("task_record_refused" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_a_record_under_another_tasks_name_is_refused(tmp_path: Path):
    j = TaskJournal(tmp_path)
    e = entry(1)
    j.write(e)
    os.replace(j.path_of(e.task_id), j.path_of(bytes([9]) * 32))
    report = TaskJournal(tmp_path).load_all()
    assert report.entries == [] and "not its file name" in report.quarantined[0][1]


def test_delete_forgets_the_task_and_a_late_older_write_cannot_bring_it_back(tmp_path: Path):
    j = TaskJournal(tmp_path)
    e = entry()
    j.write(e.bump())
    assert j.delete(e.task_id)
    assert not j.write(e.bump().bump())
    assert TaskJournal(tmp_path).load_all().entries == []
    assert not j.delete(e.task_id)


def test_many_concurrent_writers_of_many_tasks_all_land_newest_version_wins(tmp_path: Path):
    j = TaskJournal(tmp_path)
    versions = {n: [entry(n)] for n in range(1, 41)}
    for n, vs in versions.items():
        for _ in range(4):
            vs.append(vs[-1].bump(stage=f"s{len(vs)}"))
    barrier = threading.Barrier(8)

    def writer(k: int) -> None:
        barrier.wait()
        for n, vs in versions.items():  # every thread writes every version, in different orders
            for e in (vs if k % 2 else reversed(vs)):
                j.write(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = {e.task_id: e for e in TaskJournal(tmp_path).load_all().entries}
    assert len(loaded) == 40
    assert all(loaded[vs[0].task_id] == vs[-1] for vs in versions.values())
    assert not list(tmp_path.glob("*.tmp"))


async def test_writes_from_trio_worker_threads_do_not_block_each_other(tmp_path: Path):
    j = TaskJournal(tmp_path)

    async with trio.open_nursery() as nursery:
        for n in range(1, 51):
            nursery.start_soon(trio.to_thread.run_sync, j.write, entry(n))
    assert len(TaskJournal(tmp_path).load_all().entries) == 50


def test_write_many_lands_every_record_with_one_directory_fsync(tmp_path: Path, monkeypatch):
    j = TaskJournal(tmp_path)
    synced: list[Path] = []
    import p2pgpu.taskjournal as taskjournal

    real_sync_dir = taskjournal.sync_dir
    monkeypatch.setattr(taskjournal, "sync_dir", lambda path: (synced.append(Path(path)), real_sync_dir(path)))
    stale = entry(3).bump(stage="assigned")
    j.write(stale)
    synced.clear()
    batch = [entry(n) for n in range(1, 6)]  # entry(3) is older than the record on disk: dropped, not an error
    assert j.write_many(batch) == []
    assert synced == [tmp_path]
    loaded = {e.task_id: e for e in TaskJournal(tmp_path).load_all().entries}
    assert len(loaded) == 5 and loaded[stale.task_id] == stale
    assert not list(tmp_path.glob("*.tmp"))


def test_write_many_reports_each_refused_record_and_writes_the_rest(tmp_path: Path, monkeypatch):
    j = TaskJournal(tmp_path)
    import p2pgpu.taskjournal as taskjournal

    real_encode = taskjournal.encode_entry

    def encode_refusing_two(e: TaskEntry) -> bytes:
        if e.task_id == entry(2).task_id:
            raise OSError(28, "No space left on device")
        return real_encode(e)

    monkeypatch.setattr(taskjournal, "encode_entry", encode_refusing_two)
    failed = j.write_many([entry(1), entry(2), entry(3)])
    assert [(e.task_id, type(exc)) for e, exc in failed] == [(entry(2).task_id, OSError)]
    assert sorted(e.post_nonce for e in TaskJournal(tmp_path).load_all().entries) == [1, 3]


def test_write_many_with_the_directory_unsynced_counts_nothing_as_durable(tmp_path: Path, monkeypatch):
    j = TaskJournal(tmp_path)
    import p2pgpu.taskjournal as taskjournal

    def refuse(path: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(taskjournal, "sync_dir", refuse)
    batch = [entry(1), entry(2)]
    assert [e for e, _ in j.write_many(batch)] == batch
