"""Slashing protection: a validator never signs two conflicting consensus messages, even across restarts.

The rule is EIP-3076's, adapted to Tendermint's (height, round, step)
positions: a validator signs positions in strictly increasing order, and at
the one position it signed last it may only sign the *same* block again (BLS
signatures are deterministic, so that re-creates the identical signature a
crashed node may not have sent). Anything lower, or anything different at
the same position, is refused with :class:`SignRefused`.

The last signed position is durable **before** any signature it covers
leaves the node: the record is written to a temporary file, fsynced, renamed
over the old one with ``os.replace`` and the directory is fsynced. A
validator killed at any instant therefore restarts with a record at least as
new as anything it may have sent, and cannot double-sign. By default the
write happens inside :meth:`SignerGuard.approve`; a host that must not block
there (the Trio driver) defers it and writes, off its event loop, before it
publishes (:meth:`SignerGuard.defer_writes`). A signature made before a crash
whose record never became durable was never sent, so signing that position
differently after the restart conflicts with nothing anyone holds.

Positions order proposals before votes inside a round
(``PROPOSAL < PREVOTE < PRECOMMIT``), which is the order in which Algorithm 1
of Buchman, Kwon and Milosevic (2018) signs them.

A damaged or foreign file is never guessed around: :class:`GuardFileError`
stops the validator from starting, because silently starting from an empty
record is exactly how double-signing after a restart happens.
"""

from __future__ import annotations

import enum
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ledger.codec import U8, U32, U64, DecodeError, Hash32, Record, decode, encode, record

__all__ = [
    "GuardFile",
    "GuardFileError",
    "GuardStore",
    "SignRefused",
    "SignStep",
    "SignedPosition",
    "SignerGuard",
    "SlashingProtectionError",
    "check_position",
]

FILE_MAGIC = b"P2PGSGD\x00"
FILE_VERSION = 1


class SignStep(enum.IntEnum):
    """Signing positions inside one round, in the order they are signed."""

    PROPOSAL = 0
    PREVOTE = 1
    PRECOMMIT = 2


@record
class SignedPosition(Record):
    """The last thing a validator signed: what the guard persists."""

    MAX_BYTES = 256
    chain_id: Hash32
    height: U64
    round: U32
    step: U8
    block_hash: Hash32

    @property
    def position(self) -> tuple[int, int, int]:
        return (self.height, self.round, self.step)


class SlashingProtectionError(Exception):
    """Base of every slashing-protection failure."""


class SignRefused(SlashingProtectionError):
    """Signing this would regress or conflict with what was signed before (we misused the signer)."""


class GuardFileError(SlashingProtectionError):
    """The protection file is damaged, foreign, or cannot be written; the validator must not sign."""


def check_position(
    last: SignedPosition | None, chain_id: bytes, height: int, round_: int, step: int, block_hash: bytes
) -> bool:
    """The pure rule. Returns True if the record must advance, False if this re-signs ``last`` exactly.

    Raises :class:`SignRefused` when signing would regress or conflict.
    """
    if last is None:
        return True
    if last.chain_id != chain_id:
        raise SignRefused("protection record belongs to another chain")
    want = (height, round_, int(step))
    if want < last.position:
        raise SignRefused(
            f"refusing to sign height {height} round {round_} step {SignStep(step).name}: "
            f"already signed height {last.height} round {last.round} step {SignStep(last.step).name}"
        )
    if want == last.position:
        if block_hash != last.block_hash:
            raise SignRefused(
                f"refusing to sign a second block at height {height} round {round_} step {SignStep(step).name}"
            )
        return False
    return True


class GuardStore(Protocol):
    """Where a guard keeps its record. ``write`` blocks until the record is durable (a host may run it in a
    worker thread: it touches nothing but the record it is given and its own file), one writer at a time."""

    def load(self) -> SignedPosition | None: ...

    def write(self, record: SignedPosition) -> None: ...


