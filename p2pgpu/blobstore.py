"""Content-addressed blob store on disk: sealed task inputs and results (and public specs) by SHA-256.

The store knows nothing of sealing: a sealed body is a blob like any other,
and :mod:`p2pgpu.sealedstore` keeps what is needed to open it.

Layout under ``root``::

    objects/ab/cd/abcd…(64 hex)   one blob per file (two-level fan-out keeps directories small)
    tmp/                          files being written; anything here after a crash is garbage
    partial/<hex>.part            downloads in progress, kept across retries and restarts (resume)
    quarantine/<hex>.<n>          files that failed verification, kept for inspection, never served

Every file starts with a 13-byte header ``"P2GB" | version u8 | length u64``
followed by the payload. The header is what makes a crash detectable
cheaply: writes go to ``tmp/`` (header with the final length patched in
last, fsync, rename, fsync of the directory), but a file system that loses
data after a rename can still leave a short file behind; its size then
disagrees with its header, so the startup scan and every read find it
without hashing anything. A full SHA-256 check runs on every read (once per
process for streamed reads), and a file whose bytes do not hash to its name
is moved to ``quarantine/`` and reported as :class:`CorruptBlob`.

Space: a blob over ``max_blob_size`` is refused while it streams in; the
store keeps ``quota_bytes`` by evicting least-recently-used blobs that are
not pinned. Pins are reference counts held in memory: the node pins the
blobs of its active tasks (from the ledger) when it starts and as tasks are
assigned, so a blob stays while any task needs it. Recency survives restarts
through file mtimes, touched on each read.

I/O is synchronous and thread-safe (one lock guards the index; file writes
happen outside it), so async callers can hand big operations to
``trio.to_thread``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

from ledger.store import sync_dir

__all__ = [
    "BlobNotFound",
    "BlobPinned",
    "BlobReader",
    "BlobStore",
    "BlobStoreError",
    "BlobStoreStats",
    "BlobTooLarge",
    "BlobTruncated",
    "CorruptBlob",
    "HASH_SIZE",
    "InvalidHash",
    "PartialBlob",
    "QuotaExceeded",
]

HASH_SIZE: Final = 32
_MAGIC: Final = b"P2GB"
_VERSION: Final = 1
_HEADER = struct.Struct(">4sBQ")
HEADER_SIZE: Final = _HEADER.size
_UNKNOWN_LENGTH: Final = 2**64 - 1
_READ_SIZE: Final = 1 << 20


class BlobStoreError(Exception):
    """Base of every blob store failure."""


class InvalidHash(BlobStoreError, ValueError):
    """Not a 32-byte SHA-256 digest."""


class BlobNotFound(BlobStoreError, KeyError):
    """No blob with this hash is stored."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CorruptBlob(BlobStoreError):
    """The stored bytes do not hash to the blob's name; the file was quarantined."""


class BlobTruncated(BlobNotFound):
    """The blob's file was shorter than its header says (a crash); it was removed, so the blob is gone."""


class BlobTooLarge(BlobStoreError):
    """A blob over the store's ``max_blob_size`` (nothing was stored)."""


class QuotaExceeded(BlobStoreError):
    """No room even after evicting every unpinned blob (nothing was stored or evicted)."""


class BlobPinned(BlobStoreError):
    """A pinned blob cannot be deleted: an active task still needs it."""


@dataclass(slots=True)
class BlobStoreStats:
    evicted: int = 0
    quarantined: int = 0
    truncated_removed: int = 0
    temp_cleaned: int = 0
    puts: int = 0
    reads: int = 0


def _hex(blob_hash: bytes) -> str:
    if type(blob_hash) is not bytes or len(blob_hash) != HASH_SIZE:
        got = f"{len(blob_hash)} bytes" if isinstance(blob_hash, bytes) else type(blob_hash).__name__
        raise InvalidHash(f"a blob hash is {HASH_SIZE} bytes of SHA-256, got {got}")
    return blob_hash.hex()


def _read_header(f: BinaryIO) -> tuple[bytes, int, int] | None:
    raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        return None
    return _HEADER.unpack(raw)


