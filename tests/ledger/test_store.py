"""The store on real files: round trips, every torn tail, every flipped byte, snapshots, locks, real crashes."""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledger.store as store_mod
from ledger.store import (
    BlockLog,
    ChainStore,
    CorruptRecord,
    Damage,
    HeightGap,
    HeightOutOfRange,
    HeightRepeat,
    NotAStoreFile,
    RecordTooLarge,
    Snapshot,
    SnapshotStore,
    StoreClosed,
    StoreConfig,
    StoreIOError,
    StoreLocked,
    UnsupportedVersion,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADER = 16  # log file header bytes
FRAME = 12  # frame header bytes


def payload(seed: int, height: int) -> bytes:
    """Deterministic record bytes of varying length (0..~300), so frames differ in size."""
    digest = hashlib.sha256(f"{seed}/{height}".encode()).digest()
    return digest * (digest[0] % 10)


def write_log(path: Path, records: list[bytes]) -> list[int]:
    """Write ``records`` to a new log; return the file offset where each frame ends."""
    ends = []
    with BlockLog.open(path) as blog:
        for rec in records:
            blog.append(rec)
            ends.append(blog.size_bytes)
    return ends


def read_all(path: Path, **kwargs: int) -> tuple[list[bytes], store_mod.RecoveryReport]:
    with BlockLog.open(path, **kwargs) as blog:
        return list(blog.records_from(0)), blog.recovery


def quarantine_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ".dropped-" in p.name)


SMALL_RECORDS = [b"genesis", b"", b"x" * 40, bytes(range(256)), b"last"]


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


def test_block_log_round_trip(tmp_path: Path) -> None:
    records = [payload(1, h) for h in range(200)] + [b"", os.urandom(1 << 20)]
    write_log(tmp_path / "log", records)
    got, report = read_all(tmp_path / "log")
    assert got == records
    assert report.clean and report.records_kept == len(records) and report.bytes_truncated == 0
    with BlockLog.open(tmp_path / "log") as blog:
        assert blog.read(201) == records[201]
        assert list(blog.records_from(199)) == records[199:]
        with pytest.raises(IndexError):
            blog.read(len(records))


def test_chain_store_round_trip(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path) as cs:
        assert cs.head_height is None and cs.first_height is None
        assert list(cs.blocks_from(0)) == []
        for h in range(1, 51):
            cs.append_block(h, payload(2, h))
        assert cs.head_height == 50
    with ChainStore.open(tmp_path) as cs:
        assert cs.recovery.clean
        assert (cs.first_height, cs.head_height) == (1, 50)
        assert list(cs.blocks_from(1)) == [(h, payload(2, h)) for h in range(1, 51)]
        assert list(cs.blocks_from(45)) == [(h, payload(2, h)) for h in range(45, 51)]
        assert list(cs.blocks_from(51)) == []
        assert cs.get_block(17) == payload(2, 17)
        snap, blocks = cs.load()
        assert snap is None and [h for h, _ in blocks] == list(range(1, 51))


def test_unsynced_appends_are_kept_by_sync_and_close(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path) as cs:
        for h in range(10):
            cs.append_block(h, payload(3, h), sync=False)
        cs.sync()
        cs.append_block(10, b"tail", sync=False)
    with ChainStore.open(tmp_path) as cs:
        assert cs.head_height == 10 and cs.get_block(10) == b"tail"


# --------------------------------------------------------------------------
# Files that are not ours
# --------------------------------------------------------------------------