class GuardFile:
    """The record in one file: magic, version, CRC-32, the encoded :class:`SignedPosition`.

    A write goes to a temporary file, is fsynced, renamed over the old one with ``os.replace``, and the
    directory is fsynced: a crash at any instant leaves either the old record or the new one, whole.
    """

    def __init__(self, path: str | os.PathLike[str], chain_id: bytes, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.chain_id = chain_id
        self.fsync = fsync

    def load(self) -> SignedPosition | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise GuardFileError(f"{self.path}: cannot read: {exc}") from exc
        header = len(FILE_MAGIC) + 1 + 4
        if len(raw) < header or not raw.startswith(FILE_MAGIC):
            raise GuardFileError(f"{self.path}: not a slashing-protection file (bad magic or too short)")
        version = raw[len(FILE_MAGIC)]
        if version != FILE_VERSION:
            raise GuardFileError(f"{self.path}: unsupported version {version}")
        crc = int.from_bytes(raw[len(FILE_MAGIC) + 1 : header], "big")
        body = raw[header:]
        if zlib.crc32(body) != crc:
            raise GuardFileError(f"{self.path}: checksum mismatch (file damaged)")
        try:
            rec = decode(SignedPosition, body)
        except DecodeError as exc:
            raise GuardFileError(f"{self.path}: {exc}") from exc
        if rec.chain_id != self.chain_id:
            raise GuardFileError(f"{self.path}: record is for chain {rec.chain_id.hex()[:16]}, not this one")
        return rec

    def write(self, record: SignedPosition) -> None:
        body = encode(record)
        data = FILE_MAGIC + bytes([FILE_VERSION]) + zlib.crc32(body).to_bytes(4, "big") + body
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if self.fsync:
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise GuardFileError(f"{self.path}: cannot persist the signed position: {exc}") from exc


class SignerGuard:
    """The rule, the high-water mark it is checked against, and the mark's durable copy.

    ``path`` (or any ``store``) persists the record; with neither, the record lives in memory only (unit
    tests) and counts as durable at once. ``on_persisted`` is called right after a new record is durable,
    before any signature it covers may leave the node; the simulator uses it to kill a validator at exactly
    that instant.

    By default a write goes through: :meth:`approve` returns only once the record is durable, so what it
    approved may be sent at once. A host that cannot block there (the Trio driver: an fsync on the event
    loop stalls gossip) calls :meth:`defer_writes` and takes the duty over: :meth:`approve` then only
    raises the mark in memory (a second, conflicting signature is still refused at once), and the host
    makes :attr:`pending` durable -- :meth:`flush`, or :meth:`write` in a worker thread then
    :meth:`mark_durable` -- before it lets any message signed since leave. One write covers every mark
    approved since the last, because the newest position supersedes the older ones.
    """

    def __init__(
        self,
        chain_id: bytes,
        path: str | os.PathLike[str] | None = None,
        *,
        fsync: bool = True,
        on_persisted: Callable[[SignedPosition], None] | None = None,
        store: GuardStore | None = None,
    ) -> None:
        if path is not None and store is not None:
            raise ValueError("give the guard a path or a store, not both")
        self.chain_id = chain_id
        self.path = Path(path) if path is not None else None
        self.store: GuardStore | None = GuardFile(path, chain_id, fsync=fsync) if path is not None else store
        self.on_persisted = on_persisted
        self._last = self.store.load() if self.store is not None else None
        self._durable = self._last
        self._deferred = False

    @property
    def last(self) -> SignedPosition | None:
        """The high-water mark: the last position approved (durable or, with deferred writes, not yet)."""
        return self._last

    @property
    def durable(self) -> SignedPosition | None:
        """The last record known to be durable: what a restart would load."""
        return self._durable

    @property
    def pending(self) -> SignedPosition | None:
        """The mark, if it is newer than its durable copy: signatures it covers must not leave yet."""
        if self.store is None or self._last is self._durable:
            return None  # in memory only there is nothing to write
        return self._last

    def defer_writes(self) -> None:
        """From now on :meth:`approve` does not write; the caller makes :attr:`pending` durable before
        anything signed since leaves the node (see the class docstring)."""
        self._deferred = True

    def approve(self, height: int, round_: int, step: SignStep, block_hash: bytes) -> None:
        """Allow signing (height, round, step, block) or raise :class:`SignRefused`; persist first unless
        writes are deferred."""
        if not check_position(self._last, self.chain_id, height, round_, step, block_hash):
            return
        rec = SignedPosition(
            chain_id=self.chain_id, height=height, round=round_, step=int(step), block_hash=block_hash
        )
        if self._deferred and self.store is not None:
            self._last = rec
            return
        self.write(rec)
        self._last = rec
        self.mark_durable(rec)

    def write(self, record: SignedPosition) -> None:
        """Make ``record`` durable (blocking; :class:`GuardFileError` if it cannot be). Reads no guard state,
        so a host may run it in a worker thread; one writer at a time."""
        if self.store is not None:
            self.store.write(record)

    def mark_durable(self, record: SignedPosition) -> None:
        """``record`` was written (by :meth:`write`): signatures up to it may leave the node."""
        if self._durable is not None and record.position <= self._durable.position:
            return
        self._durable = record
        if self.on_persisted is not None:
            self.on_persisted(record)

    def flush(self) -> None:
        """Make the pending mark durable, here and now (blocking)."""
        rec = self.pending
        if rec is not None:
            self.write(rec)
            self.mark_durable(rec)
