"""Task data at rest: sealed bodies in the blob store, indexed by what the ledger names them.

Every blob that holds task data (a client's inputs, a provider's result) is
sealed (:mod:`p2pgpu.sealed`) when it is created, to its holder's own X25519
key and bound to its task context (chain id, task id, purpose). The blob
store keeps only the sealed body, under the body's SHA-256; this module keeps
the small index that makes the body usable::

    <root>/<name hex>.<context id hex>   one SealedRef per (name, context)

where ``name`` is SHA-256 of the *plaintext* -- the hash the spec (inputs) or
``CommitResult`` (results) commits to -- and the context id is the digest the
body's preamble carries (:func:`p2pgpu.sealed.context_id`). A ref holds the
header with the holder's key wrap: without it the body cannot be opened, so
it is written atomically (temp file, fsync, rename, directory fsync) before
the ref is used. Refs are looked up from memory first and from disk after a
restart; one whose body was evicted from the store counts as absent.

Why index by name *and* context: the same plaintext used by two tasks is two
different bodies (the context is bound into each), and a fetcher asks for
"the input with this hash, for this task", never for a ciphertext it cannot
know in advance.

The holder never hands out its header. For each entitled fetcher it unwraps
the content key once and wraps it for the fetcher's public key
(:meth:`SealedStore.wrap_for`), returning a header that holds that one wrap:
the stored body and its content hash do not change, and a fetcher learns
nothing about who else can read the blob. A fetcher keeps the header it was
given the same way (:meth:`SealedStore.record`), so a blob it already holds
opens locally.

Opening (:meth:`SealedStore.open_stored`) checks, in order, the body's content
hash, the context, the key wrap, every chunk, and finally that the plaintext
hashes to the name it was asked for; each failure is its own
:class:`~p2pgpu.sealed.SealedError` subclass.

I/O is synchronous and thread-safe, like :class:`~p2pgpu.blobstore.BlobStore`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO, Final, cast

from ledger.codec import DecodeError, Hash32, Record, decode, encode, record

from .blobstore import HASH_SIZE, BlobPinned, BlobStore, InvalidHash
from .net.log import log
from .sealed import (
    EncryptionKey,
    MalformedEnvelope,
    NotARecipient,
    SealedError,
    SealedHeader,
    Tampered,
    Truncated,
    WrongContext,
    add_recipient,
    context_id,
    iter_open,
    seal,
)

__all__ = [
    "BadRecipientKey",
    "PlaintextMismatch",
    "SealedRef",
    "SealedStore",
    "rejection_reason",
]

logger = logging.getLogger(__name__)

_TMP_SUFFIX: Final = ".tmp"
_DAMAGED_SUFFIX: Final = ".damaged"


class PlaintextMismatch(SealedError):
    """The body opened, but its plaintext does not hash to the name it was fetched as."""


class BadRecipientKey(SealedError):
    """A fetcher sent a public key no key can be wrapped for (wrong length, low-order point)."""


def rejection_reason(exc: SealedError) -> str:
    """The counter label for a sealed blob that failed to open."""
    for cls, reason in (
        (NotARecipient, "not_a_recipient"),
        (Tampered, "tampered"),
        (Truncated, "truncated"),
        (WrongContext, "wrong_context"),
        (MalformedEnvelope, "malformed"),
        (PlaintextMismatch, "plaintext_mismatch"),
        (BadRecipientKey, "bad_recipient_key"),
    ):
        if isinstance(exc, cls):
            return reason
    return "sealed_error"


@record
class SealedRef(Record):
    """Where the sealed copy of ``name`` for one context is, and the header that opens it."""

    MAX_BYTES = SealedHeader.MAX_BYTES + 256
    name: Hash32
    """SHA-256 of the plaintext: what the spec or ``CommitResult`` commits to."""
    context_id: Hash32
    header: SealedHeader

    @property
    def content_hash(self) -> bytes:
        """The body's SHA-256: its name in the blob store."""
        return self.header.content_hash


SEAL_LOCK_STRIPES = 16
"""Locks that make :meth:`SealedStore.seal_put` idempotent per (name, context), picked by the name's first
byte. One lock for the whole store serialized every seal of a loaded client (its submissions' inputs, each
sealed and written in a worker thread): under load the queue behind it was most of a submission's time."""


def _check_hash(value: bytes, what: str) -> None:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise InvalidHash(f"{what} is {HASH_SIZE} bytes of SHA-256, got {got}")


