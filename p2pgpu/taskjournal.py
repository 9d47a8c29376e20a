"""The client's task journal: one durable record per task this node submitted, so a crash loses none.

Before this, a client's tasks lived in memory only: after a restart
``GET /tasks/{id}`` answered 404 for a task whose provider had delivered
and been paid, and a client that died while its provider fetched the
inputs got that provider slashed for a no-show. The journal is what the
client reloads on start-up (:meth:`p2pgpu.clientservice.ClientService.recover`).

Layout under ``root`` (``<data_dir>/client/tasks``)::

    <task id hex>.task        one record per task (the newest version)
    quarantine/<name>.<n>     records that failed their checksum or did not decode, kept for inspection

**One file per task**, not an append-only journal. A task's record is small
(its spec, a signed PostTask, a few hashes) and is rewritten a handful of
times (posted, assigned, result fetched, settled); the result itself stays
in the blob store, sealed. One file per task means deleting a result or
expiring it is ``unlink``; a torn write can only damage the one task being
written; and no compaction is ever needed. An append-only log would
have to be compacted to forget deleted and expired tasks, and one bad frame
would stop a reader from trusting anything after it.

**Each file is written atomically**, with the discipline of
:mod:`ledger.store` and :mod:`p2pgpu.sealedstore`: a temp file (unique per
thread) written and fsynced, renamed over the record, then the directory
fsynced. A reader therefore sees the old record or the new one, never a mix.
A file system that loses data after a rename can still leave a short or
garbled file behind, so each record also carries its own length and SHA-256::

    "P2TJ" | version u8 | payload length u32 (big-endian) | SHA-256(payload) | payload

The payload is JSON (UTF-8, sorted keys, bytes as hex): an operator can read
a task's record with ``tail -c +42 <file> | jq``, and a field can be added
without a schema migration. A file whose frame or checksum does not hold, or
whose payload does not decode, is moved to ``quarantine/`` with a log line
naming it, and the node keeps running with the rest.

**Ordering.** Every record carries ``seq``, bumped by the owner for each
change; writes run in worker threads, and a write older than what is already
on disk for that task is dropped (per-task lock), so two updates racing in
threads can never leave the older one on disk.

What is *not* here: the inputs' and result's bytes (sealed bodies in the blob
store) and their key wraps (:class:`~p2pgpu.sealedstore.SealedRef` files,
fsynced when sealed, before the record naming them is written); the X25519
key that opens them derives from the account key.

Synchronous and thread-safe; async callers use ``trio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from ledger.store import sync_dir

from .net.log import log

__all__ = [
    "JournalCorrupt",
    "JournalError",
    "LoadReport",
    "ResultLocation",
    "TaskEntry",
    "TaskJournal",
    "decode_entry",
    "encode_entry",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"P2TJ"
VERSION: Final = 1
_HEADER = struct.Struct(">4sBI32s")
HEADER_SIZE: Final = _HEADER.size
MAX_PAYLOAD: Final = 16 << 20
SUFFIX: Final = ".task"
_TMP_SUFFIX: Final = ".tmp"


class JournalError(Exception):
    """Base of the journal's failures."""


class JournalCorrupt(JournalError):
    """A record's frame, checksum or payload does not hold (a torn write or damage on disk)."""


@dataclass(frozen=True, slots=True)
class ResultLocation:
    """Where a fetched result is kept: its sealed body in the blob store, under the task's result context."""

    result_hash: bytes
    """SHA-256 of the result bytes (what ``CommitResult`` committed to; the sealed ref's name)."""
    body: bytes
    """SHA-256 of the sealed body: its name in the blob store (pinned while the result is kept)."""
    fetched_ms: int


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """Everything the client needs to rebuild one task after a restart. Bytes fields are raw bytes."""

    task_id: bytes
    post_nonce: int
    post_tx: bytes
    """The signed ``PostTask`` (``SignedTransaction`` encoding): resent as is if it never reached the ledger."""
    spec: bytes
    """The job spec's canonical encoding."""
    max_unit_price: int
    kind: str
    units: int
    bid_window: int
    exec_blocks: int
    audit_rate_bps: int
    fee: int
    enough_bids: int
    max_wait_blocks: int
    submit_height: int
    """The finalized height at submission (the announce's bid deadline was counted from it)."""
    created_ms: int
    inputs: tuple[tuple[bytes, bytes], ...] = ()
    """(plaintext hash, sealed body hash) of each input, in spec order: what the client must serve."""
    stage: str = "posted"
    timings: tuple[tuple[str, int, int], ...] = ()
    """(stage, height, unix ms) as the API shows them."""
    outcome: str | None = None
    detail: str = ""
    ledger_task: bytes | None = None
    """The ledger's ``Task`` as last seen (encoded): the ledger prunes settled tasks after ``task_retention``
    blocks, and this is what the client still knows of one then (provider, result hash, outcome)."""
    result: ResultLocation | None = None
    closed_ms: int | None = None
    """When the task was settled (or given up on): retention counts from here or the result's fetch."""
    bids: tuple[bytes, ...] = ()
    """The auction's bids (``SignedBid`` encodings, one per provider) while it is open: after a crash they are
    all the client has of them, as providers do not bid twice on one auction."""
    seq: int = 0

    @property
    def open(self) -> bool:
        return self.outcome is None

    def bump(self, **changes: Any) -> TaskEntry:
        """A newer version of this record (``seq`` + 1) with ``changes``."""
        return replace(self, seq=self.seq + 1, **changes)


