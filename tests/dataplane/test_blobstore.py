"""Blob store on real files: atomic writes, verification, crash leftovers, quota and pins."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from p2pgpu.blobstore import (
    HEADER_SIZE,
    BlobNotFound,
    BlobPinned,
    BlobStore,
    BlobStoreError,
    BlobTooLarge,
    BlobTruncated,
    CorruptBlob,
    InvalidHash,
    QuotaExceeded,
)


def object_path(store: BlobStore, blob_hash: bytes) -> Path:
    h = blob_hash.hex()
    return store.root / "objects" / h[:2] / h[2:4] / h


def test_put_get_has_delete_round_trip(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(10_000)
    h = store.put(data)
    assert h == hashlib.sha256(data).digest()
    assert store.has(h) and store.size(h) == 10_000 and store.get(h) == data
    assert object_path(store, h).exists() and not any((tmp_path / "tmp").iterdir())
    assert store.put(data) == h and store.used_bytes == 10_000  # idempotent
    with store.open_read(h, offset=9_000) as reader:
        assert reader.size == 10_000 and b"".join(reader.chunks(300)) == data[9_000:]
    assert store.delete(h) and not store.has(h) and not store.delete(h)
    with pytest.raises(BlobNotFound, match=h.hex()):
        store.get(h)
    with pytest.raises(InvalidHash, match="32 bytes"):
        store.get(b"short")


def test_put_stream_checks_size_and_expected_hash_and_leaves_nothing_behind(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_blob_size=1000)
    assert store.put_stream([b"a" * 400, b"b" * 600]) == hashlib.sha256(b"a" * 400 + b"b" * 600).digest()
    with pytest.raises(BlobTooLarge, match="1000"):
        store.put_stream([b"a" * 600, b"b" * 600])
    with pytest.raises(CorruptBlob, match="expected"):
        store.put_stream([b"hello"], expected_hash=hashlib.sha256(b"other").digest())
    assert not store.has(hashlib.sha256(b"hello").digest())
    assert not any((tmp_path / "tmp").iterdir())
    assert len(store.hashes()) == 1


def test_a_write_interrupted_before_rename_leaves_only_a_temp_file_which_the_next_open_removes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def crashing_chunks():
        yield b"x" * 5000
        raise OSError("disk yanked")

    with pytest.raises(OSError, match="disk yanked"):
        store.put_stream(crashing_chunks())
    assert store.hashes() == []
    # a SIGKILL leaves the temp file itself; simulate one and reopen
    (tmp_path / "tmp" / "123-1-1").write_bytes(b"half a blob")
    reopened = BlobStore(tmp_path)
    assert reopened.stats.temp_cleaned == 1 and not any((tmp_path / "tmp").iterdir())


def test_flipped_byte_is_detected_on_read_and_quarantined(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(4096)
    h = store.put(data)
    path = object_path(store, h)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlob, match="quarantine"):
        store.get(h)
    assert not store.has(h) and not path.exists() and store.stats.quarantined == 1
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [f"{h.hex()}.0"]
    # streamed reads verify too (a fresh store has verified nothing yet)
    h2 = store.put(data[:1000])
    path2 = object_path(store, h2)
    raw2 = bytearray(path2.read_bytes())
    raw2[-1] ^= 1
    path2.write_bytes(bytes(raw2))
    with pytest.raises(CorruptBlob):
        BlobStore(tmp_path).open_read(h2)


def test_truncated_file_is_found_by_the_startup_scan_and_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    a = store.put(os.urandom(3000))
    b = store.put(os.urandom(3000))
    for h in (a, b):
        path = object_path(store, h)
        path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(BlobTruncated, match="truncated"):
        store.get(a)
    assert not store.has(a) and not object_path(store, a).exists()
    assert store.stats.truncated_removed == 1
    reopened = BlobStore(tmp_path)
    assert reopened.stats.truncated_removed == 1 and reopened.hashes() == [] and reopened.used_bytes == 0
    # a file cut inside its header is truncated too
    c = reopened.put(b"tiny")
    object_path(reopened, c).write_bytes(b"P2G")
    assert BlobStore(tmp_path).hashes() == []


def test_quota_evicts_least_recently_used_unpinned_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    a, b, c = (store.put(bytes([i]) * 1000) for i in range(3))
    store.pin(a)
    store.get(b)  # b is now more recent than c
    d = store.put(b"d" * 1000)
    assert store.has(a) and store.has(b) and not store.has(c) and store.has(d)
    assert store.stats.evicted == 1 and store.used_bytes == 3000
    store.pin(b)
    store.pin(d)
    with pytest.raises(QuotaExceeded, match="pinned blobs hold 3000 bytes"):
        store.put(b"e" * 10)
    assert {store.has(h) for h in (a, b, d)} == {True}, "a refused put evicts nothing"
    with pytest.raises(BlobPinned):
        store.delete(a)
    store.unpin(a)
    assert store.put(b"e" * 10) and not store.has(a)
    with pytest.raises(BlobStoreError, match="not pinned"):
        store.unpin(a)


def test_recency_survives_a_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=2000)
    a = store.put(b"a" * 1000)
    b = store.put(b"b" * 1000)
    os.utime(object_path(store, a), (1, 1))
    os.utime(object_path(store, b), (2, 2))
    reopened = BlobStore(tmp_path, quota_bytes=2000)
    assert reopened.hashes() == [a, b]
    reopened.get(a)
    assert reopened.hashes() == [b, a]
    reopened.put(b"c" * 1000)
    assert reopened.has(a) and not reopened.has(b)


def test_partial_download_resumes_and_commits_only_the_right_bytes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(50_000)
    h = hashlib.sha256(data).digest()
    part = store.partial(h)
    part.append(data[:20_000])
    part.flush()
    part.close()
    store = BlobStore(tmp_path)  # a restart in between keeps the partial file
    again = store.partial(h)
    assert again.offset == 20_000
    again.append(data[20_000:])
    assert again.commit() and store.get(h) == data
    assert not any((tmp_path / "partial").iterdir())
    wrong = store.partial(hashlib.sha256(b"other").digest())
    wrong.append(b"not it")
    assert not wrong.commit() and not wrong.path.exists()