class BlobReader:
    """A verified blob opened for streaming: ``read(n)`` from an offset, ``size`` known up front."""

    def __init__(self, f: BinaryIO, blob_hash: bytes, size: int, offset: int) -> None:
        self._f = f
        self.blob_hash = blob_hash
        self.size = size
        self.position = offset
        f.seek(HEADER_SIZE + offset)

    def read(self, n: int = -1) -> bytes:
        remaining = self.size - self.position
        want = remaining if n < 0 else min(n, remaining)
        data = self._f.read(want)
        if len(data) != want:
            got = self.position + len(data)
            raise CorruptBlob(f"blob {self.blob_hash.hex()} shrank to {got} bytes while being read")
        self.position += len(data)
        return data

    def chunks(self, size: int = _READ_SIZE) -> Iterator[bytes]:
        while self.position < self.size:
            yield self.read(size)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PartialBlob:
    """A download in progress, persisted so a retry (or a restart) resumes at :attr:`offset`.

    ``append`` data as it arrives; ``commit`` checks the SHA-256 and moves the
    blob into the store; ``discard`` throws the bytes away (e.g. after a hash
    mismatch, when nobody can tell which byte was wrong).
    """

    def __init__(self, store: BlobStore, blob_hash: bytes, path: Path) -> None:
        self._store = store
        self.blob_hash = blob_hash
        self.path = path
        fresh = not path.exists()
        self._f: BinaryIO = open(path, "r+b" if not fresh else "w+b")  # noqa: SIM115 - owned by this object
        if fresh or _read_header(self._f) != (_MAGIC, _VERSION, _UNKNOWN_LENGTH):
            self._f.seek(0)
            self._f.truncate()
            self._f.write(_HEADER.pack(_MAGIC, _VERSION, _UNKNOWN_LENGTH))
        self._f.seek(0, os.SEEK_END)
        self.offset = self._f.tell() - HEADER_SIZE

    def append(self, data: bytes) -> None:
        if self.offset + len(data) > self._store.max_blob_size:
            raise BlobTooLarge(
                f"blob {self.blob_hash.hex()} grows past the store's limit of {self._store.max_blob_size} bytes"
            )
        self._f.write(data)
        self.offset += len(data)

    def flush(self) -> None:
        """Make what arrived so far durable (call before giving up on a peer)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def commit(self) -> bool:
        """Verify and store; True if the bytes hash to :attr:`blob_hash`, else the bytes are discarded."""
        self._f.flush()
        self._f.seek(HEADER_SIZE)
        digest = hashlib.sha256()
        while chunk := self._f.read(_READ_SIZE):
            digest.update(chunk)
        if digest.digest() != self.blob_hash:
            self.discard()
            return False
        self._f.seek(0)
        self._f.write(_HEADER.pack(_MAGIC, _VERSION, self.offset))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._store._install(self.path, self.blob_hash, self.offset)
        return True

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)
        self.offset = 0

    def close(self) -> None:
        """Keep the bytes for a later resume."""
        if not self._f.closed:
            self._f.flush()
            self._f.close()


@dataclass(slots=True)
class _Index:
    sizes: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    """Stored blobs, least recently used first."""
    used: int = 0


class BlobStore:
    """Blobs named by their SHA-256 under ``root``. See the module docstring for layout and guarantees."""

    def __init__(
        self, root: str | os.PathLike[str], *, max_blob_size: int = 1 << 30, quota_bytes: int = 20 << 30
    ) -> None:
        if max_blob_size < 1 or quota_bytes < 1:
            raise ValueError("max_blob_size and quota_bytes must be >= 1")
        self.root = Path(root)
        self.max_blob_size = max_blob_size
        self.quota_bytes = quota_bytes
        self.stats = BlobStoreStats()
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._partial = self.root / "partial"
        self._quarantine = self.root / "quarantine"
        for d in (self._objects, self._tmp, self._partial, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index = _Index()
        self._pins: Counter[bytes] = Counter()
        self._verified: set[bytes] = set()
        self._tmp_counter = 0
        self._scan()

    # -- startup ----------------------------------------------------------------

    def _scan(self) -> None:
        """Drop crash leftovers (temp files, truncated objects) and rebuild the LRU index from mtimes."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
            self.stats.temp_cleaned += 1
        found: list[tuple[float, bytes, int]] = []
        for path in self._objects.glob("*/*/*"):
            try:
                blob_hash = bytes.fromhex(path.name)
            except ValueError:
                blob_hash = b""
            fanned_out = path.parent.name == path.name[2:4] and path.parent.parent.name == path.name[:2]
            if len(blob_hash) != HASH_SIZE or not fanned_out:
                self._move_to_quarantine(path, path.name)
                continue
            size = self._check_file(path, blob_hash)
            if size is not None:
                found.append((path.stat().st_mtime, blob_hash, size))
        for _, blob_hash, size in sorted(found):
            self._index.sizes[blob_hash] = size
            self._index.used += size

    def _check_file(self, path: Path, blob_hash: bytes) -> int | None:
        """The payload size if the file is whole; removes truncated and quarantines malformed files.

        Raises :class:`BlobTruncated` / :class:`CorruptBlob` instead of returning None when
        called for a read (``for_read``); the startup scan just drops the file.
        """
        return self._inspect(path, blob_hash, for_read=False)

    def _inspect(self, path: Path, blob_hash: bytes, *, for_read: bool) -> int | None:
        with open(path, "rb") as f:
            header = _read_header(f)
            actual = os.fstat(f.fileno()).st_size - HEADER_SIZE
        magic, version, length = header if header is not None else (_MAGIC, _VERSION, actual + 1)
        if actual < length:
            self._remove_truncated(path)
            if for_read:
                raise BlobTruncated(f"blob {blob_hash.hex()} was truncated on disk (a crash?) and was removed")
            return None
        if magic != _MAGIC or version != _VERSION or actual > length:
            self._move_to_quarantine(path, blob_hash.hex())
            if for_read:
                raise CorruptBlob(f"blob {blob_hash.hex()} has a malformed file header; moved to quarantine")
            return None
        return length

    def _remove_truncated(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.stats.truncated_removed += 1

    def _move_to_quarantine(self, path: Path, name: str) -> None:
        n = 0
        while (target := self._quarantine / f"{name}.{n}").exists():
            n += 1
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        self.stats.quarantined += 1

    # -- paths --------------------------------------------------------------------

    def _path(self, blob_hash: bytes) -> Path:
        h = _hex(blob_hash)
        return self._objects / h[:2] / h[2:4] / h

    def _new_tmp(self) -> Path:
        with self._lock:
            self._tmp_counter += 1
            return self._tmp / f"{os.getpid()}-{threading.get_ident()}-{self._tmp_counter}"

    # -- queries ------------------------------------------------------------------

    def has(self, blob_hash: bytes) -> bool:
        _hex(blob_hash)
        with self._lock:
            return blob_hash in self._index.sizes

    def size(self, blob_hash: bytes) -> int:
        _hex(blob_hash)
        with self._lock:
            try:
                return self._index.sizes[blob_hash]
            except KeyError:
                raise BlobNotFound(f"blob {blob_hash.hex()} is not stored") from None

    @property
    def used_bytes(self) -> int:
        return self._index.used

    def hashes(self) -> list[bytes]:
        """Stored blobs, least recently used first."""
        with self._lock:
            return list(self._index.sizes)

    # -- writing ------------------------------------------------------------------

    def put(self, data: bytes) -> bytes:
        """Store ``data``; returns its SHA-256 (the blob's name)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
        return self.put_stream([bytes(data)])

    def put_stream(self, chunks: Iterable[bytes], *, expected_hash: bytes | None = None) -> bytes:
        """Store the concatenation of ``chunks`` without holding it in memory.

        With ``expected_hash``, bytes that hash to anything else are discarded
        and :class:`CorruptBlob` is raised.
        """
        if expected_hash is not None:
            _hex(expected_hash)
        tmp = self._new_tmp()
        try:
            digest = hashlib.sha256()
            length = 0
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, _VERSION, _UNKNOWN_LENGTH))
                for chunk in chunks:
                    length += len(chunk)
                    if length > self.max_blob_size:
                        raise BlobTooLarge(f"blob exceeds the store's limit of {self.max_blob_size} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.seek(0)
                f.write(_HEADER.pack(_MAGIC, _VERSION, length))
                f.flush()
                os.fsync(f.fileno())
            blob_hash = digest.digest()
            if expected_hash is not None and blob_hash != expected_hash:
                raise CorruptBlob(f"bytes hash to {blob_hash.hex()}, not the expected {expected_hash.hex()}")
            self._install(tmp, blob_hash, length)
            return blob_hash
        finally:
            tmp.unlink(missing_ok=True)

    def _install(self, src: Path, blob_hash: bytes, length: int) -> None:
        """Move a complete, fsynced file into ``objects/``, evicting LRU blobs to stay under quota."""
        if length > self.max_blob_size:
            src.unlink(missing_ok=True)
            raise BlobTooLarge(f"blob {blob_hash.hex()} of {length} bytes exceeds the limit of {self.max_blob_size}")
        target = self._path(blob_hash)
        with self._lock:
            if blob_hash in self._index.sizes:
                src.unlink(missing_ok=True)
                self._index.sizes.move_to_end(blob_hash)
                return
            self._make_room(length, blob_hash)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
            sync_dir(target.parent)
            self._index.sizes[blob_hash] = length
            self._index.used += length
            self._verified.add(blob_hash)
            self.stats.puts += 1

    def _make_room(self, need: int, incoming: bytes) -> None:
        index = self._index
        if index.used + need <= self.quota_bytes:
            return
        evictable = [h for h in index.sizes if self._pins[h] == 0]
        freeable = sum(index.sizes[h] for h in evictable)
        if index.used - freeable + need > self.quota_bytes:
            pinned = index.used - freeable
            raise QuotaExceeded(
                f"blob {incoming.hex()} of {need} bytes does not fit the quota of {self.quota_bytes} bytes: "
                f"pinned blobs hold {pinned} bytes"
            )
        for h in evictable:
            if index.used + need <= self.quota_bytes:
                break
            self._path(h).unlink(missing_ok=True)
            index.used -= index.sizes.pop(h)
            self._verified.discard(h)
            self.stats.evicted += 1

    def partial(self, blob_hash: bytes) -> PartialBlob:
        """The resumable download of ``blob_hash`` (created empty, or continued from a previous attempt)."""
        return PartialBlob(self, blob_hash, self._partial / f"{_hex(blob_hash)}.part")

    # -- reading ------------------------------------------------------------------

    def get(self, blob_hash: bytes) -> bytes:
        """The blob's bytes, verified against its hash."""
        path = self._open_checked(blob_hash)
        with open(path, "rb") as f:
            f.seek(HEADER_SIZE)
            data = f.read()
        if hashlib.sha256(data).digest() != blob_hash:
            self._quarantine_blob(blob_hash, path)
        with self._lock:
            self._verified.add(blob_hash)
        return data

    def open_read(self, blob_hash: bytes, offset: int = 0) -> BlobReader:
        """A reader from ``offset``; the whole file is hashed first (once per process per blob)."""
        path = self._open_checked(blob_hash)
        size = self.size(blob_hash)
        if not 0 <= offset <= size:
            raise ValueError(f"offset {offset} is outside blob {blob_hash.hex()} of {size} bytes")
        with self._lock:
            verified = blob_hash in self._verified
        if not verified:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                f.seek(HEADER_SIZE)
                while chunk := f.read(_READ_SIZE):
                    digest.update(chunk)
            if digest.digest() != blob_hash:
                self._quarantine_blob(blob_hash, path)
            with self._lock:
                self._verified.add(blob_hash)
        return BlobReader(open(path, "rb"), blob_hash, size, offset)  # noqa: SIM115 - the reader owns it

    def _open_checked(self, blob_hash: bytes) -> Path:
        """Path of a stored blob whose file is whole; touches it for LRU."""
        path = self._path(blob_hash)
        with self._lock:
            known = blob_hash in self._index.sizes
        if not known:
            raise BlobNotFound(f"blob {blob_hash.hex()} is not stored")
        try:
            self._inspect(path, blob_hash, for_read=True)
        except FileNotFoundError:
            self._forget(blob_hash)
            raise BlobNotFound(f"blob {blob_hash.hex()} vanished from disk") from None
        except (BlobTruncated, CorruptBlob):
            self._forget(blob_hash)
            raise
        with self._lock:
            if blob_hash in self._index.sizes:
                self._index.sizes.move_to_end(blob_hash)
            self.stats.reads += 1
        os.utime(path)
        return path

    def _quarantine_blob(self, blob_hash: bytes, path: Path) -> None:
        self._move_to_quarantine(path, blob_hash.hex())
        self._forget(blob_hash)
        raise CorruptBlob(f"blob {blob_hash.hex()} does not match its hash on disk; moved to quarantine")

    def _forget(self, blob_hash: bytes) -> None:
        with self._lock:
            size = self._index.sizes.pop(blob_hash, None)
            if size is not None:
                self._index.used -= size
            self._verified.discard(blob_hash)

    # -- pins and deletion ----------------------------------------------------------

    def pin(self, blob_hash: bytes) -> None:
        """Keep ``blob_hash`` from eviction (reference counted; the blob need not be stored yet)."""
        _hex(blob_hash)
        with self._lock:
            self._pins[blob_hash] += 1

    def unpin(self, blob_hash: bytes) -> None:
        _hex(blob_hash)
        with self._lock:
            if self._pins[blob_hash] <= 0:
                raise BlobStoreError(f"blob {blob_hash.hex()} is not pinned")
            self._pins[blob_hash] -= 1
            if self._pins[blob_hash] == 0:
                del self._pins[blob_hash]

    def is_pinned(self, blob_hash: bytes) -> bool:
        _hex(blob_hash)
        with self._lock:
            return self._pins[blob_hash] > 0

    def delete(self, blob_hash: bytes) -> bool:
        """Remove a blob; False if it was not stored. A pinned blob raises :class:`BlobPinned`."""
        if self.is_pinned(blob_hash):
            raise BlobPinned(f"blob {blob_hash.hex()} is pinned by {self._pins[blob_hash]} task(s)")
        with self._lock:
            size = self._index.sizes.pop(blob_hash, None)
            if size is None:
                return False
            self._index.used -= size
            self._verified.discard(blob_hash)
            self._path(blob_hash).unlink(missing_ok=True)
        return True
