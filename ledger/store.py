"""Crash-safe storage for the ledger: the only module in ``ledger`` that does I/O.

A node must lose nothing that was final when it is killed, and must come back
up on its own from whatever a crash left on disk. The store gives three
guarantees and is generic over opaque records (the chain module encodes blocks
and state; this module never looks inside them):

* **Durable appends.** ``append`` returns only after the record is written and,
  with ``sync=True``, flushed to stable storage. A record whose append returned
  is found again after any crash.
* **Self-repairing open.** Recovery scans the log and stops at the first frame
  that is torn (cut short by the end of the file), damaged (a checksum fails)
  or rejected by the owner's check (for :class:`ChainStore`: heights must be
  contiguous). The file is truncated there and fsynced. Recovery never goes
  past a bad frame, even if good-looking frames follow: the chain above a lost
  block cannot be replayed without it, and the node re-syncs the rest from
  peers. Bytes that might still be data (anything except a torn tail, which is
  an append that never returned) are first copied to a quarantine file
  ``<log>.dropped-<offset>``, so nothing is destroyed for the sake of repair.
* **Atomic snapshots.** A snapshot is written to a temporary file in the same
  directory, fsynced, renamed into place and the directory fsynced, so a crash
  leaves either the old set or the new one. Each snapshot carries its height
  and a checksum; a damaged one is skipped in favour of an older one.

``open`` raises only when a file is not ours or not usable (wrong magic, newer
format, another process owns the data dir, or an intact frame longer than the
configured record limit, i.e. written under a larger limit); it never
truncates a file it cannot identify as its own.

On-disk formats (all integers big-endian)::

    log file     header  = magic "P2PGLOG\\0" | version u16 | flags u16 | crc32(previous 12 bytes) u32
                 frame   = length u32 | crc32(record) u32 | crc32(length | record crc) u32 | record
    snapshot     header  = magic "P2PGSNP\\0" | version u16 | flags u16 | height u64 | length u64
                           | crc32(previous 28 bytes | data) u32
                 then data (exactly ``length`` bytes)

The frame header has its own checksum so a damaged length field is caught
before it is used: a flipped bit can never make recovery read (or allocate) a
bogus length. Lengths are also bounded by a configured limit and by the bytes
left in the file before anything is read.

:class:`ChainStore` frames each log record as ``height u64 | payload``; the
height in the record lets recovery prove the log is contiguous without knowing
the payload format.

Exception tree (every message names the file and what is wrong)::

    StoreError
    ├── NotAStoreFile          a file that is not one of ours (short, wrong magic, damaged header)
    │   └── UnsupportedVersion ours, but a format version or flags this code does not know
    ├── StoreLocked            another process owns the data dir / log
    ├── RecordTooLarge         a record or snapshot over the configured limit (also ValueError);
    │                          on open: an intact stored frame over the limit (raise the limit to read it)
    ├── HeightError            a height the chain store cannot take or does not hold (also ValueError)
    │   ├── HeightGap          append skips heights
    │   ├── HeightRepeat       append repeats a stored height
    │   └── HeightOutOfRange   read or snapshot outside the stored range
    ├── CorruptRecord          a stored record fails its checksum on read (damage after open)
    ├── CorruptSnapshot        a snapshot file is damaged (skipped by ``latest_snapshot``)
    ├── StoreIOError           the OS failed a write or fsync; the handle refuses further writes
    └── StoreClosed            the handle was closed

Not thread-safe: one owner calls it at a time (the Trio node may call it from a
worker thread with ``trio.to_thread.run_sync``, one call at a time).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import re
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "BlockLog",
    "ChainStore",
    "CorruptRecord",
    "CorruptSnapshot",
    "Damage",
    "HeightError",
    "HeightGap",
    "HeightOutOfRange",
    "HeightRepeat",
    "Loaded",
    "NotAStoreFile",
    "RecordCheck",
    "RecordTooLarge",
    "RecoveryReport",
    "Snapshot",
    "SnapshotStore",
    "StoreClosed",
    "StoreConfig",
    "StoreError",
    "StoreIOError",
    "StoreLocked",
    "UnsupportedVersion",
    "sync_dir",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOG_MAGIC = b"P2PGLOG\x00"
SNAPSHOT_MAGIC = b"P2PGSNP\x00"

MiB = 1 << 20
DEFAULT_MAX_RECORD_BYTES = 64 * MiB
DEFAULT_MAX_SNAPSHOT_BYTES = 1024 * MiB
DEFAULT_KEEP_SNAPSHOTS = 3
MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1

_LOG_HEADER = struct.Struct(">8sHHI")  # magic, version, flags, crc32 of the first 12 bytes
_FRAME = struct.Struct(">III")  # length, crc32(record), crc32(first 8 bytes)
_FRAME_HEAD = struct.Struct(">II")  # the part of the frame covered by its header checksum
_HEIGHT = struct.Struct(">Q")
_SNAP_HEADER = struct.Struct(">8sHHQQI")  # magic, version, flags, height, length, crc32
_SNAP_HEAD = struct.Struct(">8sHHQQ")  # the part of the snapshot header covered by its checksum

_LIMIT_HINT = "it was written under a larger limit; open with that limit to read it"
_SCAN_BUFFER = 1 * MiB
_COPY_CHUNK = 1 * MiB


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class StoreError(Exception):
    """Base of every error raised by the store."""


class NotAStoreFile(StoreError):
    """A file at one of our paths that we did not write; we refuse to touch it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: not a p2pgpu store file: {reason}")


