"""Sealed payloads: task inputs and results readable only by the client, the provider and drawn verifiers.

Primitives (pycryptodome): X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305
(RFC 8439). The byte layout below is the wire format; ``SEALED_VERSION`` changes
if any of it does.

Keys
----
Each node's X25519 key is derived from its Ed25519 account seed::

    x25519_secret = HKDF-SHA256(ikm=ed25519_seed, salt="p2pgpu/sealed/1",
                                info="x25519 encryption key", L=32)

so one keystore entry holds the node's only secret, and the derived key is
unrelated to the signing key (HKDF with its own label; the Ed25519 scalar is
never reused as an X25519 scalar). Nobody publishes the 32-byte public key
(:func:`encryption_public_key`): a fetcher sends it in its ``/p2pgpu/data/1``
request and the holder wraps the blob's key for it after the ledger
entitlement check (see :mod:`p2pgpu.sealedstore`).

Envelope: a body (content-addressed) and a header (travels alongside)
-------------------------------------------------------------------------
The **body** is what the data plane stores and serves; its content address is
``SHA-256(body)``::

    preamble (81 bytes) = "P2GS" | version u8 | chunk_size u32 | length u64
                          | context_hash (32) | key_commitment (32)
    then n chunks:        ChaCha20-Poly1305(payload_key, nonce=u64 index || 0u32,
                                            aad=preamble || u64 index || u8 final)
                          each ``chunk_size`` plaintext bytes (the last one
                          shorter, possibly empty) + a 16-byte tag

with ``n = max(1, ceil(length / chunk_size))`` (an empty payload is one empty,
authenticated final chunk). A random 32-byte content key ``K`` yields
``payload_key, key_commitment = HKDF-SHA256(K, salt="p2pgpu/sealed/1",
info="payload" || context_hash, 2 x 32)``.

The **header** (a :class:`SealedHeader` record) holds, per recipient, its X25519
public key, an ephemeral X25519 public key and ``K`` wrapped with
ChaCha20-Poly1305 under ``HKDF-SHA256(X25519(eph, recipient),
salt=eph_pub || recipient_pub, info="key-wrap")``, AAD = "p2pgpu/sealed/1 wrap"
|| content_hash || recipient_pub || eph_pub.

Why this split:

* Adding a recipient (a verifier drawn after the result was delivered) only
  appends a wrap to the header; the body, and so the content address the
  ledger committed to in ``CommitResult``, does not change.
* Everything that decides what plaintext a body opens to lives *in* the
  body: chunking, length, context and a commitment to ``K``. ChaCha20-Poly1305
  is not key-committing, so without the commitment a malicious client could
  hand the provider and a verifier wraps of two different keys under which
  one body opens to two different inputs (the verifier would then "catch" an
  honest provider). With it, every recipient who opens a given content hash
  gets the same bytes or an error.
* Chunking (1 MiB by default) lets large blobs stream through fixed memory;
  index and final flag in every chunk's AAD/nonce, plus the declared length,
  make reordering, truncation and extension detectable, naming the chunk.
* The context (see :func:`task_context`: chain id, task id, purpose) is bound
  through ``context_hash`` into every chunk's AAD and the key derivation, so a
  ciphertext for one task cannot be replayed as another's; a caller opening
  with the wrong context gets :class:`WrongContext`, not a vague auth failure.

Errors (all :class:`SealedError`): :class:`NotARecipient`, :class:`Tampered`
(names the chunk index or the wrap), :class:`Truncated`, :class:`WrongContext`,
:class:`MalformedEnvelope` (names the field).

Throughput: pycryptodome's ChaCha20-Poly1305 runs ~250 MiB/s here against
~2 GiB/s for ``cryptography``'s (OpenSSL); the format is plain RFC 8439, so a
test checks that ``cryptography`` opens our chunks and the bulk cipher can be
swapped without a format change if sealing ever shows up in a profile (the
data plane moves bytes far slower than either).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, BinaryIO, Final, Protocol, cast

from Crypto.Cipher import ChaCha20_Poly1305
from Crypto.Hash import SHA256
from Crypto.Protocol import DH
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC

from ledger.codec import U8, DecodeError, FixedBytes, Hash32, ListOf, Nested, Record, decode, encode, record
from ledger.keys import AccountKey

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_RECIPIENTS",
    "MIN_CHUNK_SIZE",
    "PREAMBLE_SIZE",
    "SEALED_VERSION",
    "EncryptionKey",
    "MalformedEnvelope",
    "NotARecipient",
    "Preamble",
    "Purpose",
    "RecipientWrap",
    "SealedBlob",
    "SealedError",
    "SealedHeader",
    "Tampered",
    "Truncated",
    "WrongContext",
    "add_recipient",
    "body_size",
    "context_id",
    "encryption_public_key",
    "iter_open",
    "open_sealed",
    "parse_preamble",
    "seal",
    "seal_stream",
    "task_context",
]

SEALED_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 1 << 20
MIN_CHUNK_SIZE: Final = 16
MAX_CHUNK_SIZE: Final = 16 << 20
MAX_RECIPIENTS: Final = 64
MAX_CONTEXT: Final = 1024
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16

_LABEL = b"p2pgpu/sealed/1"
_MAGIC = b"P2GS"
_PREAMBLE = struct.Struct(">4sBIQ32s32s")
PREAMBLE_SIZE: Final = _PREAMBLE.size
_WRAP_NONCE = bytes(12)


# -- errors --------------------------------------------------------------------


class SealedError(ValueError):
    """Base of every failure to seal or open a payload."""


class NotARecipient(SealedError):
    """The header holds no wrapped key for this X25519 public key."""


class Tampered(SealedError):
    """Authentication failed: the bytes were changed, reordered or belong to another blob.

    ``chunk`` is the index of the chunk that failed, or None when the
    recipient's key wrap failed.
    """

    def __init__(self, message: str, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk


class Truncated(SealedError):
    """The body ends before the length its preamble declares."""


class WrongContext(SealedError):
    """The blob was sealed for another context (another chain, task or purpose)."""


class MalformedEnvelope(SealedError):
    """Bytes that are not a sealed envelope; ``field`` names the offending part."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