# ---------------------------------------------------------------------- encoding (pure)

_BYTES_FIELDS: Final = ("task_id", "post_tx", "spec", "ledger_task")


def _payload_of(entry: TaskEntry) -> dict[str, Any]:
    # shallow on purpose: asdict's deep copy was ~3 % of a loaded client's CPU, and every field that is not a
    # plain value is rewritten below anyway
    obj = {f.name: getattr(entry, f.name) for f in fields(entry)}
    for name in _BYTES_FIELDS:
        obj[name] = obj[name].hex() if obj[name] is not None else None
    obj["inputs"] = [[name.hex(), body.hex()] for name, body in entry.inputs]
    obj["timings"] = [list(t) for t in entry.timings]
    obj["bids"] = [b.hex() for b in entry.bids]
    if entry.result is not None:
        obj["result"] = {"result_hash": entry.result.result_hash.hex(), "body": entry.result.body.hex(),
                         "fetched_ms": entry.result.fetched_ms}
    return obj


def encode_entry(entry: TaskEntry) -> bytes:
    """The framed, checksummed bytes of one record (see the module docstring)."""
    payload = json.dumps(_payload_of(entry), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(payload) > MAX_PAYLOAD:
        raise JournalError(f"task record of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    return _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def _hex(obj: dict[str, Any], key: str, size: int | None = None) -> bytes:
    value = bytes.fromhex(obj[key])
    if size is not None and len(value) != size:
        raise ValueError(f"{key}: expected {size} bytes, got {len(value)}")
    return value


def decode_entry(data: bytes) -> TaskEntry:
    """The record in ``data``; raises :class:`JournalCorrupt` naming what does not hold."""
    if len(data) < HEADER_SIZE:
        raise JournalCorrupt(f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header (torn write)")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise JournalCorrupt(f"bad magic {magic!r} (not a task record)")
    if version != VERSION:
        raise JournalCorrupt(f"unknown record version {version}")
    payload = data[HEADER_SIZE:]
    if len(payload) != length:
        raise JournalCorrupt(f"payload is {len(payload)} bytes, the header says {length} (torn write)")
    if hashlib.sha256(payload).digest() != digest:
        raise JournalCorrupt("payload does not match its SHA-256 (damaged on disk)")
    try:
        obj = json.loads(payload.decode("utf-8"))
        result = obj.get("result")
        return TaskEntry(
            task_id=_hex(obj, "task_id", 32), post_nonce=int(obj["post_nonce"]), post_tx=_hex(obj, "post_tx"),
            spec=_hex(obj, "spec"), max_unit_price=int(obj["max_unit_price"]), kind=str(obj["kind"]),
            units=int(obj["units"]), bid_window=int(obj["bid_window"]), exec_blocks=int(obj["exec_blocks"]),
            audit_rate_bps=int(obj["audit_rate_bps"]), fee=int(obj["fee"]), enough_bids=int(obj["enough_bids"]),
            max_wait_blocks=int(obj["max_wait_blocks"]), submit_height=int(obj["submit_height"]),
            created_ms=int(obj["created_ms"]),
            inputs=tuple((bytes.fromhex(n), bytes.fromhex(b)) for n, b in obj["inputs"]),
            stage=str(obj["stage"]),
            timings=tuple((str(s), int(h), int(ms)) for s, h, ms in obj["timings"]),
            outcome=obj["outcome"] if obj["outcome"] is None else str(obj["outcome"]),
            detail=str(obj["detail"]),
            ledger_task=_hex(obj, "ledger_task") if obj["ledger_task"] is not None else None,
            result=None if result is None else ResultLocation(
                result_hash=_hex(result, "result_hash", 32), body=_hex(result, "body", 32),
                fetched_ms=int(result["fetched_ms"])),
            closed_ms=None if obj["closed_ms"] is None else int(obj["closed_ms"]),
            bids=tuple(bytes.fromhex(b) for b in obj.get("bids", ())),
            seq=int(obj["seq"]),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise JournalCorrupt(f"payload does not decode: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------- the directory


@dataclass(slots=True)
class LoadReport:
    """What :meth:`TaskJournal.load_all` found."""

    entries: list[TaskEntry] = field(default_factory=list)
    quarantined: list[tuple[Path, str]] = field(default_factory=list)
    """(where the damaged file was moved, why it was refused)."""


class TaskJournal:
    """The directory of task records; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir = self.root / "quarantine"
        for leftover in self.root.glob(f"*{_TMP_SUFFIX}"):  # a write the last process never finished
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._task_locks: dict[bytes, threading.Lock] = {}
        self._written: dict[bytes, int] = {}  # task id -> seq on disk
        self.writes = 0
        self.stale_writes_dropped = 0

    def path_of(self, task_id: bytes) -> Path:
        return self.root / f"{task_id.hex()}{SUFFIX}"

    def _task_lock(self, task_id: bytes) -> threading.Lock:
        with self._lock:
            lock = self._task_locks.get(task_id)
            if lock is None:
                lock = self._task_locks[task_id] = threading.Lock()
            return lock

    def write(self, entry: TaskEntry) -> bool:
        """Make ``entry`` the task's record on disk, durably; False if a newer version is there already.

        Returns only once the record and the directory entry are fsynced.
        Raises ``OSError`` when the disk refuses (nothing is half-written).
        """
        written = self._write_file(entry)
        if written:
            sync_dir(self.root)
        return written

    def write_many(self, entries: Sequence[TaskEntry]) -> list[tuple[TaskEntry, OSError | JournalError]]:
        """:meth:`write` for several tasks' records, with one fsync of the directory for all of them.

        Each record is written (or refused) on its own; returns the ones the disk refused, with why. Returns
        once every record written and the directory entries are fsynced.
        """
        failed: list[tuple[TaskEntry, OSError | JournalError]] = []
        written = False
        for entry in entries:
            try:
                written = self._write_file(entry) or written
            except (OSError, JournalError) as exc:
                failed.append((entry, exc))
        if written:
            try:
                sync_dir(self.root)
            except OSError as exc:  # the renames may not survive a crash: none of them counts as durable
                return [(entry, exc) for entry in entries]
        return failed

    def _write_file(self, entry: TaskEntry) -> bool:
        """The record written and fsynced under its final name (the directory not synced yet)."""
        data = encode_entry(entry)
        with self._task_lock(entry.task_id):
            if self._written.get(entry.task_id, -1) >= entry.seq:
                self.stale_writes_dropped += 1
                return False
            path = self.path_of(entry.task_id)
            tmp = path.with_name(f"{path.name}.{threading.get_ident()}{_TMP_SUFFIX}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._written[entry.task_id] = entry.seq
            self.writes += 1
        return True

    def delete(self, task_id: bytes) -> bool:
        """Forget a task's record (its result was deleted or expired); False if there was none."""
        with self._task_lock(task_id):
            path = self.path_of(task_id)
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            sync_dir(self.root)
            self._written[task_id] = 1 << 62  # a late write of an older version must not bring it back
        return True

    def read(self, task_id: bytes) -> TaskEntry:
        """One record; ``FileNotFoundError`` if there is none, :class:`JournalCorrupt` if it is damaged."""
        return decode_entry(self.path_of(task_id).read_bytes())

    def _files(self) -> Iterator[Path]:
        return iter(sorted(p for p in self.root.iterdir() if p.is_file() and p.name.endswith(SUFFIX)))

    def load_all(self) -> LoadReport:
        """Every record, oldest submission first; damaged files are quarantined and reported, never fatal."""
        report = LoadReport()
        for path in self._files():
            try:
                entry = decode_entry(path.read_bytes())
                if path.name != f"{entry.task_id.hex()}{SUFFIX}":
                    raise JournalCorrupt(f"the record is for task {entry.task_id.hex()}, not its file name's")
            except (JournalCorrupt, OSError) as exc:
                moved = self._quarantine(path)
                report.quarantined.append((moved, str(exc)))
                log(logger, logging.ERROR, "task_record_refused", path=str(path), error=str(exc),
                    action=f"moved to {moved}; the node continues without it")
                continue
            with self._lock:
                self._written[entry.task_id] = entry.seq
            report.entries.append(entry)
        report.entries.sort(key=lambda e: (e.created_ms, e.post_nonce))
        return report

    def _quarantine(self, path: Path) -> Path:
        self.quarantine_dir.mkdir(exist_ok=True)
        n = 0
        while True:
            target = self.quarantine_dir / f"{path.name}.{n}"
            if not target.exists():
                break
            n += 1
        try:
            os.replace(path, target)
            sync_dir(self.root)
        except OSError as exc:  # cannot even move it: leave it, but never load it
            log(logger, logging.ERROR, "task_record_quarantine_failed", path=str(path), error=repr(exc))
            return path
        return target