class UnsupportedVersion(NotAStoreFile):
    """Our magic, but a format this code cannot read (written by a newer node)."""


class StoreLocked(StoreError):
    """Another process owns the data dir; a second owner would corrupt it."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        super().__init__(f"{path}: locked by another process ({holder}); is a node already running on this data dir?")


class RecordTooLarge(StoreError, ValueError):
    """A record or snapshot over the configured size limit."""

    def __init__(self, path: Path, size: int, limit: int, what: str = "record", hint: str = "") -> None:
        self.path = path
        self.size = size
        self.limit = limit
        self.what = what
        self.hint = hint
        text = f"{path}: {what} of {size} bytes exceeds the limit of {limit} bytes"
        super().__init__(f"{text}; {hint}" if hint else text)


class HeightError(StoreError, ValueError):
    """A height the chain store cannot accept or does not hold."""


class HeightGap(HeightError):
    """An append that would skip heights."""


class HeightRepeat(HeightError):
    """An append of a height that is already stored."""


class HeightOutOfRange(HeightError):
    """A read or snapshot at a height outside the stored range."""


class CorruptRecord(StoreError):
    """A record that passed recovery but fails its checksum now: the disk changed under us."""

    def __init__(self, path: Path, index: int, offset: int | None, reason: str) -> None:
        self.path = path
        self.index = index
        self.offset = offset
        where = f"record {index}" if offset is None else f"record {index} at offset {offset}"
        super().__init__(f"{path}: {where} is damaged: {reason}; reopen the store to repair")


class CorruptSnapshot(StoreError):
    """A damaged snapshot file; ``latest_snapshot`` skips it and falls back."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: damaged snapshot: {reason}")


class StoreIOError(StoreError):
    """The OS failed a write or fsync.

    After a failed fsync the kernel may have dropped the dirty pages, so a
    retry can report success for data that never reached the disk. The handle
    therefore refuses further writes; reopening re-reads the file and repairs it.
    """

    def __init__(self, path: Path, action: str, cause: OSError) -> None:
        self.path = path
        super().__init__(f"{path}: {action} failed: {cause.strerror or cause}")


class StoreClosed(StoreError):
    """Use of a closed store handle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path}: store is closed")


# --------------------------------------------------------------------------
# Small OS helpers
# --------------------------------------------------------------------------


def _sync_fd(fd: int) -> None:
    """Flush a file's data to stable storage (not just to the drive's cache on macOS)."""
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass  # not supported by this filesystem: fall through to fsync
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)  # also flushes the file size, which is all an append changes
    else:
        os.fsync(fd)


def sync_dir(directory: Path) -> None:
    """Make renames, creations and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_bytes(value: object, what: str) -> bytes:
    """Accept bytes-like values only: ``bytes(5)`` would silently store five zero bytes."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset``; fewer only at end of file."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _lock_fd(fd: int, path: Path) -> None:
    """Take an exclusive, non-blocking flock; say who holds it if we cannot."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise StoreLocked(path, _lock_holder(path)) from exc