class SealedStore:
    """Seals task data into a :class:`BlobStore` and opens it again; see the module docstring."""

    def __init__(self, store: BlobStore, key: EncryptionKey, root: str | os.PathLike[str] | None = None) -> None:
        self.store = store
        self.key = key
        self.root = Path(root) if root is not None else store.root / "sealed"
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"*{_TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        self._refs: dict[tuple[bytes, bytes], SealedRef] = {}
        self._lock = threading.Lock()
        self._seal_locks = tuple(threading.Lock() for _ in range(SEAL_LOCK_STRIPES))

    @property
    def public_key(self) -> bytes:
        """The X25519 key fetchers are wrapped for when this node fetches."""
        return self.key.public_key

    # -- the index ------------------------------------------------------------------

    def _path(self, name: bytes, cid: bytes) -> Path:
        return self.root / f"{name.hex()}.{cid.hex()}"

    def lookup(self, name: bytes, cid: bytes) -> SealedRef | None:
        """The ref for ``name`` in context ``cid`` whose body is in the store, else None."""
        _check_hash(name, "a blob name")
        _check_hash(cid, "a context id")
        with self._lock:
            ref = self._refs.get((name, cid))
        if ref is None:
            ref = self._load(name, cid)
        if ref is None:
            return None
        if not self.store.has(ref.content_hash):
            return None
        return ref

    def known(self, name: bytes, cid: bytes) -> SealedRef | None:
        """:meth:`lookup` without touching the disk: the ref if it is in memory, its body stored, and our own
        key among its recipients (what :meth:`seal_put` would return at once); else None."""
        with self._lock:
            ref = self._refs.get((name, cid))
        if ref is None or self.key.public_key not in ref.header.recipient_keys() \
                or not self.store.has(ref.content_hash):
            return None
        return ref

    def _load(self, name: bytes, cid: bytes) -> SealedRef | None:
        path = self._path(name, cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            ref = decode(SealedRef, data)
            problem = "" if (ref.name, ref.context_id) == (name, cid) else "names another blob"
        except DecodeError as exc:
            ref = None
            problem = str(exc)
        if ref is None or problem:
            os.replace(path, path.with_name(path.name + _DAMAGED_SUFFIX))
            log(logger, logging.WARNING, "sealed_ref_damaged", path=str(path), error=problem)
            return None
        with self._lock:
            self._refs[(name, cid)] = ref
        return ref

    def _save(self, ref: SealedRef) -> None:
        path = self._path(ref.name, ref.context_id)
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}{_TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(encode(ref))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._refs[(ref.name, ref.context_id)] = ref

    def record(self, name: bytes, cid: bytes, header: SealedHeader) -> SealedRef:
        """Keep ``header`` (a fetched blob's wrap for us) so the stored body opens later without a fetch."""
        ref = SealedRef(name=name, context_id=cid, header=header)
        self._save(ref)
        return ref

    def forget(self, name: bytes, cid: bytes) -> None:
        """Drop the ref (its body is left to the store's eviction, or :meth:`discard_body`)."""
        with self._lock:
            self._refs.pop((name, cid), None)
        self._path(name, cid).unlink(missing_ok=True)

    def discard_body(self, content_hash: bytes) -> bool:
        """Delete a body that failed to open, unless an active task pins it; True if it was deleted."""
        try:
            return self.store.delete(content_hash)
        except BlobPinned:
            return False

    # -- holder side -------------------------------------------------------------------

    def seal_put(self, plaintext: bytes, *, context: bytes) -> SealedRef:
        """Seal ``plaintext`` to our own key in ``context`` and store the body; idempotent per (name, context).

        Sealing is done once: a second call (the provider serves its result to
        the client, then again to verifiers) returns the stored ref, so the
        body and its content hash stay the same.
        """
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise TypeError(f"plaintext must be bytes, got {type(plaintext).__name__}")
        name = hashlib.sha256(plaintext).digest()
        cid = context_id(context)
        with self._seal_locks[name[0] % SEAL_LOCK_STRIPES]:  # one (name, context) is sealed once
            ref = self.lookup(name, cid)
            if ref is not None and self.key.public_key in ref.header.recipient_keys():
                return ref
            blob = seal(bytes(plaintext), [self.key.public_key], context=context)
            stored = self.store.put(blob.body)
            assert stored == blob.content_hash  # both are SHA-256 of the same bytes
            ref = SealedRef(name=name, context_id=cid, header=blob.header)
            self._save(ref)
        log(logger, logging.DEBUG, "sealed_stored", name=name.hex(), body=blob.content_hash.hex(),
            bytes=len(blob.body))
        return ref

    def wrap_for(self, ref: SealedRef, recipient: bytes) -> SealedHeader:
        """A header holding one wrap of ``ref``'s content key, for ``recipient`` only.

        Raises :class:`BadRecipientKey` for an unusable public key, and another
        :class:`SealedError` when our own stored header does not open (the
        copy is then useless to everyone).
        """
        try:
            full = add_recipient(ref.header, self.key, recipient)
        except MalformedEnvelope as exc:
            if exc.field == "new recipient":
                raise BadRecipientKey(str(exc)) from None
            raise
        wraps = tuple(w for w in full.recipients if w.recipient == recipient)
        return SealedHeader(version=full.version, content_hash=full.content_hash, recipients=wraps)

    # -- opening ---------------------------------------------------------------------

    def open_stored(self, name: bytes, header: SealedHeader, *, context: bytes) -> bytes:
        """The plaintext of the stored body ``header`` describes, checked against ``name``.

        Raises the :mod:`p2pgpu.sealed` errors (``WrongContext``,
        ``NotARecipient``, ``Tampered``, ``Truncated``, ``MalformedEnvelope``),
        :class:`PlaintextMismatch`, or the store's ``BlobNotFound`` /
        ``CorruptBlob`` if the body is gone or damaged on disk.
        """
        _check_hash(name, "a blob name")
        with self.store.open_read(header.content_hash) as reader:
            parts = list(iter_open(header, cast(BinaryIO, reader), self.key, context=context))
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        if digest.digest() != name:
            raise PlaintextMismatch(
                f"blob {header.content_hash.hex()} opens to plaintext hashing to {digest.hexdigest()}, "
                f"not the {name.hex()} it was asked for"
            )
        return b"".join(parts)

    def open_ref(self, ref: SealedRef, *, context: bytes) -> bytes:
        """:meth:`open_stored` for a ref from :meth:`lookup`."""
        return self.open_stored(ref.name, ref.header, context=context)
