"""Slashing protection: a validator never signs two conflicting consensus messages, even across restarts.

The rule is EIP-3076's, adapted to Tendermint's (height, round, step)
positions: a validator signs positions in strictly increasing order, and at
the one position it signed last it may only sign the *same* block again (BLS
signatures are deterministic, so that re-creates the identical signature a
crashed node may not have sent). Anything lower, or anything different at
the same position, is refused with :class:`SignRefused`.

The last signed position is persisted **before** the signature is returned:
the record is written to a temporary file, fsynced, renamed over the old one
with ``os.replace`` and the directory is fsynced. A validator killed at any
instant therefore restarts with a record at least as new as anything it may
have sent, and cannot double-sign.

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

from ledger.codec import U8, U32, U64, DecodeError, Hash32, Record, decode, encode, record

__all__ = [
    "GuardFileError",
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


class SignerGuard:
    """The rule plus its persisted record. ``path=None`` keeps the record in memory only (unit tests).

    ``on_persisted`` is called right after a new record is durable and
    before the signature is handed out; the simulator uses it to kill a
    validator at exactly that instant.
    """

    def __init__(
        self,
        chain_id: bytes,
        path: str | os.PathLike[str] | None = None,
        *,
        fsync: bool = True,
        on_persisted: Callable[[SignedPosition], None] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.path = Path(path) if path is not None else None
        self.fsync = fsync
        self.on_persisted = on_persisted
        self._last = self._load() if self.path is not None else None

    @property
    def last(self) -> SignedPosition | None:
        return self._last

    def approve(self, height: int, round_: int, step: SignStep, block_hash: bytes) -> None:
        """Allow signing (height, round, step, block) or raise :class:`SignRefused`; persist first."""
        if not check_position(self._last, self.chain_id, height, round_, step, block_hash):
            return
        rec = SignedPosition(
            chain_id=self.chain_id, height=height, round=round_, step=int(step), block_hash=block_hash
        )
        if self.path is not None:
            self._write(rec)
        self._last = rec
        if self.on_persisted is not None:
            self.on_persisted(rec)

    # ------------------------------------------------------------------ file

    def _load(self) -> SignedPosition | None:
        assert self.path is not None
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

    def _write(self, rec: SignedPosition) -> None:
        assert self.path is not None
        body = encode(rec)
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
