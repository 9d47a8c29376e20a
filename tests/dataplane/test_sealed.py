"""Sealed payloads: who can open them, and every way a body or header can be damaged."""

from __future__ import annotations

import io
import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.keys import AccountKey
from p2pgpu.sealed import (
    PREAMBLE_SIZE,
    EncryptionKey,
    MalformedEnvelope,
    NotARecipient,
    Purpose,
    SealedBlob,
    SealedError,
    SealedHeader,
    Tampered,
    Truncated,
    WrongContext,
    add_recipient,
    encryption_public_key,
    iter_open,
    open_sealed,
    parse_preamble,
    seal,
    task_context,
)

CHAIN = bytes(range(32))
TASK = b"\x07" * 32
CTX = task_context(CHAIN, TASK, Purpose.INPUT)
MIB = 1 << 20

client = AccountKey.from_seed(b"\x01" * 32)
provider = AccountKey.from_seed(b"\x02" * 32)
verifier = AccountKey.from_seed(b"\x03" * 32)
stranger = AccountKey.from_seed(b"\x04" * 32)


def pub(key: AccountKey) -> bytes:
    return encryption_public_key(key)


def with_body(blob: SealedBlob, body: bytes) -> SealedBlob:
    return SealedBlob(blob.content_hash, blob.header, body)


def test_encryption_key_is_derived_from_the_account_seed_and_is_standard_x25519() -> None:
    first = EncryptionKey.from_account_key(client)
    again = EncryptionKey.from_account_key(AccountKey.from_seed(client.seed))
    assert first == again and first.public_key == pub(client)
    assert pub(client) != pub(provider) and pub(client) != client.public_key
    # pycryptodome's X25519 agrees with OpenSSL's (RFC 7748), so any implementation can interoperate.
    other = X25519PrivateKey.generate()
    other_pub = other.public_key().public_bytes_raw()
    assert first.agree(other_pub, "test") == other.exchange(X25519PublicKey.from_public_bytes(pub(client)))
    assert client.seed.hex() not in repr(first) and first.secret.hex() not in repr(first)