def _log_header(magic: bytes = b"P2PGLOG\x00", version: int = 1, flags: int = 0) -> bytes:
    head = magic + struct.pack(">HH", version, flags)
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize(
    ("content", "error", "words"),
    [
        (b"", NotAStoreFile, "shorter than"),
        (b"P2PGLOG\x00\x00\x01", NotAStoreFile, "shorter than"),
        (b"#!/bin/sh\necho this is someone's script\n" * 3, NotAStoreFile, "magic"),
        (_log_header()[:-1] + b"\x00" + bytes(40), NotAStoreFile, "checksum"),
        (_log_header(version=2) + bytes(40), UnsupportedVersion, "version 2"),
        (_log_header(flags=1) + bytes(40), UnsupportedVersion, "flags"),
    ],
)
def test_foreign_log_file_is_refused_and_left_untouched(
    tmp_path: Path, content: bytes, error: type[Exception], words: str
) -> None:
    path = tmp_path / ChainStore.LOG_NAME
    path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(error, match=words) as info:
        ChainStore.open(tmp_path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert quarantine_files(tmp_path) == []
    # The failed open released the lock: a corrected dir opens fine.
    path.unlink()
    ChainStore.open(tmp_path).close()


# --------------------------------------------------------------------------
# Torn tails: every cut of a small log
# --------------------------------------------------------------------------


def test_torn_tail_at_every_offset(tmp_path: Path) -> None:
    original = tmp_path / "original"
    ends = write_log(original, SMALL_RECORDS)
    data = original.read_bytes()
    assert len(data) == ends[-1]
    for cut in range(len(data) + 1):
        path = tmp_path / f"cut-{cut}"
        path.write_bytes(data[:cut])
        if cut < HEADER:  # we create logs atomically, so a short file was never ours
            with pytest.raises(NotAStoreFile):
                BlockLog.open(path)
            assert path.read_bytes() == data[:cut]
            continue
        kept = sum(1 for end in ends if end <= cut)
        good_end = ends[kept - 1] if kept else HEADER
        got, report = read_all(path)
        assert got == SMALL_RECORDS[:kept], cut
        assert report.records_kept == kept and report.bytes_kept == good_end
        assert report.bytes_truncated == cut - good_end
        if cut == good_end:
            assert report.clean
        else:
            assert report.damage in (Damage.TORN_HEADER, Damage.TORN_RECORD)
            assert report.quarantined is None
        assert path.stat().st_size == good_end
        with BlockLog.open(path) as blog:
            blog.append(b"after the crash")
        got, report = read_all(path)
        assert got == SMALL_RECORDS[:kept] + [b"after the crash"] and report.clean
        path.unlink()
    assert quarantine_files(tmp_path) == []


def test_chain_store_torn_tail_at_every_offset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with ChainStore.open(src) as cs:
        for h in range(5):
            cs.append_block(h, payload(4, h))
    data = (src / ChainStore.LOG_NAME).read_bytes()
    frame_ends = [HEADER]
    for h in range(5):
        frame_ends.append(frame_ends[-1] + FRAME + 8 + len(payload(4, h)))
    for cut in range(HEADER, len(data) + 1):
        d = tmp_path / f"cut-{cut}"
        d.mkdir()
        (d / ChainStore.LOG_NAME).write_bytes(data[:cut])
        kept = sum(1 for end in frame_ends[1:] if end <= cut)
        with ChainStore.open(d) as cs:
            assert cs.head_height == (kept - 1 if kept else None)
            assert list(cs.blocks_from(0)) == [(h, payload(4, h)) for h in range(kept)]
            cs.append_block(kept, b"next")
        with ChainStore.open(d) as cs:
            assert cs.head_height == kept and cs.get_block(kept) == b"next"


# --------------------------------------------------------------------------
# Damage: every flipped byte
# --------------------------------------------------------------------------


def test_flipped_byte_anywhere_drops_that_record_and_everything_after(tmp_path: Path) -> None:
    original = tmp_path / "original"
    ends = write_log(original, SMALL_RECORDS)
    data = original.read_bytes()
    starts = [HEADER] + ends[:-1]
    for pos in range(HEADER, len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        d = tmp_path / f"flip-{pos}"
        d.mkdir()
        path = d / "log"
        path.write_bytes(damaged)
        index = next(i for i, end in enumerate(ends) if pos < end)
        got, report = read_all(path)
        assert got == SMALL_RECORDS[:index], pos
        in_header = pos - starts[index] < FRAME
        assert report.damage is (Damage.BAD_HEADER if in_header else Damage.BAD_CHECKSUM)
        assert report.bytes_kept == starts[index] and report.bytes_truncated == len(data) - starts[index]
        # Nothing is destroyed: the dropped bytes are kept aside, byte for byte.
        assert report.quarantined is not None and report.quarantined.read_bytes() == bytes(damaged[starts[index] :])
        assert quarantine_files(d) == [report.quarantined]


def test_second_quarantine_at_the_same_offset_does_not_overwrite_the_first(tmp_path: Path) -> None:
    path = tmp_path / "log"
    write_log(path, [b"a", b"b"])
    for _ in range(2):
        with open(path, "ab") as f:
            f.write(b"\x00" * 30)  # a zero-filled tail, as a crash on ext4 can leave
        _, report = read_all(path)
        assert report.damage is Damage.BAD_HEADER
    first = f"log.dropped-{HEADER + 26}"
    assert [p.name for p in quarantine_files(tmp_path)] == [first, first + ".1"]


def _frame_header(length: int) -> bytes:
    head = struct.pack(">II", length, 0)
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize(
    ("frame", "limit", "damage"),
    [
        (struct.pack(">III", 2**32 - 1, 0, 0), None, Damage.BAD_HEADER),  # a damaged length field
        (_frame_header(2**32 - 1), 2**32 - 1, Damage.TORN_RECORD),  # intact, within the limit, past end of file
        (_frame_header(2**32 - 1), None, RecordTooLarge),  # intact but over the limit: refuse, drop nothing
    ],
)
def test_length_claiming_4_gib_allocates_nothing(
    tmp_path: Path, frame: bytes, limit: int | None, damage: Damage | type[Exception]
) -> None:
    path = tmp_path / "log"
    write_log(path, [b"kept"])
    with open(path, "ab") as f:
        f.write(frame + b"tail" * 100)
    before = path.read_bytes()
    kwargs = {} if limit is None else {"max_record_bytes": limit}
    tracemalloc.start()
    try:
        if isinstance(damage, Damage):
            got, report = read_all(path, **kwargs)
            assert got == [b"kept"] and report.damage is damage
        else:
            with pytest.raises(damage, match=f"stored record 1 at offset {HEADER + FRAME + 4} of 4294967295 bytes"):
                read_all(path, **kwargs)
            assert path.read_bytes() == before
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * (1 << 20)  # the scan buffer is 1 MiB; a 4 GiB read would show here


def test_lowering_the_record_limit_refuses_to_open_instead_of_dropping_blocks(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path) as cs:
        cs.append_block(0, b"x" * 50)
        cs.append_block(1, b"x" * 500)
    with pytest.raises(RecordTooLarge, match="stored block 1 at .* of 500 bytes exceeds the limit of 100 .*larger"):
        ChainStore.open(tmp_path, StoreConfig(max_record_bytes=100))
    with ChainStore.open(tmp_path) as cs:
        assert cs.recovery.clean and cs.head_height == 1


def test_recovery_rejects_a_height_gap_and_a_record_without_a_height(tmp_path: Path) -> None:
    def framed(h: int, body: bytes) -> bytes:
        return struct.pack(">Q", h) + body

    for bad, why in [(framed(5, b"skips 4"), "expected 4"), (b"short", "too short")]:
        d = tmp_path / why.replace(" ", "-")
        d.mkdir()
        write_log(d / ChainStore.LOG_NAME, [framed(1, b"a"), framed(2, b"b"), framed(3, b"c"), bad, framed(6, b"f")])
        with ChainStore.open(d) as cs:
            assert cs.head_height == 3
            assert cs.recovery.damage is Damage.REJECTED and why in cs.recovery.detail
            assert cs.recovery.quarantined is not None
            cs.append_block(4, b"d")
        with ChainStore.open(d) as cs:
            assert [h for h, _ in cs.blocks_from(1)] == [1, 2, 3, 4] and cs.recovery.clean


def test_damage_after_open_is_reported_on_read(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path) as cs:
        for h in range(3):
            cs.append_block(h, b"block %d" % h)
        with open(tmp_path / ChainStore.LOG_NAME, "r+b") as f:
            f.seek(-2, os.SEEK_END)
            f.write(b"!!")
        assert cs.get_block(1) == b"block 1"
        with pytest.raises(CorruptRecord, match="record 2 .*checksum"):
            cs.get_block(2)
    with ChainStore.open(tmp_path) as cs:
        assert cs.head_height == 1 and cs.recovery.damage is Damage.BAD_CHECKSUM


# --------------------------------------------------------------------------
# Append rules
# --------------------------------------------------------------------------


def test_heights_must_be_contiguous(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path) as cs:
        cs.append_block(7, b"first block can be any height")
        cs.append_block(8, b"b")
        with pytest.raises(HeightGap, match="skips heights 9..9"):
            cs.append_block(10, b"x")
        with pytest.raises(HeightRepeat, match="height 8 is already stored"):
            cs.append_block(8, b"x")
        with pytest.raises(HeightRepeat):
            cs.append_block(3, b"x")
        with pytest.raises(HeightOutOfRange):
            cs.append_block(-1, b"x")
        with pytest.raises(HeightOutOfRange):
            cs.blocks_from(6)
        with pytest.raises(HeightOutOfRange):
            cs.get_block(9)
        assert cs.head_height == 8
    with ChainStore.open(tmp_path) as cs:
        assert list(cs.blocks_from(0 + 7)) == [(7, b"first block can be any height"), (8, b"b")]


def test_record_size_limit_on_write(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path, StoreConfig(max_record_bytes=100)) as cs:
        cs.append_block(0, b"x" * 100)
        with pytest.raises(RecordTooLarge, match="block 1 of 101 bytes exceeds the limit of 100"):
            cs.append_block(1, b"x" * 101)
        assert cs.head_height == 0
    with BlockLog.open(tmp_path / "plain", max_record_bytes=10) as blog:
        with pytest.raises(RecordTooLarge):
            blog.append(b"y" * 11)
        assert len(blog) == 0
    with pytest.raises(ValueError):
        StoreConfig(max_record_bytes=2**32)
    with ChainStore.open(tmp_path / "typed") as cs, pytest.raises(TypeError, match="block 0 must be bytes, got int"):
        cs.append_block(0, 5)  # type: ignore[arg-type]


def test_failed_fsync_poisons_the_handle_and_reopen_repairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cs = ChainStore.open(tmp_path)
    cs.append_block(0, b"durable")

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_mod, "_sync_fd", failing_sync)
    with pytest.raises(StoreIOError, match="append failed: Input/output error"):
        cs.append_block(1, b"lost")
    monkeypatch.undo()
    with pytest.raises(StoreIOError):  # a retried fsync could lie (fsyncgate): refuse until reopened
        cs.append_block(1, b"retry")
    assert cs.head_height == 0
    cs.close()
    with ChainStore.open(tmp_path) as cs:
        assert list(cs.blocks_from(0)) == [(0, b"durable")]
        cs.append_block(1, b"retry")


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    cs = ChainStore.open(tmp_path)
    cs.append_block(0, b"a")
    cs.close()
    cs.close()  # idempotent
    with pytest.raises(StoreClosed):
        cs.append_block(1, b"b")
    with pytest.raises(StoreClosed):
        cs.get_block(0)


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


def test_snapshot_round_trip_and_load(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path) as cs:
        with pytest.raises(HeightOutOfRange, match="no blocks"):
            cs.snapshot(0, b"nothing to snapshot yet")
        for h in range(1, 11):
            cs.append_block(h, payload(5, h))
        cs.snapshot(0, b"genesis state")  # the state before the first block
        cs.snapshot(6, b"state@6")
        with pytest.raises(HeightOutOfRange):
            cs.snapshot(11, b"ahead of the log")
    with ChainStore.open(tmp_path) as cs:
        assert cs.latest_snapshot() == Snapshot(6, b"state@6")
        snap, blocks = cs.load()
        assert snap == (6, b"state@6")
        assert list(blocks) == [(h, payload(5, h)) for h in range(7, 11)]
        cs.snapshot(10, b"state@10")
        snap, blocks = cs.load()
        assert snap == (10, b"state@10") and list(blocks) == []


def test_stale_tmp_file_from_a_crash_is_ignored_and_removed(tmp_path: Path) -> None:
    snaps, stale = SnapshotStore.open(tmp_path)
    assert stale == []
    snaps.write_snapshot(5, b"good")
    good = snaps.path_of(5).read_bytes()
    # A crash between writing the tmp file and renaming it leaves a partial file behind.
    tmp = tmp_path / (snaps.path_of(9).name + ".tmp")
    tmp.write_bytes(good[:10])
    unrelated = tmp_path / "operator-notes.txt"
    unrelated.write_text("not ours")
    assert snaps.latest_snapshot() == (5, b"good")
    snaps, stale = SnapshotStore.open(tmp_path)
    assert stale == [tmp] and not tmp.exists() and unrelated.exists()
    assert snaps.latest_snapshot() == (5, b"good")


def _damage_truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _damage_flip_data(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))