# -- keys ----------------------------------------------------------------------


def _x25519_public(secret: bytes) -> bytes:
    return DH.import_x25519_private_key(secret).public_key().export_key(format="raw")


def _load_public(pub: bytes, what: str) -> ECC.EccKey:
    if type(pub) is not bytes or len(pub) != KEY_SIZE:
        got = f"{len(pub)} bytes" if isinstance(pub, bytes) else type(pub).__name__
        raise MalformedEnvelope(what, f"an X25519 public key is {KEY_SIZE} bytes, got {got}")
    try:
        return DH.import_x25519_public_key(pub)
    except ValueError as exc:  # low-order points and the like
        raise MalformedEnvelope(what, f"not a usable X25519 public key: {exc}") from None


@dataclass(frozen=True, slots=True, repr=False)
class EncryptionKey:
    """A node's X25519 key pair for opening sealed payloads."""

    secret: bytes
    public_key: bytes

    @classmethod
    def from_account_key(cls, account: AccountKey) -> EncryptionKey:
        secret = HKDF(account.seed, KEY_SIZE, _LABEL, SHA256, context=b"x25519 encryption key")
        return cls(secret=secret, public_key=_x25519_public(secret))

    @classmethod
    def generate(cls) -> EncryptionKey:
        """A key not tied to any account (tests, one-off recipients)."""
        secret = os.urandom(KEY_SIZE)
        return cls(secret=secret, public_key=_x25519_public(secret))

    def agree(self, peer_public: bytes, what: str) -> bytes:
        private = DH.import_x25519_private_key(self.secret)
        return DH.key_agreement(static_priv=private, static_pub=_load_public(peer_public, what), kdf=lambda z: z)

    def __repr__(self) -> str:
        return f"EncryptionKey(public_key={self.public_key.hex()})"