@pytest.mark.parametrize("size", [0, 1, 1000, MIB, 3 * MIB + MIB // 2])
def test_every_recipient_opens_and_nobody_else(size: int) -> None:
    data = os.urandom(size)
    blob = seal(data, [pub(client), pub(provider)], context=CTX)
    for key in (client, provider, EncryptionKey.from_account_key(provider)):
        assert open_sealed(blob, key, context=CTX) == data
    with pytest.raises(NotARecipient, match="not among the 2 recipient"):
        open_sealed(blob, stranger, context=CTX)
    assert blob.content_hash == blob.header.content_hash
    assert len(blob.body) == PREAMBLE_SIZE + size + 16 * max(1, -(-size // MIB))


def test_chunks_are_plain_rfc8439_so_another_library_opens_them() -> None:
    data = os.urandom(100)
    blob = seal(data, [pub(client)], context=CTX, chunk_size=64)
    # Recover the payload key the way a second implementation would: unwrap, then HKDF.
    from p2pgpu import sealed as s

    content_key = s._unwrap(blob.header, EncryptionKey.from_account_key(client))
    pre = blob.body[:PREAMBLE_SIZE]
    payload_key, _ = s._derive_payload_keys(content_key, parse_preamble(pre).context_hash)
    aead = ChaCha20Poly1305(payload_key)
    chunk0 = blob.body[PREAMBLE_SIZE : PREAMBLE_SIZE + 64 + 16]
    chunk1 = blob.body[PREAMBLE_SIZE + 80 :]
    nonce = lambda i: i.to_bytes(8, "big") + bytes(4)  # noqa: E731
    assert aead.decrypt(nonce(0), chunk0, pre + (0).to_bytes(8, "big") + b"\x00") == data[:64]
    assert aead.decrypt(nonce(1), chunk1, pre + (1).to_bytes(8, "big") + b"\x01") == data[64:]


def test_tampered_chunk_is_named_by_index() -> None:
    data = os.urandom(1000)
    blob = seal(data, [pub(client)], context=CTX, chunk_size=256)
    body = bytearray(blob.body)
    body[PREAMBLE_SIZE + 2 * (256 + 16) + 5] ^= 0x01  # inside chunk 2
    with pytest.raises(Tampered, match="chunk 2 of 4") as info:
        open_sealed(with_body(blob, bytes(body)), client, context=CTX)
    assert info.value.chunk == 2
    # a flipped tag byte of the last chunk
    body = bytearray(blob.body)
    body[-1] ^= 0x80
    with pytest.raises(Tampered, match="chunk 3 of 4"):
        open_sealed(with_body(blob, bytes(body)), client, context=CTX)


def test_tampered_header_wrap_and_key_commitment_are_detected() -> None:
    blob = seal(b"secret input", [pub(client), pub(provider)], context=CTX)
    wrap = blob.header.recipients[1]
    bad_wrap = type(wrap)(wrap.recipient, wrap.ephemeral, bytes([wrap.wrapped_key[0] ^ 1]) + wrap.wrapped_key[1:])
    header = SealedHeader(blob.header.version, blob.content_hash, (blob.header.recipients[0], bad_wrap))
    with pytest.raises(Tampered, match="key wrap") as info:
        open_sealed(SealedBlob(blob.content_hash, header, blob.body), provider, context=CTX)
    assert info.value.chunk is None
    assert open_sealed(SealedBlob(blob.content_hash, header, blob.body), client, context=CTX) == b"secret input"
    # A wrap lifted onto another blob's header fails: the wrap is bound to the content hash.
    other = seal(b"another", [pub(provider)], context=CTX)
    moved = SealedHeader(1, other.content_hash, blob.header.recipients)
    with pytest.raises(Tampered, match="key wrap"):
        open_sealed(SealedBlob(other.content_hash, moved, other.body), client, context=CTX)
    # The right key for a different body (same context): the key commitment catches it first.
    body_for_other_key = seal(b"secret input", [pub(client)], context=CTX).body
    with pytest.raises(Tampered, match="key commitment"):
        open_sealed(with_body(blob, body_for_other_key), client, context=CTX)


def test_truncated_body_at_any_point_is_truncated() -> None:
    blob = seal(os.urandom(700), [pub(client)], context=CTX, chunk_size=256)
    for cut in (0, 10, PREAMBLE_SIZE, PREAMBLE_SIZE + 100, PREAMBLE_SIZE + 272, len(blob.body) - 1):
        with pytest.raises(Truncated):
            open_sealed(with_body(blob, blob.body[:cut]), client, context=CTX)
    with pytest.raises(MalformedEnvelope, match="body: trailing bytes"):
        open_sealed(with_body(blob, blob.body + b"x"), client, context=CTX)


def test_dropping_whole_trailing_chunks_with_a_rewritten_length_is_still_caught() -> None:
    blob = seal(os.urandom(512), [pub(client)], context=CTX, chunk_size=256)
    pre = bytearray(blob.body[:PREAMBLE_SIZE])
    pre[9:17] = (256).to_bytes(8, "big")  # claim one chunk only
    forged = bytes(pre) + blob.body[PREAMBLE_SIZE : PREAMBLE_SIZE + 272]
    with pytest.raises(Tampered, match="chunk 0"):
        open_sealed(with_body(blob, forged), client, context=CTX)


def test_reordered_chunks_fail_at_the_first_moved_chunk() -> None:
    blob = seal(os.urandom(768), [pub(client)], context=CTX, chunk_size=256)
    size = 256 + 16
    chunks = [blob.body[PREAMBLE_SIZE + i * size : PREAMBLE_SIZE + (i + 1) * size] for i in range(3)]
    swapped = blob.body[:PREAMBLE_SIZE] + chunks[0] + chunks[2] + chunks[1]
    with pytest.raises(Tampered, match="chunk 1 of 3"):
        open_sealed(with_body(blob, swapped), client, context=CTX)


def test_ciphertext_for_one_task_cannot_be_opened_as_another() -> None:
    blob = seal(b"input of task 7", [pub(provider)], context=CTX)
    for other in (
        task_context(CHAIN, b"\x08" * 32, Purpose.INPUT),
        task_context(b"\xff" * 32, TASK, Purpose.INPUT),
        task_context(CHAIN, TASK, Purpose.RESULT),
    ):
        with pytest.raises(WrongContext, match="another context"):
            open_sealed(blob, provider, context=other)
    # Forging the context hash in the preamble does not help: every chunk's AAD covers it.
    forged_ctx = task_context(CHAIN, b"\x08" * 32, Purpose.INPUT)
    from p2pgpu.sealed import _context_hash

    pre = bytearray(blob.body[:PREAMBLE_SIZE])
    pre[17:49] = _context_hash(forged_ctx)
    with pytest.raises(Tampered):
        open_sealed(with_body(blob, bytes(pre) + blob.body[PREAMBLE_SIZE:]), provider, context=forged_ctx)


def test_adding_a_verifier_later_keeps_the_content_hash() -> None:
    data = os.urandom(3000)
    blob = seal(data, [pub(client), pub(provider)], context=CTX, chunk_size=1024)
    with pytest.raises(NotARecipient):
        open_sealed(blob, verifier, context=CTX)
    header = add_recipient(blob.header, client, pub(verifier))
    assert header.content_hash == blob.content_hash and len(header.recipients) == 3
    assert add_recipient(header, client, pub(verifier)) is header  # idempotent
    reopened = SealedBlob(blob.content_hash, SealedHeader.from_bytes(header.to_bytes()), blob.body)
    assert open_sealed(reopened, verifier, context=CTX) == data
    assert open_sealed(reopened, provider, context=CTX) == data
    with pytest.raises(NotARecipient):
        add_recipient(blob.header, stranger, pub(verifier))


def test_malformed_headers_and_preambles_name_the_field() -> None:
    blob = seal(b"x", [pub(client)], context=CTX)
    with pytest.raises(MalformedEnvelope, match="SealedHeader.content_hash") as info:
        SealedHeader.from_bytes(msgpack.packb([1, blob.content_hash[:31], []], use_bin_type=True))
    assert info.value.field.startswith("SealedHeader.content_hash")
    with pytest.raises(MalformedEnvelope, match="version"):
        SealedHeader.from_bytes(SealedHeader(2, blob.content_hash, blob.header.recipients).to_bytes())
    with pytest.raises(MalformedEnvelope):
        SealedHeader.from_bytes(b"\x93\x01")
    with pytest.raises(MalformedEnvelope, match="body.magic"):
        open_sealed(with_body(blob, b"XXXX" + blob.body[4:]), client, context=CTX)
    body = bytearray(blob.body)
    body[5:9] = (0).to_bytes(4, "big")
    with pytest.raises(MalformedEnvelope, match="body.chunk_size"):
        open_sealed(with_body(blob, bytes(body)), client, context=CTX)
    with pytest.raises(MalformedEnvelope, match="recipient"):
        seal(b"x", [b"\x00" * 32], context=CTX)  # a low-order point is refused
    with pytest.raises(SealedError, match="at least one recipient"):
        seal(b"x", [], context=CTX)


def test_streaming_open_yields_chunks_from_a_file(tmp_path) -> None:
    data = os.urandom(5000)
    blob = seal(data, [pub(client)], context=CTX, chunk_size=1024)
    path = tmp_path / "body"
    path.write_bytes(blob.body)
    with path.open("rb") as body:
        parts = list(iter_open(blob.header.to_bytes(), body, client, context=CTX))
    assert [len(p) for p in parts] == [1024] * 4 + [904] and b"".join(parts) == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), chunk_size=st.integers(16, 1500), extra=st.integers(0, 2))
def test_round_trip_property(data: bytes, chunk_size: int, extra: int) -> None:
    keys = [EncryptionKey.generate() for _ in range(1 + extra)]
    blob = seal(data, [k.public_key for k in keys], context=CTX, chunk_size=chunk_size)
    for key in keys:
        assert open_sealed(blob, key, context=CTX) == data
    assert blob.content_hash == __import__("hashlib").sha256(blob.body).digest()
    assert io.BytesIO(blob.body).read(4) == b"P2GS"