def _damage_flip_height(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[19] ^= 1  # inside the height field
    p.write_bytes(bytes(raw))


def _damage_empty(p: Path) -> None:
    p.write_bytes(b"")


def _damage_wrong_name(p: Path) -> None:
    p.write_bytes(p.with_name("snapshot-00000000000000000002.snap").read_bytes())


@pytest.mark.parametrize(
    "damage", [_damage_truncate, _damage_flip_data, _damage_flip_height, _damage_empty, _damage_wrong_name]
)
def test_damaged_latest_snapshot_falls_back_to_the_previous(tmp_path: Path, damage) -> None:
    snaps, _ = SnapshotStore.open(tmp_path, keep=5)
    for h in (2, 4, 6):
        snaps.write_snapshot(h, b"state@%d" % h)
    damage(snaps.path_of(6))
    assert snaps.latest_snapshot() == (4, b"state@4")
    damage(snaps.path_of(4)) if damage is not _damage_wrong_name else _damage_empty(snaps.path_of(4))
    assert snaps.latest_snapshot() == (2, b"state@2")
    _damage_empty(snaps.path_of(2))
    assert snaps.latest_snapshot() is None


def test_newer_snapshot_format_is_an_error_not_damage(tmp_path: Path) -> None:
    snaps, _ = SnapshotStore.open(tmp_path)
    head = struct.pack(">8sHHQQ", b"P2PGSNP\x00", 2, 0, 3, 1)
    snaps.path_of(3).write_bytes(head + struct.pack(">I", zlib.crc32(b"s", zlib.crc32(head))) + b"s")
    with pytest.raises(UnsupportedVersion, match="version 2"):
        snaps.latest_snapshot()


def test_snapshot_retention_keeps_the_newest_k(tmp_path: Path) -> None:
    snaps, _ = SnapshotStore.open(tmp_path, keep=2)
    for h in (1, 5, 3, 9, 7):
        snaps.write_snapshot(h, b"s%d" % h)
    assert snaps.heights() == [7, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == [snaps.path_of(7).name, snaps.path_of(9).name]
    snaps.write_snapshot(9, b"rewritten")  # same height again: replaced, not duplicated
    assert snaps.heights() == [7, 9] and snaps.latest_snapshot() == (9, b"rewritten")


def test_snapshot_size_limit(tmp_path: Path) -> None:
    snaps, _ = SnapshotStore.open(tmp_path, max_bytes=8)
    with pytest.raises(RecordTooLarge, match="snapshot of 9 bytes"):
        snaps.write_snapshot(1, b"123456789")
    assert snaps.heights() == []


def test_snapshot_above_a_truncated_log_is_not_used(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path, StoreConfig(keep_snapshots=5)) as cs:
        for h in range(1, 11):
            cs.append_block(h, payload(6, h))
        cs.snapshot(4, b"state@4")
        cs.snapshot(8, b"state@8")
    log_path = tmp_path / ChainStore.LOG_NAME
    frame_end_5 = HEADER + sum(FRAME + 8 + len(payload(6, h)) for h in range(1, 6))
    os.truncate(log_path, frame_end_5 + 3)  # lose blocks 6..10 (a damaged tail)
    with ChainStore.open(tmp_path) as cs:
        assert cs.head_height == 5
        snap, blocks = cs.load()
        assert snap == (4, b"state@4") and list(blocks) == [(5, payload(6, 5))]


# --------------------------------------------------------------------------
# One owner per data dir
# --------------------------------------------------------------------------


class LineReader:
    """Read a child's stdout line by line without blocking forever (a hang guard, not a timing assertion)."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        self.proc = proc
        self.timeout = timeout
        self.buf = b""
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError("child produced no output")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def rest(self) -> list[bytes]:
        lines = []
        while line := self.readline():
            lines.append(line)
        return lines


def _spawn(code: str, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


HOLDER = """
    import sys
    from ledger.store import ChainStore
    with ChainStore.open(sys.argv[1]) as cs:
        cs.append_block(0, b"held")
        print("ready", flush=True)
        sys.stdin.read()
"""


def test_second_opener_is_refused_in_process(tmp_path: Path) -> None:
    with ChainStore.open(tmp_path):
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            ChainStore.open(tmp_path)
    ChainStore.open(tmp_path).close()


def test_second_process_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    proc = _spawn(HOLDER, str(tmp_path))
    try:
        lines = LineReader(proc)
        assert lines.readline() == b"ready", proc.stderr.read() if proc.stderr else ""
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}") as info:
            ChainStore.open(tmp_path)
        assert str(tmp_path) in str(info.value)
        assert (tmp_path / ChainStore.LOG_NAME).stat().st_size > HEADER  # the holder's data is untouched
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with ChainStore.open(tmp_path) as cs:
        assert cs.get_block(0) == b"held"


def test_lock_is_released_when_the_owner_is_killed(tmp_path: Path) -> None:
    proc = _spawn(HOLDER, str(tmp_path))
    try:
        assert LineReader(proc).readline() == b"ready"
    finally:
        proc.kill()
        proc.wait()
    with ChainStore.open(tmp_path) as cs:
        assert cs.get_block(0) == b"held"


# --------------------------------------------------------------------------
# Property: crashes never lose a synced record and never return garbage
# --------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 300), st.booleans()),
        st.tuples(st.just("crash"), st.floats(0.0, 1.0)),
        st.tuples(st.just("junk"), st.binary(min_size=1, max_size=40)),
        st.just(("reopen",)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_crashes_never_lose_synced_records_or_return_garbage(script: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        log_path = data_dir / ChainStore.LOG_NAME
        cs = ChainStore.open(data_dir)
        model: list[tuple[bytes, int]] = []  # (record, end offset of its frame) for what the file holds
        durable = HEADER  # every byte below this was fsynced

        def check_against_model() -> None:
            got = [rec for _, rec in cs.blocks_from(0)]
            assert got == [rec for rec, _ in model]

        try:
            for op in script:
                if op[0] == "append":
                    _, size, sync = op
                    height = len(model)
                    rec = payload(7, height)[:size] + bytes(max(0, size - len(payload(7, height))))
                    cs.append_block(height, rec, sync=sync)
                    end = (model[-1][1] if model else HEADER) + FRAME + 8 + len(rec)
                    model.append((rec, end))
                    if sync:
                        durable = end
                elif op[0] == "crash":
                    # Kill without flushing: the OS may lose anything after the last fsync.
                    cs.close()
                    size = log_path.stat().st_size
                    cut = durable + int(op[1] * (size - durable))
                    os.truncate(log_path, cut)
                    cs = ChainStore.open(data_dir)
                    model = [(rec, end) for rec, end in model if end <= cut]
                    assert all(end <= cut for _, end in model)
                    assert cs.recovery.bytes_kept >= durable
                    check_against_model()
                elif op[0] == "junk":
                    # A crash can leave arbitrary bytes past the last whole record.
                    cs.close()
                    with open(log_path, "ab") as f:
                        f.write(op[1])
                    cs = ChainStore.open(data_dir)
                    assert cs.recovery.bytes_truncated == len(op[1])
                    check_against_model()
                else:
                    cs.close()
                    cs = ChainStore.open(data_dir)
                    assert cs.recovery.clean
                    check_against_model()
            check_against_model()
        finally:
            cs.close()


# --------------------------------------------------------------------------
# Real crashes: SIGKILL a writer at a random moment
# --------------------------------------------------------------------------

WRITER = """
    import hashlib, sys
    from ledger.store import ChainStore, StoreConfig

    def payload(seed, height):
        digest = hashlib.sha256(f"{seed}/{height}".encode()).digest()
        return digest * (digest[0] % 10)

    data_dir, seed = sys.argv[1], int(sys.argv[2])
    with ChainStore.open(data_dir, StoreConfig(keep_snapshots=2)) as cs:
        height = 0 if cs.head_height is None else cs.head_height + 1
        while True:
            cs.append_block(height, payload(seed, height), sync=True)
            print(height, flush=True)
            if height % 7 == 6:
                cs.snapshot(height, b"state" + payload(seed + 1, height))
            height += 1
"""


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_sigkill_mid_write_loses_no_reported_block(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    reported: list[int] = []
    for _run in range(2):  # crash twice: the second writer resumes on a recovered log
        proc = _spawn(WRITER, str(tmp_path), str(seed))
        lines = LineReader(proc)
        try:
            for _ in range(rng.randint(5, 60)):
                line = lines.readline()
                assert line, proc.stderr.read() if proc.stderr else b""
                reported.append(int(line))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        reported += [int(line) for line in lines.rest()]  # acknowledged before the kill landed
        assert proc.returncode == -signal.SIGKILL
    with ChainStore.open(tmp_path) as cs:
        assert reported == sorted(set(reported))  # a block appended but not yet reported may precede a restart
        assert cs.head_height is not None and cs.head_height >= reported[-1]
        assert list(cs.blocks_from(0)) == [(h, payload(seed, h)) for h in range(cs.head_height + 1)]
        snap, blocks = cs.load()
        if snap is not None:  # None only if every kill landed before or inside the first snapshot write
            assert snap.height % 7 == 6 and snap.data == b"state" + payload(seed + 1, snap.height)
        start = 0 if snap is None else snap.height + 1
        assert [h for h, _ in blocks] == list(range(start, cs.head_height + 1))
        assert len(cs.snapshots.heights()) <= 2
        assert not any(p.name.endswith(".tmp") for p in cs.snapshots.directory.iterdir())  # crash leftovers cleaned