def _lock_holder(path: Path) -> str:
    if path.name != ChainStore.LOCK_NAME:
        return "flock held"
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _create_atomically(path: Path, content: bytes) -> None:
    """Create ``path`` holding ``content`` so that it never exists half-written."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, content, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


# --------------------------------------------------------------------------
# Recovery report
# --------------------------------------------------------------------------


class Damage(enum.Enum):
    """Why recovery stopped. Torn kinds are appends that never returned."""

    TORN_HEADER = "frame header cut short by the end of the file"
    TORN_RECORD = "record cut short by the end of the file"
    BAD_HEADER = "frame header checksum mismatch"
    BAD_CHECKSUM = "record checksum mismatch"
    REJECTED = "record rejected by the owner's check"

    @property
    def torn(self) -> bool:
        return self in (Damage.TORN_HEADER, Damage.TORN_RECORD)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening a log found and did. ``damage`` is None for a clean log."""

    path: Path
    records_kept: int
    bytes_kept: int
    bytes_truncated: int = 0
    damage: Damage | None = None
    detail: str = ""
    quarantined: Path | None = None

    @property
    def clean(self) -> bool:
        return self.damage is None

    def __str__(self) -> str:
        if self.damage is None:
            return f"{self.path}: clean, {self.records_kept} records"
        text = (
            f"{self.path}: kept {self.records_kept} records ({self.bytes_kept} bytes), "
            f"truncated {self.bytes_truncated} bytes at offset {self.bytes_kept}: {self.damage.value}"
        )
        if self.detail:
            text += f" ({self.detail})"
        if self.quarantined is not None:
            text += f"; dropped bytes saved to {self.quarantined}"
        return text


RecordCheck = Callable[[int, bytes], "str | None"]
"""``check(index, record)`` → None if acceptable, else why not (recovery stops there)."""


# --------------------------------------------------------------------------
# The block log
# --------------------------------------------------------------------------


def _encode_log_header() -> bytes:
    head = LOG_MAGIC + struct.pack(">HH", FORMAT_VERSION, 0)
    return head + struct.pack(">I", zlib.crc32(head))


def _check_log_header(path: Path, raw: bytes) -> None:
    if len(raw) < _LOG_HEADER.size:
        raise NotAStoreFile(path, f"{len(raw)} bytes, shorter than the {_LOG_HEADER.size}-byte log header")
    magic, version, flags, crc = _LOG_HEADER.unpack_from(raw)
    if magic != LOG_MAGIC:
        raise NotAStoreFile(path, f"magic {magic!r} is not {LOG_MAGIC!r}")
    if zlib.crc32(raw[: _LOG_HEADER.size - 4]) != crc:
        raise NotAStoreFile(path, "log header checksum mismatch (header damaged)")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(path, f"log format version {version}, this code reads version {FORMAT_VERSION}")
    if flags != 0:
        raise UnsupportedVersion(path, f"unknown log header flags {flags:#06x}")


def _encode_frame(record: bytes) -> bytes:
    record_crc = zlib.crc32(record)
    head = _FRAME_HEAD.pack(len(record), record_crc)
    return head + struct.pack(">I", zlib.crc32(head)) + record


