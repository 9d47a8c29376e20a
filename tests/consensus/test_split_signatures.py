"""A split forged pair: two vote signatures that are each invalid but whose sum is valid.

Given real signatures ``S_A`` and ``S_B`` on one message, anyone can send
``S_A + P`` and ``S_B - P`` for any G2 point ``P``: neither verifies on its
own, yet their aggregate is ``S_A + S_B``, so a plain FastAggregateVerify of
the batch passes. The verifier must refuse both, cache neither as valid, and
the engine must charge whoever relayed them.
"""

from __future__ import annotations

import pytest

from ledger.bls import get_backend
from ledger.committee import vote_signing_bytes
from ledger.consensus import MessageReceived, RejectMessage, SignatureVerifier, VoteMessage
from ledger.devtools import dev_validator_key
from ledger.votes import NIL_BLOCK, SignedVote, Vote, VoteStep

from ..ledger.bls_forgery import split_pair
from .conftest import Harness
from .test_engine import bystander, others, sent_votes

MSG = b"p2pgpu test: one vote message signed by two validators"


@pytest.mark.parametrize("backend_name", ["blspy", "py_ecc"])
def test_a_split_forged_pair_is_refused_and_neither_half_is_cached(backend_name: str) -> None:
    backend = get_backend(backend_name)
    native = get_backend("blspy")  # signing is the same bytes in both; the native one is quick
    a, b, other = (dev_validator_key(n) for n in ("split-a", "split-b", "split-p"))
    sig_a, sig_b = native.sign(a.secret, MSG), native.sign(b.secret, MSG)
    offset = native.sign(other.secret, b"any point of the subgroup will do")
    forged_a, forged_b = split_pair(backend_name, sig_a, sig_b, offset)
    # the precondition of the attack: each half is invalid, their aggregate is the honest one
    assert forged_a != sig_a and forged_b != sig_b
    assert native.aggregate([forged_a, forged_b]) == native.aggregate([sig_a, sig_b])
    assert native.fast_aggregate_verify([a.public_key, b.public_key], MSG, native.aggregate([forged_a, forged_b]))
    assert not native.verify(a.public_key, MSG, forged_a) and not native.verify(b.public_key, MSG, forged_b)

    verifier = SignatureVerifier(backend)
    items = [(a.public_key, forged_a), (b.public_key, forged_b)]
    assert verifier.verify_same_message(MSG, items) == [False, False]
    assert not any(verifier._cache.get((pk, MSG, sig)) for pk, sig in items)
    # asked again (or one at a time, as the conflict path does), still refused
    assert verifier.verify(a.public_key, MSG, forged_a) is False
    assert verifier.verify(b.public_key, MSG, forged_b) is False


def test_a_split_forged_pair_does_not_make_a_polka_and_its_relayer_is_charged(harness: Harness) -> None:
    """Our own prevote plus the two halves would be 3 of 4: a polka, if the halves passed as a batch."""
    me = bystander(harness, 1)
    e = harness.engine(me)
    e.start()
    block = harness.block(0)
    deliver_out = e.handle(MessageReceived(harness.proposal(0, block), "proposer"))
    assert sent_votes(deliver_out, VoteStep.PREVOTE) == [block.block_hash()]
    a, b, _c = others(harness, me)
    va = harness.vote(a, 0, VoteStep.PREVOTE, block.block_hash()).signed
    vb = harness.vote(b, 0, VoteStep.PREVOTE, block.block_hash()).signed
    offset = harness.vote(a, 7, VoteStep.PREVOTE, NIL_BLOCK).signed.signature  # a real G2 point, another message
    forged_a, forged_b = split_pair("blspy", va.signature, vb.signature, offset)
    fa = SignedVote(vote=va.vote, validator=va.validator, signature=forged_a)
    fb = SignedVote(vote=vb.vote, validator=vb.validator, signature=forged_b)

    out = e.handle(MessageReceived(VoteMessage(fa), "mallory"))
    out += e.handle(MessageReceived(VoteMessage(fb), "mallory"))

    assert sent_votes(out, VoteStep.PRECOMMIT) == []
    assert e.locked_round == -1
    assert [(x.peer, x.reason) for x in out if isinstance(x, RejectMessage)] == [("mallory", "bad_signature")] * 2
    msg = vote_signing_bytes(harness.state.chain_id, va.vote)
    for name, sig in ((a, forged_a), (b, forged_b)):
        pk = harness.net.identities[name].bls.public_key  # type: ignore[union-attr]
        assert harness.verifier._cache.get((pk, msg, sig)) is not True
    # the real votes still count: with them the polka forms
    out = e.handle(MessageReceived(VoteMessage(va), "honest"))
    out += e.handle(MessageReceived(VoteMessage(vb), "honest"))
    assert sent_votes(out, VoteStep.PRECOMMIT) == [block.block_hash()]
    assert not [x for x in out if isinstance(x, RejectMessage)]


def test_honest_votes_on_one_message_still_pass_as_a_batch(harness: Harness) -> None:
    """The batch check is still one check for many votes when all are good (no fallback to singles)."""
    verifier = SignatureVerifier()
    names = [f"batch{i}" for i in range(8)]
    keys = [dev_validator_key(n) for n in names]
    vote = Vote(height=3, round=0, step=VoteStep.PRECOMMIT, block_hash=b"\x09" * 32)
    msg = vote_signing_bytes(harness.state.chain_id, vote)
    items = [(k.public_key, k.sign(msg)) for k in keys]
    assert verifier.verify_same_message(msg, items) == [True] * len(items)
    assert verifier.single_checks == 0 and verifier.aggregate_checks == 1 and verifier.aggregate_failures == 0
    assert all(verifier._cache[(pk, msg, sig)] is True for pk, sig in items)
