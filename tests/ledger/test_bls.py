"""BLS backends: agreement with each other and with published vectors, and refusal of bad input.

py_ecc takes ~0.3 s per sign and ~1 s per verify, so its side of every test
uses at most three keys and as few pairings as the property needs; blspy
carries the volume.
"""

from __future__ import annotations

import hashlib
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from py_ecc.bls import G2ProofOfPossession
from py_ecc.bls.hash import i2osp
from py_ecc.bls.point_compression import compress_G1, compress_G2, modular_squareroot_in_FQ2
from py_ecc.optimized_bls12_381 import FQ, FQ2, b2, curve_order, field_modulus, is_inf, multiply

from ledger import bls
from ledger.bls import (
    BACKEND_ENV,
    BLSBackend,
    BLSBackendError,
    BLSInputError,
    BLSKeyError,
    get_backend,
    keygen,
)

from .bls_forgery import split_pair

MSG = b"precommit height=7 round=0"
INFINITY_PK = bytes([0xC0]) + bytes(47)
INFINITY_SIG = bytes([0xC0]) + bytes(95)


def _sk(i: int) -> bytes:
    return keygen(hashlib.sha256(b"test-key-%d" % i).digest())


@pytest.fixture(scope="module")
def native() -> BLSBackend:
    return get_backend("blspy")


@pytest.fixture(scope="module")
def ref() -> BLSBackend:
    return get_backend("py_ecc")


@pytest.fixture(scope="module", params=["blspy", "py_ecc"])
def backend(request: pytest.FixtureRequest) -> BLSBackend:
    return get_backend(request.param)


@pytest.fixture(scope="module")
def keys(native: BLSBackend) -> list[tuple[bytes, bytes]]:
    """(sk, pk) pairs; public keys computed natively (equality with py_ecc is its own test)."""
    return [(sk, native.sk_to_pk(sk)) for sk in (_sk(i) for i in range(3))]