class BlockLog:
    """Append-only file of checksummed, length-prefixed records.

    Records are addressed by index (0, 1, ...). An in-memory index of frame
    offsets (8 bytes per record) makes every read a single ``pread``.
    Open with :meth:`open`; it recovers the file before returning.
    """

    def __init__(self, path: Path, fd: int, offsets: array[int], end: int, max_record_bytes: int, recovery: RecoveryReport):
        self.path = path
        self.max_record_bytes = max_record_bytes
        self.recovery = recovery
        self._fd: int | None = fd
        self._offsets = offsets
        self._end = end
        self._failed: StoreIOError | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        check: RecordCheck | None = None,
    ) -> BlockLog:
        """Open (creating if absent) and recover the log at ``path``.

        Takes an exclusive flock on the file for as long as it is open.
        """
        path = Path(path)
        if not 0 <= max_record_bytes <= MAX_U32:
            raise ValueError(f"max_record_bytes must be in [0, 2**32), got {max_record_bytes}")
        if not path.exists():
            _create_atomically(path, _encode_log_header())
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _lock_fd(fd, path)
            _check_log_header(path, _read_exact(fd, _LOG_HEADER.size, 0))
            offsets, end, damage, detail = _scan(path, fd, max_record_bytes, check)
            size = os.fstat(fd).st_size
            quarantined = None
            if size > end:
                if damage is not None and not damage.torn:
                    quarantined = _quarantine(path, fd, end, size)
                os.ftruncate(fd, end)
                _sync_fd(fd)
            report = RecoveryReport(path, len(offsets), end, size - end, damage, detail, quarantined)
            if damage is not None:
                log.warning("recovered %s", report)
            return cls(path, fd, offsets, end, max_record_bytes, report)
        except BaseException:
            os.close(fd)
            raise

    # -- reading ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets)

    @property
    def size_bytes(self) -> int:
        return self._end

    def read(self, index: int) -> bytes:
        """The record at ``index``, re-verified against its checksums."""
        fd = self._live_fd()
        if not 0 <= index < len(self._offsets):
            raise IndexError(f"{self.path}: record index {index} out of range [0, {len(self._offsets)})")
        offset = self._offsets[index]
        stop = self._offsets[index + 1] if index + 1 < len(self._offsets) else self._end
        raw = _read_exact(fd, stop - offset, offset)
        if len(raw) != stop - offset:
            raise CorruptRecord(self.path, index, offset, f"file ends {stop - offset - len(raw)} bytes early")
        length, record_crc, head_crc = _FRAME.unpack_from(raw)
        if zlib.crc32(raw[: _FRAME_HEAD.size]) != head_crc or length != len(raw) - _FRAME.size:
            raise CorruptRecord(self.path, index, offset, "frame header changed")
        record = raw[_FRAME.size :]
        if zlib.crc32(record) != record_crc:
            raise CorruptRecord(self.path, index, offset, "record checksum mismatch")
        return record

    def records_from(self, index: int = 0) -> Iterator[bytes]:
        """Records ``index``, ``index+1``, ... up to the last one present when called."""
        stop = len(self._offsets)
        for i in range(max(index, 0), stop):
            yield self.read(i)

    # -- writing ------------------------------------------------------------

    def append(self, record: bytes, *, sync: bool = True) -> int:
        """Append ``record`` and return its index.

        With ``sync`` (a final block) the record is on stable storage when this
        returns. Without it, a later ``sync()`` or synced append flushes it.
        """
        fd = self._writable_fd()
        record = _as_bytes(record, "record")
        if len(record) > self.max_record_bytes:
            raise RecordTooLarge(self.path, len(record), self.max_record_bytes)
        frame = _encode_frame(record)
        try:
            _write_all(fd, frame, self._end)
            if sync:
                _sync_fd(fd)
        except OSError as exc:
            raise self._fail("append", exc) from exc
        self._offsets.append(self._end)
        self._end += len(frame)
        return len(self._offsets) - 1

    def sync(self) -> None:
        """Flush every appended record to stable storage."""
        fd = self._writable_fd()
        try:
            _sync_fd(fd)
        except OSError as exc:
            raise self._fail("fsync", exc) from exc

    def close(self) -> None:
        """Release the file and its lock. Unsynced appends stay in the OS cache."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> BlockLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _live_fd(self) -> int:
        if self._fd is None:
            raise StoreClosed(self.path)
        return self._fd

    def _writable_fd(self) -> int:
        fd = self._live_fd()
        if self._failed is not None:
            raise self._failed
        return fd

    def _fail(self, action: str, exc: OSError) -> StoreIOError:
        """Poison the handle after an OS failure and cut off any partial frame."""
        error = StoreIOError(self.path, action, exc)
        self._failed = error
        try:
            os.ftruncate(self._live_fd(), self._end)
        except OSError as trunc_exc:
            log.error("%s: could not cut off a failed append (%s); the next open will repair it", self.path, trunc_exc)
        return error


def _scan(
    path: Path, fd: int, max_record_bytes: int, check: RecordCheck | None
) -> tuple[array[int], int, Damage | None, str]:
    """Walk the frames; return their offsets, the end of the last good one and why we stopped."""
    offsets = array("Q")
    size = os.fstat(fd).st_size
    pos = _LOG_HEADER.size
    with open(path, "rb", buffering=_SCAN_BUFFER) as f:
        f.seek(pos)
        while pos < size:
            left = size - pos
            if left < _FRAME.size:
                return offsets, pos, Damage.TORN_HEADER, f"{left} of {_FRAME.size} header bytes present"
            head = f.read(_FRAME.size)
            length, record_crc, head_crc = _FRAME.unpack(head)
            if zlib.crc32(head[: _FRAME_HEAD.size]) != head_crc:
                return offsets, pos, Damage.BAD_HEADER, f"frame at offset {pos}"
            if length > max_record_bytes:
                # The header checksum holds, so this is no bit flip: the record was written under a
                # larger limit. Dropping it could drop final blocks; make the operator decide.
                where = f"stored record {len(offsets)} at offset {pos}"
                raise RecordTooLarge(path, length, max_record_bytes, where, _LIMIT_HINT)
            if length > left - _FRAME.size:
                return offsets, pos, Damage.TORN_RECORD, f"{left - _FRAME.size} of {length} record bytes present"
            record = f.read(length)
            if len(record) != length:  # the file shrank under us; treat like a tear
                return offsets, pos, Damage.TORN_RECORD, f"{len(record)} of {length} record bytes readable"
            if zlib.crc32(record) != record_crc:
                return offsets, pos, Damage.BAD_CHECKSUM, f"record {len(offsets)} at offset {pos}"
            if check is not None:
                reason = check(len(offsets), record)
                if reason is not None:
                    return offsets, pos, Damage.REJECTED, f"record {len(offsets)} at offset {pos}: {reason}"
            offsets.append(pos)
            pos += _FRAME.size + length
    return offsets, pos, None, ""


def _quarantine(path: Path, fd: int, start: int, stop: int) -> Path:
    """Copy bytes [start, stop) aside before recovery truncates them, so repair destroys nothing."""
    n = 0
    while True:
        target = path.with_name(f"{path.name}.dropped-{start}" + (f".{n}" if n else ""))
        try:
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            n += 1
    try:
        pos = start
        while pos < stop:
            chunk = os.pread(fd, min(_COPY_CHUNK, stop - pos), pos)
            if not chunk:
                break
            _write_all(out, chunk, pos - start)
            pos += len(chunk)
        os.fsync(out)
    finally:
        os.close(out)
    sync_dir(path.parent)
    return target


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


class Snapshot(NamedTuple):
    """A state snapshot: the state after applying block ``height``."""

    height: int
    data: bytes


_SNAPSHOT_NAME = re.compile(r"^snapshot-(\d{20})\.snap$")
_SNAPSHOT_TMP = re.compile(r"^snapshot-(\d{20})\.snap\.tmp$")


def _snapshot_name(height: int) -> str:
    return f"snapshot-{height:020d}.snap"


def _encode_snapshot(height: int, data: bytes) -> bytes:
    head = _SNAP_HEAD.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, 0, height, len(data))
    return head + struct.pack(">I", zlib.crc32(data, zlib.crc32(head))) + data


class SnapshotStore:
    """A directory of atomically written, checksummed snapshots named by height.

    Keeps the newest ``keep`` snapshots. Files in the directory that do not
    match our naming pattern are left alone.
    """

    def __init__(self, directory: Path, *, keep: int, max_bytes: int) -> None:
        self.directory = directory
        self.keep = keep
        self.max_bytes = max_bytes

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        keep: int = DEFAULT_KEEP_SNAPSHOTS,
        max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
    ) -> tuple[SnapshotStore, list[Path]]:
        """Open (creating if absent) and delete temporary files a crash left; return them too."""
        directory = Path(directory)
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative, got {max_bytes}")
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            sync_dir(directory.parent)
        stale = sorted(p for p in directory.iterdir() if _SNAPSHOT_TMP.match(p.name))
        for p in stale:
            p.unlink()
            log.info("%s: removed an unfinished snapshot left by a crash", p)
        if stale:
            sync_dir(directory)
        return cls(directory, keep=keep, max_bytes=max_bytes), stale

    def heights(self) -> list[int]:
        """Heights of the snapshot files present (valid or not), ascending."""
        found = (_SNAPSHOT_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path_of(self, height: int) -> Path:
        return self.directory / _snapshot_name(height)

    def write_snapshot(self, height: int, data: bytes) -> Path:
        """Write the snapshot for ``height`` atomically, then prune to the newest ``keep``."""
        if type(height) is not int or not 0 <= height <= MAX_U64:
            raise HeightOutOfRange(
                f"{self.directory}: snapshot height must be an integer in [0, 2**64), got {height!r}"
            )
        data = _as_bytes(data, "snapshot data")
        final = self.path_of(height)
        if len(data) > self.max_bytes:
            raise RecordTooLarge(final, len(data), self.max_bytes, what="snapshot")
        tmp = final.with_name(final.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, _encode_snapshot(height, data), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            sync_dir(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreIOError(final, "snapshot write", exc) from exc
        self._prune()
        return final

    def read_snapshot(self, height: int) -> Snapshot:
        """Read and verify the snapshot file for ``height``; raise :class:`CorruptSnapshot` if damaged."""
        path = self.path_of(height)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < _SNAP_HEADER.size:
                raise CorruptSnapshot(path, f"{size} bytes, shorter than the {_SNAP_HEADER.size}-byte header")
            raw_head = _read_exact(fd, _SNAP_HEADER.size, 0)
            magic, version, flags, stored_height, length, crc = _SNAP_HEADER.unpack(raw_head)
            if magic != SNAPSHOT_MAGIC:
                raise CorruptSnapshot(path, f"magic {magic!r} is not {SNAPSHOT_MAGIC!r}")
            if length != size - _SNAP_HEADER.size:
                raise CorruptSnapshot(path, f"header says {length} data bytes, file holds {size - _SNAP_HEADER.size}")
            if length > self.max_bytes:
                raise CorruptSnapshot(path, f"{length} data bytes exceed the limit of {self.max_bytes}")
            data = _read_exact(fd, length, _SNAP_HEADER.size)
        finally:
            os.close(fd)
        if len(data) != length or zlib.crc32(data, zlib.crc32(raw_head[: _SNAP_HEAD.size])) != crc:
            raise CorruptSnapshot(path, "checksum mismatch")
        if version != FORMAT_VERSION or flags != 0:
            raise UnsupportedVersion(path, f"snapshot format version {version} flags {flags:#06x}")
        if stored_height != height:
            raise CorruptSnapshot(path, f"file name says height {height}, contents say {stored_height}")
        return Snapshot(height, data)

    def latest_snapshot(self, max_height: int | None = None) -> Snapshot | None:
        """The newest snapshot that verifies (at most ``max_height``), skipping damaged ones."""
        for height in reversed(self.heights()):
            if max_height is not None and height > max_height:
                continue
            try:
                return self.read_snapshot(height)
            except CorruptSnapshot as exc:
                log.warning("skipping %s", exc)
            except FileNotFoundError:
                continue
        return None

    def _prune(self) -> None:
        old = self.heights()[: -self.keep]
        for height in old:
            self.path_of(height).unlink(missing_ok=True)
        if old:
            sync_dir(self.directory)


# --------------------------------------------------------------------------
# The chain store
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Limits for one data dir. Records are the caller's bytes, not counting our framing."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES
    keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS

    def __post_init__(self) -> None:
        if not 0 <= self.max_record_bytes <= MAX_U32 - _HEIGHT.size:
            raise ValueError(f"max_record_bytes must be in [0, 2**32 - 8], got {self.max_record_bytes}")
        if self.max_snapshot_bytes < 0:
            raise ValueError(f"max_snapshot_bytes must be non-negative, got {self.max_snapshot_bytes}")
        if self.keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be at least 1, got {self.keep_snapshots}")


class Loaded(NamedTuple):
    """What a restarting node replays: the newest usable snapshot, then the blocks after it."""

    snapshot: Snapshot | None
    blocks: Iterator[tuple[int, bytes]]


class _HeightCheck:
    """Recovery check for the chain log: each record starts with a height one above the previous one's."""

    def __init__(self) -> None:
        self.first: int | None = None
        self._next: int | None = None

    def __call__(self, index: int, record: bytes) -> str | None:
        if len(record) < _HEIGHT.size:
            return f"{len(record)} bytes, too short to hold a height"
        (height,) = _HEIGHT.unpack_from(record)
        if self._next is not None and height != self._next:
            return f"holds height {height}, expected {self._next}"
        if self.first is None:
            self.first = height
        self._next = height + 1
        return None


