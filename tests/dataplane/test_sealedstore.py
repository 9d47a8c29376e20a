"""Sealed task data at rest: only sealed bodies in the store, an index that survives restarts, one-wrap headers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ledger.keys import AccountKey
from p2pgpu.blobstore import BlobStore, InvalidHash
from p2pgpu.sealed import (
    EncryptionKey,
    MalformedEnvelope,
    NotARecipient,
    Purpose,
    SealedError,
    Tampered,
    Truncated,
    WrongContext,
    context_id,
    iter_open,
    task_context,
)
from p2pgpu.sealedstore import BadRecipientKey, PlaintextMismatch, SealedStore, rejection_reason

CHAIN = bytes(range(32))
TASK_A, TASK_B = b"\x0a" * 32, b"\x0b" * 32
INPUT_A = task_context(CHAIN, TASK_A, Purpose.INPUT)
INPUT_B = task_context(CHAIN, TASK_B, Purpose.INPUT)
RESULT_A = task_context(CHAIN, TASK_A, Purpose.RESULT)
HOLDER = EncryptionKey.from_account_key(AccountKey.from_seed(b"\x61" * 32))
FETCHER = EncryptionKey.from_account_key(AccountKey.from_seed(b"\x62" * 32))
STRANGER = EncryptionKey.from_account_key(AccountKey.from_seed(b"\x63" * 32))


def sealed_store(root: Path, key: EncryptionKey = HOLDER) -> SealedStore:
    return SealedStore(BlobStore(root), key)


def open_as(store: SealedStore, key: EncryptionKey, header, context: bytes) -> bytes:
    with store.store.open_read(header.content_hash) as reader:
        return b"".join(iter_open(header, reader, key, context=context))  # type: ignore[arg-type]


def test_the_store_holds_only_the_sealed_body_and_the_ref_survives_a_restart(tmp_path: Path) -> None:
    plaintext = b"secret input rows " * 200_000  # 3.6 MB: several 1 MiB chunks
    holder = sealed_store(tmp_path)
    ref = holder.seal_put(plaintext, context=INPUT_A)
    assert ref.name == hashlib.sha256(plaintext).digest() and ref.context_id == context_id(INPUT_A)
    assert ref.header.recipient_keys() == [HOLDER.public_key]
    assert holder.store.hashes() == [ref.content_hash] and not holder.store.has(ref.name)
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"secret input rows" not in on_disk, "no plaintext anywhere under the store's root"

    again = holder.seal_put(plaintext, context=INPUT_A)
    assert again == ref and holder.store.hashes() == [ref.content_hash], "sealed once per (name, context)"

    reopened = sealed_store(tmp_path)
    found = reopened.lookup(ref.name, ref.context_id)
    assert found == ref
    assert reopened.open_ref(found, context=INPUT_A) == plaintext
    assert reopened.lookup(ref.name, context_id(RESULT_A)) is None


def test_the_same_plaintext_in_two_tasks_is_two_bodies(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    a = holder.seal_put(b"shared weights", context=INPUT_A)
    b = holder.seal_put(b"shared weights", context=INPUT_B)
    assert a.name == b.name and a.content_hash != b.content_hash
    with pytest.raises(WrongContext):
        holder.open_stored(a.name, a.header, context=INPUT_B)


def test_wrap_for_gives_the_fetcher_one_wrap_and_nobody_else_a_way_in(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    plaintext = os.urandom(50_000)
    ref = holder.seal_put(plaintext, context=INPUT_A)
    header = holder.wrap_for(ref, FETCHER.public_key)
    assert header.content_hash == ref.content_hash
    assert header.recipient_keys() == [FETCHER.public_key], "the holder's own wrap is not handed out"
    assert holder.lookup(ref.name, ref.context_id) == ref, "the stored header is unchanged"
    assert open_as(holder, FETCHER, header, INPUT_A) == plaintext
    with pytest.raises(NotARecipient):
        open_as(holder, STRANGER, header, INPUT_A)
    with pytest.raises(NotARecipient):
        open_as(holder, HOLDER, header, INPUT_A)


@pytest.mark.parametrize("bad", [bytes(32), b"\x01" + bytes(31), b"\x05" * 31])
def test_an_unusable_recipient_key_is_its_own_error(tmp_path: Path, bad: bytes) -> None:
    holder = sealed_store(tmp_path)
    ref = holder.seal_put(b"x", context=INPUT_A)
    with pytest.raises(BadRecipientKey, match="new recipient"):
        holder.wrap_for(ref, bad)


def test_a_stored_header_that_does_not_open_is_not_a_bad_key(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    ref = holder.seal_put(b"x", context=INPUT_A)
    other = SealedStore(holder.store, STRANGER)
    with pytest.raises(NotARecipient):
        other.wrap_for(ref, FETCHER.public_key)


def test_open_stored_checks_the_plaintext_against_its_name(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    ref = holder.seal_put(b"what the provider computed", context=RESULT_A)
    claimed = hashlib.sha256(b"what the provider committed").digest()
    with pytest.raises(PlaintextMismatch, match=claimed.hex()):
        holder.open_stored(claimed, ref.header, context=RESULT_A)
    with pytest.raises(InvalidHash):
        holder.lookup(b"short", ref.context_id)


def test_a_fetcher_records_its_header_and_reopens_the_body_without_the_holder(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path / "holder")
    ref = holder.seal_put(b"model weights", context=INPUT_A)
    header = holder.wrap_for(ref, FETCHER.public_key)
    fetcher = sealed_store(tmp_path / "fetcher", FETCHER)
    fetcher.store.put(holder.store.get(ref.content_hash))
    fetcher.record(ref.name, ref.context_id, header)
    reopened = sealed_store(tmp_path / "fetcher", FETCHER)
    mine = reopened.lookup(ref.name, ref.context_id)
    assert mine is not None and reopened.open_ref(mine, context=INPUT_A) == b"model weights"


def test_a_ref_without_its_body_or_damaged_on_disk_counts_as_absent(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    gone = holder.seal_put(b"evicted", context=INPUT_A)
    holder.store.delete(gone.content_hash)
    assert holder.lookup(gone.name, gone.context_id) is None

    damaged = holder.seal_put(b"damaged ref", context=INPUT_A)
    path = tmp_path / "sealed" / f"{damaged.name.hex()}.{damaged.context_id.hex()}"
    path.write_bytes(path.read_bytes()[:40])
    reopened = sealed_store(tmp_path)
    assert reopened.lookup(damaged.name, damaged.context_id) is None
    assert not path.exists() and path.with_name(path.name + ".damaged").exists(), "kept for inspection"

    misfiled = holder.seal_put(b"other blob", context=INPUT_A)
    (tmp_path / "sealed" / f"{damaged.name.hex()}.{damaged.context_id.hex()}").write_bytes(
        (tmp_path / "sealed" / f"{misfiled.name.hex()}.{misfiled.context_id.hex()}").read_bytes())
    assert sealed_store(tmp_path).lookup(damaged.name, damaged.context_id) is None


def test_discard_body_spares_pinned_bodies(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    ref = holder.seal_put(b"pinned", context=INPUT_A)
    holder.store.pin(ref.content_hash)
    assert holder.discard_body(ref.content_hash) is False and holder.store.has(ref.content_hash)
    holder.store.unpin(ref.content_hash)
    assert holder.discard_body(ref.content_hash) is True and not holder.store.has(ref.content_hash)


def test_rejection_reasons_name_each_failure() -> None:
    cases = {
        NotARecipient("x"): "not_a_recipient",
        Tampered("x", chunk=0): "tampered",
        Truncated("x"): "truncated",
        WrongContext("x"): "wrong_context",
        MalformedEnvelope("body", "x"): "malformed",
        PlaintextMismatch("x"): "plaintext_mismatch",
        BadRecipientKey("x"): "bad_recipient_key",
        SealedError("x"): "sealed_error",
    }
    for exc, reason in cases.items():
        assert rejection_reason(exc) == reason


def test_known_answers_from_memory_what_seal_put_would_return_at_once(tmp_path: Path) -> None:
    holder = sealed_store(tmp_path)
    plaintext = b"a result" * 1000
    name = hashlib.sha256(plaintext).digest()
    assert holder.known(name, context_id(RESULT_A)) is None  # nothing sealed yet
    ref = holder.seal_put(plaintext, context=RESULT_A)
    assert holder.known(name, context_id(RESULT_A)) == ref
    assert holder.known(name, context_id(INPUT_A)) is None  # another context
    reopened = sealed_store(tmp_path)
    assert reopened.known(name, context_id(RESULT_A)) is None  # on disk only: seal_put's lookup reads it
    assert reopened.seal_put(plaintext, context=RESULT_A) == ref
    assert reopened.known(name, context_id(RESULT_A)) == ref
    # a fetched copy is known by the header kept for it, which holds the fetcher's own wrap
    fetcher = sealed_store(tmp_path / "fetcher", FETCHER)
    with holder.store.open_read(ref.content_hash) as reader:
        fetcher.store.put_stream([reader.read()])
    fetcher.record(name, context_id(RESULT_A), holder.wrap_for(ref, FETCHER.public_key))
    assert fetcher.known(name, context_id(RESULT_A)) is not None
    # a header without our wrap is not a copy we could open: not known
    stranger = sealed_store(tmp_path / "stranger", STRANGER)
    with holder.store.open_read(ref.content_hash) as reader:
        stranger.store.put_stream([reader.read()])
    stranger.record(name, context_id(RESULT_A), holder.wrap_for(ref, FETCHER.public_key))
    assert stranger.known(name, context_id(RESULT_A)) is None
    reopened.discard_body(ref.content_hash)
    assert reopened.known(name, context_id(RESULT_A)) is None  # its body gone: seal again