def encryption_public_key(account_key: AccountKey) -> bytes:
    """The 32-byte X25519 public key a node publishes so others can seal to it."""
    return EncryptionKey.from_account_key(account_key).public_key


def _as_key(key: EncryptionKey | AccountKey) -> EncryptionKey:
    if isinstance(key, EncryptionKey):
        return key
    if isinstance(key, AccountKey):
        return EncryptionKey.from_account_key(key)
    raise TypeError(f"expected an EncryptionKey or AccountKey, got {type(key).__name__}")


# -- context -------------------------------------------------------------------


class Purpose:
    """What a sealed blob is within its task; part of the context so an input cannot pose as a result."""

    INPUT: Final = b"input"
    RESULT: Final = b"result"
    STREAM_ITEM: Final = b"stream-item"


def task_context(chain_id: bytes, task_id: bytes, purpose: bytes) -> bytes:
    """Canonical context bytes: ``"p2pgpu/sealed/1 task" | chain_id | task_id | len(purpose) | purpose``."""
    for name, value in (("chain_id", chain_id), ("task_id", task_id)):
        if type(value) is not bytes or len(value) != 32:
            got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
            raise SealedError(f"{name} must be 32 bytes, got {got}")
    if type(purpose) is not bytes or not 0 < len(purpose) < 256:
        raise SealedError("purpose must be 1..255 bytes")
    return b"".join((_LABEL, b" task", chain_id, task_id, bytes([len(purpose)]), purpose))


def context_id(context: bytes) -> bytes:
    """The 32-byte digest of ``context`` that a body's preamble carries.

    Lets a holder index its bodies by context and a fetcher name the context
    it wants without sending (or the holder parsing) the context bytes.
    """
    return _context_hash(context)


def _context_hash(context: bytes) -> bytes:
    if type(context) is not bytes:
        raise TypeError(f"context must be bytes, got {type(context).__name__}")
    if len(context) > MAX_CONTEXT:
        raise SealedError(f"context of {len(context)} bytes exceeds {MAX_CONTEXT}")
    return hashlib.sha256(_LABEL + b" context" + context).digest()


# -- header (travels alongside the body) -----------------------------------------


@record
class RecipientWrap(Record):
    MAX_BYTES = 256
    recipient: Annotated[bytes, FixedBytes(32)]
    ephemeral: Annotated[bytes, FixedBytes(32)]
    wrapped_key: Annotated[bytes, FixedBytes(KEY_SIZE + TAG_SIZE)]


@record
class SealedHeader(Record):
    """Key wraps for one body. Not content-addressed: recipients can be added."""

    MAX_BYTES = 64 + MAX_RECIPIENTS * 128
    version: U8
    content_hash: Hash32
    recipients: Annotated[tuple[RecipientWrap, ...], ListOf(Nested(RecipientWrap), max_items=MAX_RECIPIENTS)]

    def to_bytes(self) -> bytes:
        return encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedHeader:
        try:
            header = decode(cls, data)
        except DecodeError as exc:
            raise MalformedEnvelope(exc.path or "SealedHeader", exc.reason) from None
        if header.version != SEALED_VERSION:
            raise MalformedEnvelope("SealedHeader.version", f"unsupported version {header.version}")
        return header

    def recipient_keys(self) -> list[bytes]:
        return [w.recipient for w in self.recipients]


@dataclass(frozen=True, slots=True)
class Preamble:
    chunk_size: int
    length: int
    context_hash: bytes
    key_commitment: bytes

    def to_bytes(self) -> bytes:
        return _PREAMBLE.pack(
            _MAGIC, SEALED_VERSION, self.chunk_size, self.length, self.context_hash, self.key_commitment
        )

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.length // self.chunk_size))

    @property
    def body_size(self) -> int:
        return PREAMBLE_SIZE + self.length + TAG_SIZE * self.chunk_count