class ChainStore:
    """One node's data dir: the block log, the snapshots and the lock that makes it ours.

    Layout: ``<data_dir>/LOCK``, ``<data_dir>/blocks.log``, ``<data_dir>/snapshots/``.
    Heights are contiguous from the first block appended (the chain decides
    whether that is 0 or 1). The log is never pruned, so a snapshot is usable
    only if the log reaches its height: ``load`` ignores a snapshot above the
    log's head (possible after recovery dropped a damaged tail), and the node
    replays from an older snapshot or from the first block instead.
    """

    LOCK_NAME = "LOCK"
    LOG_NAME = "blocks.log"
    SNAPSHOT_DIR = "snapshots"

    def __init__(
        self,
        data_dir: Path,
        config: StoreConfig,
        lock_fd: int,
        blocks: BlockLog,
        snapshots: SnapshotStore,
        first_height: int | None,
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self._lock_fd: int | None = lock_fd
        self._log = blocks
        self._snapshots = snapshots
        self._first = first_height

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], config: StoreConfig | None = None) -> ChainStore:
        """Lock ``data_dir`` (creating it if absent), then recover the log and clean up snapshots."""
        config = config or StoreConfig()
        data_dir = Path(data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise NotAStoreFile(data_dir, "a data dir must be a directory, this is a file")
        if not data_dir.is_dir():
            data_dir.mkdir(parents=True, exist_ok=True)
            sync_dir(data_dir.parent)
        lock_path = data_dir / cls.LOCK_NAME
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        blocks: BlockLog | None = None
        try:
            _lock_fd(lock_fd, lock_path)
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)  # for the message a second opener gets
            heights = _HeightCheck()
            try:
                blocks = BlockLog.open(
                    data_dir / cls.LOG_NAME, max_record_bytes=config.max_record_bytes + _HEIGHT.size, check=heights
                )
            except RecordTooLarge as exc:  # restate in the caller's terms: block bytes, StoreConfig's limit
                what = exc.what.replace("stored record", "stored block")
                raise RecordTooLarge(
                    exc.path, exc.size - _HEIGHT.size, config.max_record_bytes, what, exc.hint
                ) from exc
            snapshots, _stale = SnapshotStore.open(
                data_dir / cls.SNAPSHOT_DIR, keep=config.keep_snapshots, max_bytes=config.max_snapshot_bytes
            )
            return cls(data_dir, config, lock_fd, blocks, snapshots, heights.first if len(blocks) else None)
        except BaseException:
            if blocks is not None:
                blocks.close()
            os.close(lock_fd)
            raise

    # -- facts ----------------------------------------------------------------

    @property
    def recovery(self) -> RecoveryReport:
        """What recovery found in the log when the store was opened."""
        return self._log.recovery

    @property
    def first_height(self) -> int | None:
        return self._first

    @property
    def head_height(self) -> int | None:
        """Height of the last stored block, or None if the log is empty."""
        return None if self._first is None else self._first + len(self._log) - 1

    # -- blocks ---------------------------------------------------------------

    def append_block(self, height: int, record: bytes, *, sync: bool = True) -> None:
        """Append the block at ``height``, which must be ``head_height + 1`` (any height if empty)."""
        if type(height) is not int or not 0 <= height <= MAX_U64:
            raise HeightOutOfRange(f"{self._log.path}: height must be an integer in [0, 2**64), got {height!r}")
        head = self.head_height
        if head is not None and height != head + 1:
            if height <= head:
                raise HeightRepeat(f"{self._log.path}: height {height} is already stored (head is {head})")
            raise HeightGap(
                f"{self._log.path}: height {height} skips heights {head + 1}..{height - 1} (head is {head})"
            )
        record = _as_bytes(record, f"block {height}")
        if len(record) > self.config.max_record_bytes:
            raise RecordTooLarge(self._log.path, len(record), self.config.max_record_bytes, what=f"block {height}")
        self._log.append(_HEIGHT.pack(height) + record, sync=sync)
        if self._first is None:
            self._first = height

    def sync(self) -> None:
        """Flush blocks appended with ``sync=False``."""
        self._log.sync()

    def get_block(self, height: int) -> bytes:
        """The stored block record at ``height``."""
        return self._unframe(height, self._log.read(self._index_of(height)))

    def blocks_from(self, height: int) -> Iterator[tuple[int, bytes]]:
        """``(height, record)`` from ``height`` up to the head at the time of the call.

        Starting at ``head_height + 1`` or above yields nothing; starting below
        the first stored block raises :class:`HeightOutOfRange`.
        """
        if self._first is None:
            return iter(())
        if height < self._first:
            raise HeightOutOfRange(f"{self._log.path}: height {height} is below the first stored block {self._first}")
        start = height - self._first
        return (
            (self._first + start + i, self._unframe(self._first + start + i, raw))
            for i, raw in enumerate(self._log.records_from(start))
        )

    # -- snapshots ------------------------------------------------------------

    def snapshot(self, height: int, state: bytes) -> Path:
        """Store the state after block ``height`` (a block the log holds, or the state just before the first)."""
        head = self.head_height
        if self._first is None or head is None or not self._first - 1 <= height <= head:
            held = "no blocks" if self._first is None else f"blocks {self._first}..{head}"
            raise HeightOutOfRange(
                f"{self._snapshots.directory}: snapshot at height {height}, but the log holds {held}"
            )
        return self._snapshots.write_snapshot(height, state)

    def latest_snapshot(self) -> Snapshot | None:
        """The newest valid snapshot the log can continue from (at most the head)."""
        if self._first is None:
            return None
        found = self._snapshots.latest_snapshot(max_height=self.head_height)
        if found is not None and found.height < self._first - 1:
            return None
        return found

    def load(self) -> Loaded:
        """The newest usable snapshot (or None) and the blocks after it, in order."""
        snap = self.latest_snapshot()
        if self._first is None:
            return Loaded(None, iter(()))
        start = snap.height + 1 if snap is not None else self._first
        return Loaded(snap, self.blocks_from(start))

    @property
    def snapshots(self) -> SnapshotStore:
        return self._snapshots

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Close the log and release the data dir."""
        self._log.close()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def __enter__(self) -> ChainStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _index_of(self, height: int) -> int:
        head = self.head_height
        if self._first is None or head is None or not self._first <= height <= head:
            held = "no blocks" if self._first is None else f"blocks {self._first}..{head}"
            raise HeightOutOfRange(f"{self._log.path}: no block at height {height}; the log holds {held}")
        return height - self._first

    def _unframe(self, height: int, raw: bytes) -> bytes:
        (stored,) = _HEIGHT.unpack_from(raw)
        if stored != height:  # recovery proved contiguity, so only on-disk change gets here
            index = height - (self._first or 0)
            raise CorruptRecord(self._log.path, index, None, f"holds height {stored}, not {height}")
        return raw[_HEIGHT.size :]
