"""Domain-separated signing bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.keys import AccountKey, verify_ed25519
from ledger.signing import (
    CHAIN_ID_SIZE,
    SIGNING_PREFIX,
    Domain,
    SigningBytesError,
    parse_signing_bytes,
    signing_bytes,
)

CHAIN_A = b"\xaa" * 32
CHAIN_B = b"\xbb" * 32

domains = st.sampled_from(list(Domain))
chains = st.binary(min_size=CHAIN_ID_SIZE, max_size=CHAIN_ID_SIZE)
payloads = st.binary(max_size=80)


def test_layout() -> None:
    assert signing_bytes(Domain.VOTE, CHAIN_A, b"\x01\x02") == SIGNING_PREFIX + b"\x04vote" + CHAIN_A + b"\x01\x02"


def test_every_domain_gives_different_bytes() -> None:
    outputs = {signing_bytes(d, CHAIN_A, b"same payload") for d in Domain}
    assert len(outputs) == len(Domain)


def test_chain_id_changes_the_bytes() -> None:
    assert signing_bytes(Domain.TX, CHAIN_A, b"p") != signing_bytes(Domain.TX, CHAIN_B, b"p")


@given(d1=domains, c1=chains, p1=payloads, d2=domains, c2=chains, p2=payloads)
def test_distinct_triples_never_collide(d1: Domain, c1: bytes, p1: bytes, d2: Domain, c2: bytes, p2: bytes) -> None:
    same_triple = (d1, c1, p1) == (d2, c2, p2)
    assert (signing_bytes(d1, c1, p1) == signing_bytes(d2, c2, p2)) == same_triple


@given(domain=domains, chain=chains, payload=payloads)
def test_parse_inverts_signing_bytes(domain: Domain, chain: bytes, payload: bytes) -> None:
    assert parse_signing_bytes(signing_bytes(domain, chain, payload)) == (domain, chain, payload)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "prefix is missing"),
        (b"noise-libp2p-static-key:" + bytes(32), "prefix is missing"),
        (SIGNING_PREFIX, "before the domain tag"),
        (SIGNING_PREFIX + b"\x03zzz" + CHAIN_A, "unknown signing domain tag"),
        (SIGNING_PREFIX + b"\x02tx" + CHAIN_A[:31], "inside the chain id"),
    ],
)
def test_parse_refuses_foreign_bytes(data: bytes, problem: str) -> None:
    with pytest.raises(SigningBytesError, match=problem):
        parse_signing_bytes(data)


@pytest.mark.parametrize(
    ("domain", "chain", "payload", "problem"),
    [
        ("tx", CHAIN_A, b"", "domain must be a Domain"),
        (Domain.TX, CHAIN_A[:31], b"", "chain_id must be 32 bytes"),
        (Domain.TX, CHAIN_A.hex(), b"", "chain_id must be 32 bytes"),
        (Domain.TX, CHAIN_A, "payload", "payload must be bytes"),
    ],
)
def test_bad_arguments_are_refused(domain: object, chain: object, payload: object, problem: str) -> None:
    with pytest.raises(SigningBytesError, match=problem):
        signing_bytes(domain, chain, payload)  # type: ignore[arg-type]


def test_tags_fit_the_length_byte_and_are_stable() -> None:
    assert all(0 < len(d.value) < 256 for d in Domain)
    assert {d.name: d.value for d in Domain} == {
        "TX": b"tx",
        "BID": b"bid",
        "ANNOUNCE": b"announce",
        "PROPOSAL": b"proposal",
        "VOTE": b"vote",
        "RECEIPT": b"receipt",
        "STREAM_OUTPUT": b"stream-output",
        "DECLINE": b"decline",
        "POP": b"pop",
        "STATUS": b"status",
    }


def test_a_signature_for_one_domain_or_chain_does_not_verify_for_another() -> None:
    key = AccountKey.generate()
    sig = key.sign(signing_bytes(Domain.BID, CHAIN_A, b"price=5"))
    assert verify_ed25519(key.public_key, signing_bytes(Domain.BID, CHAIN_A, b"price=5"), sig)
    assert not verify_ed25519(key.public_key, signing_bytes(Domain.TX, CHAIN_A, b"price=5"), sig)
    assert not verify_ed25519(key.public_key, signing_bytes(Domain.BID, CHAIN_B, b"price=5"), sig)
