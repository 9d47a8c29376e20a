"""Account and validator keys."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import bls
from ledger.keys import (
    ADDRESS_SIZE,
    AccountKey,
    KeyMaterialError,
    ValidatorKey,
    address_of,
    verify_ed25519,
)

# RFC 8032 section 7.1, test 2: one-byte message.
RFC8032_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
RFC8032_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
RFC8032_MESSAGE = bytes.fromhex("72")
RFC8032_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


def test_rfc8032_vector() -> None:
    key = AccountKey.from_seed(RFC8032_SEED)
    assert key.public_key == RFC8032_PUBLIC
    assert key.sign(RFC8032_MESSAGE) == RFC8032_SIGNATURE
    assert verify_ed25519(RFC8032_PUBLIC, RFC8032_MESSAGE, RFC8032_SIGNATURE)


def test_address_is_sha256_prefix_of_public_key() -> None:
    key = AccountKey.from_seed(RFC8032_SEED)
    assert key.address == hashlib.sha256(RFC8032_PUBLIC).digest()[:20]
    assert address_of(key.public_key) == key.address
    assert len(key.address) == ADDRESS_SIZE


def test_generate_gives_distinct_working_keys() -> None:
    a, b = AccountKey.generate(), AccountKey.generate()
    assert a != b and a.address != b.address
    sig = a.sign(b"transfer")
    assert len(sig) == 64
    assert a.verify(b"transfer", sig)
    assert not b.verify(b"transfer", sig)
    assert not verify_ed25519(a.public_key, b"transfer!", sig)


def test_seed_round_trips_and_64_byte_form_is_checked() -> None:
    key = AccountKey.generate()
    assert AccountKey.from_seed(key.seed) == key
    assert AccountKey.from_private_bytes(key.seed) == key
    assert AccountKey.from_private_bytes(key.seed + key.public_key) == key
    other = AccountKey.generate()
    with pytest.raises(KeyMaterialError, match="public half does not match"):
        AccountKey.from_private_bytes(key.seed + other.public_key)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, b"\x01" * 63, "x" * 32, None])
def test_bad_private_key_material_is_refused(bad: object) -> None:
    with pytest.raises(KeyMaterialError, match="Ed25519"):
        AccountKey.from_private_bytes(bad)  # type: ignore[arg-type]
    with pytest.raises(KeyMaterialError, match="seed is 32 bytes"):
        AccountKey.from_seed(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "x" * 32])
def test_address_of_refuses_wrong_sized_keys(bad: object) -> None:
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        address_of(bad)  # type: ignore[arg-type]


def test_repr_hides_the_secret() -> None:
    key = AccountKey.from_seed(RFC8032_SEED)
    assert RFC8032_SEED.hex() not in repr(key)
    assert key.address.hex() in repr(key)


@pytest.mark.parametrize(
    ("pubkey", "msg", "sig"),
    [
        (RFC8032_PUBLIC[:31], RFC8032_MESSAGE, RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, RFC8032_MESSAGE, RFC8032_SIGNATURE[:63]),
        (RFC8032_PUBLIC, RFC8032_MESSAGE, RFC8032_SIGNATURE + b"\x00"),
        (b"\xff" * 32, RFC8032_MESSAGE, RFC8032_SIGNATURE),  # not a curve point
        (bytes(32), RFC8032_MESSAGE, bytes(64)),  # small-order key, zero signature
        (RFC8032_PUBLIC, "r", RFC8032_SIGNATURE),
        (None, RFC8032_MESSAGE, RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, RFC8032_MESSAGE, None),
        # S >= L (non-canonical): add the group order to S.
        (
            RFC8032_PUBLIC,
            RFC8032_MESSAGE,
            RFC8032_SIGNATURE[:32]
            + (
                int.from_bytes(RFC8032_SIGNATURE[32:], "little") + 2**252 + 27742317777372353535851937790883648493
            ).to_bytes(32, "little"),
        ),
    ],
)
def test_verify_ed25519_refuses_malformed_input_without_raising(pubkey: object, msg: object, sig: object) -> None:
    assert verify_ed25519(pubkey, msg, sig) is False  # type: ignore[arg-type]


@given(pubkey=st.binary(max_size=40), msg=st.binary(max_size=40), sig=st.binary(max_size=70))
@settings(max_examples=200, deadline=None)
def test_verify_ed25519_never_raises(pubkey: bytes, msg: bytes, sig: bytes) -> None:
    assert verify_ed25519(pubkey, msg, sig) is False


def test_libp2p_identity_is_the_account_key() -> None:
    from libp2p.peer.id import ID

    key = AccountKey.from_seed(RFC8032_SEED)
    pair = key.libp2p_key_pair()
    assert pair.public_key.to_bytes() == key.public_key
    # Both sides sign the same bytes identically (Ed25519 is deterministic).
    assert pair.private_key.sign(b"hello") == key.sign(b"hello")
    peer_id = ID.from_pubkey(pair.public_key)
    assert peer_id == ID.from_pubkey(AccountKey.from_seed(RFC8032_SEED).libp2p_key_pair().public_key)
    assert peer_id != ID.from_pubkey(AccountKey.generate().libp2p_key_pair().public_key)


def test_validator_key_signs_and_proves_possession() -> None:
    key = ValidatorKey.from_ikm(b"\x42" * 32)
    backend = bls.get_backend()
    assert key.public_key == backend.sk_to_pk(key.secret)
    assert backend.verify(key.public_key, b"vote", key.sign(b"vote"))
    assert backend.pop_verify(key.public_key, key.proof_of_possession())
    assert key == ValidatorKey.from_secret(key.secret)
    assert key.secret.hex() not in repr(key)


def test_validator_key_is_the_same_under_either_backend() -> None:
    native = ValidatorKey.from_ikm(b"\x43" * 32, bls.get_backend("blspy"))
    ref = ValidatorKey.from_ikm(b"\x43" * 32, bls.get_backend("py_ecc"))
    assert native == ref
    assert native.public_key == ref.public_key


def test_validator_key_refuses_bad_secret_and_mismatched_public_key() -> None:
    with pytest.raises(bls.BLSKeyError):
        ValidatorKey.from_secret(bytes(32))
    key = ValidatorKey.generate()
    other = ValidatorKey.generate()
    with pytest.raises(KeyMaterialError, match="does not belong"):
        ValidatorKey(secret=key.secret, public_key=other.public_key, backend=key.backend)