def parse_preamble(data: bytes) -> Preamble:
    """The preamble at the start of a body; raises :class:`Truncated` or :class:`MalformedEnvelope`."""
    if len(data) < PREAMBLE_SIZE:
        raise Truncated(f"body of {len(data)} bytes ends inside the {PREAMBLE_SIZE}-byte preamble")
    magic, version, chunk_size, length, context_hash, commitment = _PREAMBLE.unpack_from(data)
    if magic != _MAGIC:
        raise MalformedEnvelope("body.magic", f"expected {_MAGIC!r}, got {magic!r}")
    if version != SEALED_VERSION:
        raise MalformedEnvelope("body.version", f"unsupported version {version}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise MalformedEnvelope("body.chunk_size", f"{chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if length > (1 << 48):
        raise MalformedEnvelope("body.length", f"{length} bytes is beyond any payload this format carries")
    return Preamble(chunk_size, length, context_hash, commitment)


def body_size(length: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Size of the body that sealing ``length`` plaintext bytes produces."""
    return Preamble(chunk_size, length, b"", b"").body_size


@dataclass(frozen=True, slots=True)
class SealedBlob:
    """A sealed payload: ``body`` is stored and served under ``content_hash``; ``header`` goes with it."""

    content_hash: bytes
    header: SealedHeader
    body: bytes


# -- crypto helpers ----------------------------------------------------------------


def _derive_payload_keys(content_key: bytes, context_hash: bytes) -> tuple[bytes, bytes]:
    # pycryptodome returns a tuple only when num_keys > 1.
    keys = cast(tuple[bytes, bytes], HKDF(content_key, KEY_SIZE, _LABEL, SHA256, num_keys=2,
                                          context=b"payload" + context_hash))
    return keys


def _chunk_nonce(index: int) -> bytes:
    return struct.pack(">QI", index, 0)


def _chunk_aad(preamble: bytes, index: int, final: bool) -> bytes:
    return preamble + struct.pack(">QB", index, 1 if final else 0)


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(shared, KEY_SIZE, ephemeral + recipient, SHA256, context=_LABEL + b" key-wrap")


def _wrap_aad(content_hash: bytes, recipient: bytes, ephemeral: bytes) -> bytes:
    return _LABEL + b" wrap" + content_hash + recipient + ephemeral


def _wrap_for(content_key: bytes, content_hash: bytes, recipient: bytes) -> RecipientWrap:
    static_pub = _load_public(recipient, "recipient")
    eph = ECC.generate(curve="Curve25519")
    eph_pub = eph.public_key().export_key(format="raw")
    shared = DH.key_agreement(static_priv=eph, static_pub=static_pub, kdf=lambda z: z)
    cipher = ChaCha20_Poly1305.new(key=_wrap_key(shared, eph_pub, recipient), nonce=_WRAP_NONCE)
    cipher.update(_wrap_aad(content_hash, recipient, eph_pub))
    wrapped, tag = cipher.encrypt_and_digest(content_key)
    return RecipientWrap(recipient=recipient, ephemeral=eph_pub, wrapped_key=wrapped + tag)


def _unwrap(header: SealedHeader, key: EncryptionKey) -> bytes:
    for wrap in header.recipients:
        if hmac.compare_digest(wrap.recipient, key.public_key):
            break
    else:
        raise NotARecipient(
            f"X25519 key {key.public_key.hex()[:16]}… is not among the {len(header.recipients)} recipient(s) "
            f"of blob {header.content_hash.hex()}"
        )
    shared = key.agree(wrap.ephemeral, "SealedHeader.recipients.ephemeral")
    cipher = ChaCha20_Poly1305.new(key=_wrap_key(shared, wrap.ephemeral, wrap.recipient), nonce=_WRAP_NONCE)
    cipher.update(_wrap_aad(header.content_hash, wrap.recipient, wrap.ephemeral))
    try:
        return cipher.decrypt_and_verify(wrap.wrapped_key[:KEY_SIZE], wrap.wrapped_key[KEY_SIZE:])
    except ValueError:
        blob = header.content_hash.hex()
        raise Tampered(f"the key wrap for this recipient of blob {blob} fails authentication") from None


def _check_recipients(recipients: list[bytes]) -> list[bytes]:
    if not isinstance(recipients, (list, tuple)) or not recipients:
        raise SealedError("seal needs at least one recipient public key")
    unique = list(dict.fromkeys(recipients))
    if len(unique) > MAX_RECIPIENTS:
        raise SealedError(f"{len(unique)} recipients exceed the limit of {MAX_RECIPIENTS}")
    for pub in unique:
        _load_public(pub, "recipient")
    return unique


# -- sealing -----------------------------------------------------------------------


class BytesSink(Protocol):
    """Where sealed bytes go: a binary file, or an in-memory sink such as :func:`seal`'s."""

    def write(self, data: bytes, /) -> object: ...


def seal_stream(
    source: BinaryIO,
    length: int,
    sink: BytesSink,
    recipients: list[bytes],
    *,
    context: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SealedHeader:
    """Seal ``length`` bytes read from ``source``, writing the body to ``sink`` one chunk at a time."""
    unique = _check_recipients(recipients)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealedError(f"chunk_size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if length < 0:
        raise SealedError(f"length must be >= 0, got {length}")
    context_hash = _context_hash(context)
    content_key = os.urandom(KEY_SIZE)
    payload_key, commitment = _derive_payload_keys(content_key, context_hash)
    preamble = Preamble(chunk_size, length, context_hash, commitment)
    pre = preamble.to_bytes()
    digest = hashlib.sha256(pre)
    sink.write(pre)
    remaining = length
    for index in range(preamble.chunk_count):
        take = min(chunk_size, remaining)
        plain = source.read(take)
        if len(plain) != take:
            raise SealedError(f"source ended after {length - remaining + len(plain)} of {length} bytes")
        remaining -= take
        cipher = ChaCha20_Poly1305.new(key=payload_key, nonce=_chunk_nonce(index))
        cipher.update(_chunk_aad(pre, index, index == preamble.chunk_count - 1))
        ciphertext, tag = cipher.encrypt_and_digest(plain)
        digest.update(ciphertext)
        digest.update(tag)
        sink.write(ciphertext)
        sink.write(tag)
    content_hash = digest.digest()
    wraps = tuple(_wrap_for(content_key, content_hash, pub) for pub in unique)
    return SealedHeader(version=SEALED_VERSION, content_hash=content_hash, recipients=wraps)


def seal(
    plaintext: bytes, recipients: list[bytes], *, context: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> SealedBlob:
    """Encrypt ``plaintext`` once, readable by each X25519 public key in ``recipients``."""
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise TypeError(f"plaintext must be bytes, got {type(plaintext).__name__}")
    sink = _Parts()
    source = io.BytesIO(plaintext)
    header = seal_stream(source, len(plaintext), sink, recipients, context=context, chunk_size=chunk_size)
    return SealedBlob(content_hash=header.content_hash, header=header, body=b"".join(sink.parts))


class _Parts(io.RawIOBase):
    """A write-only sink that keeps the pieces and joins once (BytesIO regrows and copies as it fills)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.parts.append(bytes(data))
        return len(data)


def add_recipient(header: SealedHeader, holder_key: EncryptionKey | AccountKey, new_public_key: bytes) -> SealedHeader:
    """A header that also lets ``new_public_key`` open the body; the content hash is unchanged.

    ``holder_key`` is any current recipient (normally the client, re-wrapping
    for drawn verifiers). Adding a key already present returns ``header``.
    """
    holder = _as_key(holder_key)
    _load_public(new_public_key, "new recipient")
    if new_public_key in header.recipient_keys():
        return header
    if len(header.recipients) >= MAX_RECIPIENTS:
        raise SealedError(f"blob {header.content_hash.hex()} already has {MAX_RECIPIENTS} recipients")
    content_key = _unwrap(header, holder)
    wrap = _wrap_for(content_key, header.content_hash, new_public_key)
    return SealedHeader(version=header.version, content_hash=header.content_hash, recipients=(*header.recipients, wrap))


# -- opening -----------------------------------------------------------------------


def _read_exact(body: BinaryIO, size: int, what: str) -> bytes:
    data = body.read(size)
    if len(data) != size:
        raise Truncated(f"body ends inside {what}: wanted {size} bytes, got {len(data)}")
    return data


def iter_open(
    header: SealedHeader | bytes, body: BinaryIO, key: EncryptionKey | AccountKey, *, context: bytes
) -> Iterator[bytes]:
    """Yield plaintext chunk by chunk from a body read from ``body`` (a file or stream).

    A chunk is yielded only after it authenticates, but a later chunk can
    still fail: callers that act on the data must consume the whole iterator
    first (or accept that a tampered tail raises after earlier chunks came out).
    The body's SHA-256 is checked against ``header.content_hash`` at the end.
    """
    if isinstance(header, (bytes, bytearray)):
        header = SealedHeader.from_bytes(bytes(header))
    if not isinstance(header, SealedHeader):
        raise TypeError(f"header must be a SealedHeader or its bytes, got {type(header).__name__}")
    own = _as_key(key)
    pre = body.read(PREAMBLE_SIZE)
    preamble = parse_preamble(pre)
    expected_context = _context_hash(context)
    if not hmac.compare_digest(preamble.context_hash, expected_context):
        raise WrongContext(
            f"blob {header.content_hash.hex()} was sealed for another context (chain, task or purpose), "
            "or its preamble was altered"
        )
    content_key = _unwrap(header, own)
    payload_key, commitment = _derive_payload_keys(content_key, preamble.context_hash)
    if not hmac.compare_digest(commitment, preamble.key_commitment):
        raise Tampered(f"blob {header.content_hash.hex()}: the wrapped key does not match the body's key commitment")
    digest = hashlib.sha256(pre)
    remaining = preamble.length
    last = preamble.chunk_count - 1
    for index in range(preamble.chunk_count):
        take = min(preamble.chunk_size, remaining)
        sealed_chunk = _read_exact(body, take + TAG_SIZE, f"chunk {index} of {preamble.chunk_count}")
        remaining -= take
        digest.update(sealed_chunk)
        cipher = ChaCha20_Poly1305.new(key=payload_key, nonce=_chunk_nonce(index))
        cipher.update(_chunk_aad(pre, index, index == last))
        try:
            plain = cipher.decrypt_and_verify(sealed_chunk[:take], sealed_chunk[take:])
        except ValueError:
            raise Tampered(
                f"blob {header.content_hash.hex()}: chunk {index} of {preamble.chunk_count} fails authentication",
                chunk=index,
            ) from None
        yield plain
    if body.read(1):
        raise MalformedEnvelope("body", f"trailing bytes after the {preamble.chunk_count} declared chunk(s)")
    if not hmac.compare_digest(digest.digest(), header.content_hash):
        raise Tampered(f"body does not hash to the header's content hash {header.content_hash.hex()}")


def open_sealed(blob: SealedBlob, my_key: EncryptionKey | AccountKey, *, context: bytes) -> bytes:
    """The plaintext of ``blob`` for ``my_key``, checked in full before anything is returned."""
    if not isinstance(blob, SealedBlob):
        raise TypeError(f"expected a SealedBlob, got {type(blob).__name__}")
    if blob.content_hash != blob.header.content_hash:
        raise MalformedEnvelope("content_hash", "the blob's content hash differs from its header's")
    return b"".join(iter_open(blob.header, io.BytesIO(blob.body), my_key, context=context))