@pytest.fixture(scope="module")
def g1_not_in_subgroup() -> bytes:
    """A compressed G1 point on y^2 = x^3 + 4 outside the r-torsion subgroup.

    Almost every curve point is outside it (the cofactor is ~2^125), so the
    first x >= 1 with a square root will do; x = 0 is skipped because blspy
    rejects an all-zero x for a different reason.
    """
    x = 1
    while True:
        rhs = (x**3 + 4) % field_modulus
        y = pow(rhs, (field_modulus + 1) // 4, field_modulus)
        if y * y % field_modulus == rhs:
            point = (FQ(x), FQ(y), FQ(1))
            if not is_inf(multiply(point, curve_order)):
                return i2osp(compress_G1(point), 48)
        x += 1


@pytest.fixture(scope="module")
def g2_not_in_subgroup() -> bytes:
    """A compressed point on the G2 twist y^2 = x^3 + 4(1 + i) outside the subgroup."""
    k = 1
    while True:
        x = FQ2([k, 1])
        y = modular_squareroot_in_FQ2(x**3 + b2)
        if y is not None:
            point = (x, y, FQ2([1, 0]))
            if not is_inf(multiply(point, curve_order)):
                z1, z2 = compress_G2(point)
                return i2osp(z1, 48) + i2osp(z2, 48)
        k += 1


# --------------------------------------------------------------------------
# Key generation


@pytest.mark.parametrize(
    ("seed_hex", "expected"),
    [
        # EIP-2333 test cases 0 and 1: derive_master_SK is the IETF KeyGen with empty key_info.
        (
            "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e5349553"
            "1f09a6987599d18264c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04",
            6083874454709270928345386274498605044986640685124978867557563392430687146096,
        ),
        (
            "3141592653589793238462643383279502884197169399375105820974944592",
            29757020647961307431480504535336562678282505419141012933316116377660817309383,
        ),
    ],
)
def test_keygen_matches_published_vectors(seed_hex: str, expected: int) -> None:
    assert keygen(bytes.fromhex(seed_hex)) == expected.to_bytes(32, "big")


@given(ikm=st.binary(min_size=32, max_size=80), key_info=st.binary(max_size=16))
@settings(max_examples=25, deadline=None)
def test_keygen_equals_py_ecc_keygen(ikm: bytes, key_info: bytes) -> None:
    expected = G2ProofOfPossession.KeyGen(ikm, key_info)
    assert keygen(ikm, key_info) == expected.to_bytes(32, "big")


def test_keygen_is_the_same_through_both_backends(native: BLSBackend, ref: BLSBackend) -> None:
    ikm = bytes(range(40))
    assert native.keygen(ikm) == ref.keygen(ikm) == keygen(ikm)
    assert keygen(ikm, b"validator") != keygen(ikm)


@pytest.mark.parametrize("ikm", [b"", b"\x01" * 31, "x" * 40, None])
def test_keygen_refuses_short_or_non_bytes_ikm(ikm: object) -> None:
    with pytest.raises(BLSKeyError, match="at least 32 bytes"):
        keygen(ikm)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# The two backends agree byte for byte


def test_public_keys_signatures_and_proofs_are_identical_across_backends(
    native: BLSBackend, ref: BLSBackend
) -> None:
    sk = _sk(100)
    pk = native.sk_to_pk(sk)
    assert len(pk) == bls.PUBLIC_KEY_SIZE
    assert ref.sk_to_pk(sk) == pk
    sig = native.sign(sk, MSG)
    assert len(sig) == bls.SIGNATURE_SIZE
    assert ref.sign(sk, MSG) == sig
    assert ref.pop_prove(sk) == native.pop_prove(sk)


def test_reference_signature_verifies_natively_and_vice_versa(
    native: BLSBackend, ref: BLSBackend, keys: list[tuple[bytes, bytes]]
) -> None:
    (sk0, pk0), (sk1, pk1) = keys[0], keys[1]
    assert native.verify(pk0, MSG, ref.sign(sk0, MSG))
    assert ref.verify(pk1, MSG, native.sign(sk1, MSG))


def test_aggregates_agree_and_cross_verify(
    native: BLSBackend, ref: BLSBackend, keys: list[tuple[bytes, bytes]]
) -> None:
    pks = [pk for _, pk in keys]
    sigs = [native.sign(sk, MSG) for sk, _ in keys]
    aggregate = native.aggregate(sigs)
    assert ref.aggregate(sigs) == aggregate
    assert ref.aggregate_pubkeys(pks) == native.aggregate_pubkeys(pks)
    assert native.fast_aggregate_verify(pks, MSG, aggregate)
    assert ref.fast_aggregate_verify(pks, MSG, aggregate)
    # An aggregate public key verifies the aggregate like a single signer.
    assert native.verify(native.aggregate_pubkeys(pks), MSG, aggregate)


def test_aggregate_verify_over_distinct_messages(
    native: BLSBackend, ref: BLSBackend, keys: list[tuple[bytes, bytes]]
) -> None:
    pairs = keys[:2]
    msgs = [b"vote-a", b"vote-b"]
    aggregate = native.aggregate([native.sign(sk, m) for (sk, _), m in zip(pairs, msgs)])
    pks = [pk for _, pk in pairs]
    assert native.aggregate_verify(pks, msgs, aggregate)
    assert ref.aggregate_verify(pks, msgs, aggregate)
    assert not native.aggregate_verify(pks, list(reversed(msgs)), aggregate)
    assert not native.aggregate_verify(pks, msgs[:1], aggregate)
    assert not native.aggregate_verify([], [], aggregate)


def test_many_signer_aggregate_natively(native: BLSBackend) -> None:
    sks = [_sk(1000 + i) for i in range(64)]
    pks = [native.sk_to_pk(sk) for sk in sks]
    sigs = [native.sign(sk, MSG) for sk in sks]
    aggregate = native.aggregate(sigs)
    assert native.fast_aggregate_verify(pks, MSG, aggregate)
    assert not native.fast_aggregate_verify(pks[:-1], MSG, aggregate)
    assert not native.fast_aggregate_verify(pks, MSG + b"!", aggregate)


# --------------------------------------------------------------------------
# Batch verification: a random linear combination, which a split pair cannot pass


def test_batch_verify_passes_honest_signatures(backend: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    native = get_backend("blspy")
    pks = [pk for _, pk in keys]
    sigs = [native.sign(sk, MSG) for sk, _ in keys]
    assert backend.batch_verify(pks, MSG, sigs)
    assert backend.batch_verify(pks[:1], MSG, sigs[:1])
    assert not backend.batch_verify(pks, MSG + b"!", sigs)
    assert not backend.batch_verify(pks[1:] + pks[:1], MSG, sigs)  # right signatures, wrong signers


def test_batch_verify_refuses_a_split_forged_pair(backend: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    """``S_A + P`` and ``S_B - P`` sum to a valid aggregate; weighted by secret random scalars they do not."""
    native = get_backend("blspy")
    (sk_a, pk_a), (sk_b, pk_b), (sk_p, _) = keys
    sig_a, sig_b = native.sign(sk_a, MSG), native.sign(sk_b, MSG)
    forged = split_pair(backend.name, sig_a, sig_b, native.sign(sk_p, b"some other message"))
    # the plain aggregate check is fooled
    assert backend.fast_aggregate_verify([pk_a, pk_b], MSG, backend.aggregate(list(forged)))
    assert not backend.batch_verify([pk_a, pk_b], MSG, list(forged))
    # with an honest signature in the batch too
    assert not backend.batch_verify([pk_a, pk_b, pk_a], MSG, [*forged, sig_a])


def test_batch_verify_needs_its_random_weights(
    monkeypatch: pytest.MonkeyPatch, native: BLSBackend, keys: list[tuple[bytes, bytes]]
) -> None:
    """With every weight forced to 1 the check is a plain aggregate, and the split pair passes: the secret
    randomness from ``secrets`` is what refuses it."""
    (sk_a, pk_a), (sk_b, pk_b), (sk_p, _) = keys
    forged = split_pair("blspy", native.sign(sk_a, MSG), native.sign(sk_b, MSG), native.sign(sk_p, b"elsewhere"))
    monkeypatch.setattr(bls.secrets, "randbelow", lambda bound: 0)
    assert native.batch_verify([pk_a, pk_b], MSG, list(forged))


def test_batch_weights_are_one_then_fresh_64_bit_randoms() -> None:
    first, second = bls._batch_scalars(64), bls._batch_scalars(64)
    assert first[0] == second[0] == 1
    assert all(1 <= r < 2**bls.BATCH_SCALAR_BITS for r in first[1:] + second[1:])
    assert first[1:] != second[1:]  # fresh per call (equal with probability 2^-4032)
    assert max(first[1:]).bit_length() > 56  # uniform over 64 bits, not small (fails with probability ~2^-500)


@given(pairs=st.lists(st.tuples(st.integers(-(10**30), 10**30), st.integers(1, 2**64 - 1)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_weighted_sum_is_the_linear_combination(pairs: list[tuple[int, int]]) -> None:
    """Double-and-add over integers (a group under +) must give exactly sum(s * p)."""
    points, scalars = [p for p, _ in pairs], [s for _, s in pairs]
    assert bls._weighted_sum(points, scalars, 0, lambda x, y: x + y) == sum(p * s for p, s in pairs)


def test_batch_verify_refuses_malformed_input_without_raising(
    backend: BLSBackend, keys: list[tuple[bytes, bytes]], g2_not_in_subgroup: bytes
) -> None:
    native = get_backend("blspy")
    pks = [pk for _, pk in keys[:2]]
    sigs = [native.sign(sk, MSG) for sk, _ in keys[:2]]
    assert not backend.batch_verify([], MSG, [])
    assert not backend.batch_verify(pks, MSG, sigs[:1])  # lengths differ
    assert not backend.batch_verify(pks, "text", sigs)  # type: ignore[arg-type]
    assert not backend.batch_verify(pks[0], MSG, sigs[0])  # type: ignore[arg-type]
    assert not backend.batch_verify(pks, MSG, [sigs[0], g2_not_in_subgroup])
    assert not backend.batch_verify(pks, MSG, [sigs[0], INFINITY_SIG])
    assert not backend.batch_verify([pks[0], INFINITY_PK], MSG, sigs)
    assert not backend.batch_verify(pks, MSG, [sigs[0], sigs[1][:-1]])


# --------------------------------------------------------------------------
# Both backends refuse bad signatures and bad points


def test_rejects_wrong_message_and_wrong_key(backend: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    (sk0, pk0), (_, pk1) = keys[0], keys[1]
    sig = get_backend("blspy").sign(sk0, MSG)
    assert not backend.verify(pk0, MSG + b"x", sig)
    assert not backend.verify(pk1, MSG, sig)


def test_aggregate_with_one_bad_signature_fails(backend: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    native = get_backend("blspy")
    pks = [pk for _, pk in keys]
    sigs = [native.sign(sk, MSG) for sk, _ in keys]
    sigs[1] = native.sign(keys[1][0], b"something else")
    assert not backend.fast_aggregate_verify(pks, MSG, backend.aggregate(sigs))


def test_pop_verifies_and_refuses_a_proof_for_another_key(
    backend: BLSBackend, keys: list[tuple[bytes, bytes]]
) -> None:
    (sk0, pk0), (_, pk1) = keys[0], keys[1]
    proof = get_backend("blspy").pop_prove(sk0)
    assert backend.pop_verify(pk0, proof)
    assert not backend.pop_verify(pk1, proof)


def test_pop_is_domain_separated_from_signatures(native: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    sk, pk = keys[0]
    # A plain signature over the public key is not a proof, and a proof is not a signature.
    assert not native.pop_verify(pk, native.sign(sk, pk))
    assert not native.verify(pk, pk, native.pop_prove(sk))


def test_rejects_public_key_outside_the_subgroup(
    backend: BLSBackend, g1_not_in_subgroup: bytes, keys: list[tuple[bytes, bytes]]
) -> None:
    sk, pk = keys[0]
    sig = get_backend("blspy").sign(sk, MSG)
    assert not backend.key_validate(g1_not_in_subgroup)
    assert not backend.verify(g1_not_in_subgroup, MSG, sig)
    assert not backend.fast_aggregate_verify([pk, g1_not_in_subgroup], MSG, sig)
    assert not backend.pop_verify(g1_not_in_subgroup, sig)
    with pytest.raises(BLSInputError, match="public key 1"):
        backend.aggregate_pubkeys([pk, g1_not_in_subgroup])


def test_rejects_signature_outside_the_subgroup(
    backend: BLSBackend, g2_not_in_subgroup: bytes, keys: list[tuple[bytes, bytes]]
) -> None:
    sk, pk = keys[0]
    assert not backend.verify(pk, MSG, g2_not_in_subgroup)
    assert not backend.fast_aggregate_verify([pk], MSG, g2_not_in_subgroup)
    assert not backend.pop_verify(pk, g2_not_in_subgroup)
    with pytest.raises(BLSInputError, match="signature 1 .*subgroup"):
        backend.aggregate([get_backend("blspy").sign(sk, MSG), g2_not_in_subgroup])


def test_rejects_infinity_public_key(backend: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    _, pk = keys[0]
    assert not backend.key_validate(INFINITY_PK)
    # The identity key with the identity signature satisfies the pairing
    # equation for every message; KeyValidate must stop it first.
    assert not backend.verify(INFINITY_PK, MSG, INFINITY_SIG)
    assert not backend.fast_aggregate_verify([INFINITY_PK], MSG, INFINITY_SIG)
    assert not backend.aggregate_verify([INFINITY_PK], [MSG], INFINITY_SIG)
    assert not backend.pop_verify(INFINITY_PK, INFINITY_SIG)
    assert backend.key_validate(pk)


GARBAGE_PKS = [
    b"",
    bytes(48),  # compression flag missing
    b"\xff" * 48,  # flags 111 and x >= p
    bytes([0xC0]) + bytes(46) + b"\x01",  # infinity flag with a non-zero body
    bytes([0xA0]) + bytes(47),  # a-flag with x = 0
    b"\x8f" + b"\xff" * 47,  # x >= p
    b"\x00" * 47,
    b"\x00" * 49,
    "not bytes",
    None,
    bytearray(48),
]


@pytest.mark.parametrize("bad_pk", GARBAGE_PKS, ids=range(len(GARBAGE_PKS)))
def test_garbage_public_keys_are_refused_without_raising(
    backend: BLSBackend, bad_pk: object, keys: list[tuple[bytes, bytes]]
) -> None:
    sk, pk = keys[0]
    sig = get_backend("blspy").sign(sk, MSG)
    assert backend.key_validate(bad_pk) is False  # type: ignore[arg-type]
    assert backend.verify(bad_pk, MSG, sig) is False  # type: ignore[arg-type]
    assert backend.fast_aggregate_verify([pk, bad_pk], MSG, sig) is False  # type: ignore[list-item]
    assert backend.pop_verify(bad_pk, sig) is False  # type: ignore[arg-type]


GARBAGE_SIGS = [
    b"",
    bytes(96),
    b"\xff" * 96,
    bytes([0xC0]) + bytes(94) + b"\x01",
    b"\x8f" + b"\xff" * 95,
    b"\x00" * 95,
    b"\x00" * 97,
    None,
]


@pytest.mark.parametrize("bad_sig", GARBAGE_SIGS, ids=range(len(GARBAGE_SIGS)))
def test_garbage_signatures_are_refused_without_raising(
    backend: BLSBackend, bad_sig: object, keys: list[tuple[bytes, bytes]]
) -> None:
    _, pk = keys[0]
    assert backend.verify(pk, MSG, bad_sig) is False  # type: ignore[arg-type]
    assert backend.fast_aggregate_verify([pk], MSG, bad_sig) is False  # type: ignore[arg-type]
    assert backend.aggregate_verify([pk], [MSG], bad_sig) is False  # type: ignore[arg-type]
    assert backend.pop_verify(pk, bad_sig) is False  # type: ignore[arg-type]
    with pytest.raises(BLSInputError):
        backend.aggregate([bad_sig])  # type: ignore[list-item]


def test_malformed_lists_and_messages_are_refused(backend: BLSBackend, keys: list[tuple[bytes, bytes]]) -> None:
    sk, pk = keys[0]
    sig = get_backend("blspy").sign(sk, MSG)
    assert not backend.fast_aggregate_verify([], MSG, sig)
    assert not backend.fast_aggregate_verify(pk, MSG, sig)  # type: ignore[arg-type]
    assert not backend.verify(pk, "text", sig)  # type: ignore[arg-type]
    assert not backend.aggregate_verify([pk], [MSG, MSG], sig)
    assert not backend.aggregate_verify([pk], ["text"], sig)  # type: ignore[list-item]
    with pytest.raises(BLSInputError, match="no signatures"):
        backend.aggregate([])
    with pytest.raises(BLSInputError, match="no public keys"):
        backend.aggregate_pubkeys([])


@given(pk=st.binary(min_size=48, max_size=48), sig=st.binary(min_size=96, max_size=96), msg=st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_random_bytes_never_raise_natively(pk: bytes, sig: bytes, msg: bytes) -> None:
    native = get_backend("blspy")
    assert native.verify(pk, msg, sig) in (True, False)
    assert native.fast_aggregate_verify([pk, pk], msg, sig) in (True, False)
    assert native.batch_verify([pk, pk], msg, [sig, sig]) in (True, False)
    assert native.pop_verify(pk, sig) in (True, False)
    assert native.key_validate(pk) in (True, False)


# --------------------------------------------------------------------------
# Secret keys


BAD_SECRET_KEYS = [
    bytes(32),  # zero
    bls.CURVE_ORDER.to_bytes(32, "big"),  # r itself
    b"\xff" * 32,
    b"\x01" * 31,
    b"\x01" * 33,
    "0" * 32,
    None,
]


@pytest.mark.parametrize("bad_sk", BAD_SECRET_KEYS, ids=range(len(BAD_SECRET_KEYS)))
def test_malformed_secret_keys_raise_bls_key_error(backend: BLSBackend, bad_sk: object) -> None:
    for operation in (
        lambda: backend.sign(bad_sk, MSG),  # type: ignore[arg-type]
        lambda: backend.sk_to_pk(bad_sk),  # type: ignore[arg-type]
        lambda: backend.pop_prove(bad_sk),  # type: ignore[arg-type]
    ):
        with pytest.raises(BLSKeyError, match="secret key"):
            operation()


def test_largest_valid_secret_key_signs(native: BLSBackend) -> None:
    sk = (bls.CURVE_ORDER - 1).to_bytes(32, "big")
    assert native.verify(native.sk_to_pk(sk), MSG, native.sign(sk, MSG))


# --------------------------------------------------------------------------
# Backend selection


def test_default_backend_is_the_native_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert get_backend().name == "blspy"
    assert bls.available_backends() == ("blspy", "py_ecc")


def test_environment_forces_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "py_ecc")
    assert get_backend().name == "py_ecc"
    assert get_backend("blspy").name == "blspy"  # an explicit name wins over the environment
    monkeypatch.setenv(BACKEND_ENV, "")
    assert get_backend().name == "blspy"


def test_unknown_backend_name_lists_the_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BLSBackendError, match="unknown BLS backend 'milagro'; valid names: blspy, py_ecc"):
        get_backend("milagro")
    monkeypatch.setenv(BACKEND_ENV, "BLST")
    with pytest.raises(BLSBackendError, match="'BLST'"):
        get_backend()


def test_backends_satisfy_the_protocol(backend: BLSBackend) -> None:
    assert isinstance(backend, BLSBackend)
    assert get_backend(backend.name) is get_backend(backend.name)  # constructed once, not per call


def test_falls_back_to_the_reference_without_blspy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "blspy", None)  # makes `import blspy` raise ImportError
    bls._backend_named.cache_clear()
    try:
        assert get_backend().name == "py_ecc"
        assert bls.available_backends() == ("py_ecc",)
        with pytest.raises(BLSBackendError, match="BLS backend 'blspy' is not available"):
            get_backend("blspy")
    finally:
        bls._backend_named.cache_clear()


def test_reference_backend_leaves_the_recursion_limit_alone() -> None:
    """py_ecc raises the limit to 100,000 on import; a node must keep Python's guard on deep input."""
    import subprocess
    import sys

    code = (
        "import sys; before = sys.getrecursionlimit()\n"
        "from ledger.bls import get_backend; get_backend('py_ecc')\n"
        "assert sys.getrecursionlimit() == before, (before, sys.getrecursionlimit())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
