"""MessageDecoder: every message kind decodes with its summary; each kind of bad input gets its reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ledger.blocks import FinalizedBlock
from ledger.consensus import CONSENSUS_MESSAGES, VoteMessage
from ledger.devtools import DevChain, certify, sign_vote
from ledger.state import Committee
from ledger.transactions import Assign, CommitResult
from ledger.transition import committee_for_height
from ledger.votes import Vote, VoteStep
from p2pgpu.inspect.decode import TOPIC_LIMITS, Decoded, Invalid, MessageDecoder, TopicKind

from .helpers import (
    OTHER_CHAIN,
    announce_bytes,
    bid_bytes,
    decline_bytes,
    dev_network,
    post_task,
    proposal_bytes,
    transfer,
    vote_bytes,
)


@pytest.fixture(scope="module")
def net():
    return dev_network()


@pytest.fixture
def decoder(net):
    return MessageDecoder(net.genesis)


@pytest.fixture(scope="module")
def chain(net):
    dev = DevChain(net)
    dev.produce()
    return dev


def decoded(result) -> Decoded:
    assert isinstance(result, Decoded), result
    return result


def invalid(result) -> Invalid:
    assert isinstance(result, Invalid), result
    return result


# ------------------------------------------------------------------ tx


def test_transfer_decodes_with_sender_nonce_and_type(net, decoder):
    stx = transfer(net, nonce=3)
    d = decoded(decoder.decode(TopicKind.TX, stx.encode()))
    assert d.kind == "Transfer"
    assert d.fields["tx"] == "Transfer"
    assert d.fields["sender"] == net.address("c0").hex()
    assert d.fields["nonce"] == 3
    assert d.fields["amount"] == 5
    assert d.fields["tx_hash"] == stx.tx_hash().hex()
    assert "task_id" not in d.fields


def test_post_task_carries_the_task_id_it_creates(net, decoder):
    stx, task_id = post_task(net, nonce=7)
    d = decoded(decoder.decode(TopicKind.TX, stx.encode()))
    assert d.kind == "PostTask"
    assert d.fields["task_id"] == task_id.hex()


def test_task_transactions_name_their_task(net, decoder):
    from ledger.devtools import sign_transaction

    task = bytes([5]) * 32
    body = CommitResult(sender=net.address("p0"), nonce=0, fee=1, task_id=task, result_hash=bytes(32), exec_ms=12)
    d = decoded(decoder.decode(TopicKind.TX, sign_transaction(net.key("p0"), net.chain_id, body).encode()))
    assert (d.kind, d.fields["task_id"]) == ("CommitResult", task.hex())


def test_tx_signed_for_another_chain_is_a_bad_signature(net, decoder):
    bad = invalid(decoder.decode(TopicKind.TX, transfer(net, chain_id=OTHER_CHAIN).encode()))
    assert bad.reason == "bad-signature"
    assert "Transfer" in bad.detail and bad.blame


def test_tx_with_a_swapped_public_key_is_refused(net, decoder):
    stx = replace(transfer(net), public_key=net.key("p1").public_key)
    bad = invalid(decoder.decode(TopicKind.TX, stx.encode()))
    assert bad.reason == "bad-signature"
    assert "does not belong to the sender" in bad.detail


def test_garbage_tx_is_malformed_with_the_codec_path(decoder):
    bad = invalid(decoder.decode(TopicKind.TX, b"\x93\x01\x02\x03"))
    assert bad.reason == "malformed"
    assert bad.detail


@pytest.mark.parametrize("kind", list(TopicKind))
def test_oversized_payloads_are_refused_before_parsing(decoder, kind):
    bad = invalid(decoder.decode(kind, b"\x00" * (TOPIC_LIMITS[kind] + 1)))
    assert bad.reason == "oversized"
    assert str(TOPIC_LIMITS[kind]) in bad.detail


# ------------------------------------------------------------------ consensus


def test_vote_from_a_committee_member_verifies(net, decoder):
    d = decoded(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, height=1, round_=2, step=VoteStep.PRECOMMIT)))
    assert d.kind == "VoteMessage"
    assert d.fields == {"height": 1, "round": 2, "step": "precommit", "validator": net.address("v0").hex(),
                        "block_hash": (bytes([9]) * 32).hex(), "verified": True}


def test_vote_signed_by_another_key_is_a_bad_signature(net, decoder):
    bad = invalid(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, signer="v1", claimed="v0")))
    assert bad.reason == "bad-signature"


def test_vote_for_another_chain_is_a_bad_signature(net, decoder):
    bad = invalid(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, chain_id=OTHER_CHAIN)))
    assert bad.reason == "bad-signature"


def test_vote_from_outside_the_committee_is_refused(net, decoder):
    key = net.identities["v0"].bls
    sv = sign_vote(key, net.address("p0"), net.chain_id, Vote(height=1, round=0, step=1, block_hash=bytes(32)))
    bad = invalid(decoder.decode(TopicKind.CONSENSUS, CONSENSUS_MESSAGES.encode(VoteMessage(sv))))
    assert bad.reason == "not-in-committee"


def test_vote_with_an_unknown_step_is_refused(net, decoder):
    key = net.identities["v0"].bls
    sv = sign_vote(key, net.address("v0"), net.chain_id, Vote(height=1, round=0, step=7, block_hash=bytes(32)))
    assert invalid(decoder.decode(TopicKind.CONSENSUS, CONSENSUS_MESSAGES.encode(VoteMessage(sv)))).reason == "bad-step"


def test_vote_from_an_epoch_without_a_known_committee_is_shown_unverified(net, decoder):
    d = decoded(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, height=32 * 5 + 1)))
    assert d.verified is False
    assert d.fields["verified"] is False
    assert "epoch 5" in str(d.fields["note"])


def test_proposal_by_the_expected_proposer_verifies_and_lists_task_txs(chain, decoder):
    d = decoded(decoder.decode(TopicKind.CONSENSUS, proposal_bytes(chain)))
    assert d.kind == "SignedProposal"
    assert (d.fields["height"], d.fields["round"], d.fields["verified"]) == (1, 0, True)
    assert d.fields["tasks"] == []


def test_proposal_from_the_wrong_validator_is_refused(chain, decoder):
    proposer = chain.blocks[0].block.header.proposer
    other = next(a for a in chain.network.validator_keys() if a != proposer)
    bad = invalid(decoder.decode(TopicKind.CONSENSUS, proposal_bytes(chain, signer=other, claimed=other)))
    assert bad.reason == "wrong-proposer"


def test_proposal_with_a_forged_signature_is_refused(chain, decoder):
    proposer = chain.blocks[0].block.header.proposer
    other = next(a for a in chain.network.validator_keys() if a != proposer)
    bad = invalid(decoder.decode(TopicKind.CONSENSUS, proposal_bytes(chain, signer=other)))
    assert bad.reason == "bad-signature"


def test_proposal_naming_another_block_is_refused(chain, decoder):
    bad = invalid(decoder.decode(TopicKind.CONSENSUS, proposal_bytes(chain, block_hash=bytes([1]) * 32)))
    assert bad.reason == "block-mismatch"


def test_garbage_consensus_message_is_malformed(decoder):
    assert invalid(decoder.decode(TopicKind.CONSENSUS, b"\xc1")).reason == "malformed"


# ------------------------------------------------------------------ blocks and committees


def test_finalized_block_with_a_quorum_certificate_verifies(chain, decoder):
    fb = chain.blocks[0]
    d = decoded(decoder.decode(TopicKind.BLOCK, fb.encode()))
    assert d.kind == "FinalizedBlock"
    assert d.fields["height"] == 1 and d.fields["verified"] is True
    assert d.fields["block_hash"] == fb.block.block_hash().hex()
    assert decoder.certified_height == 1


def test_block_certified_by_too_few_signers_is_refused(chain, decoder):
    fb = chain.blocks[0]
    committee = committee_for_height(chain.state, 1)
    one = [committee.members[0].address]
    cert = certify(committee, chain.network.validator_keys(), chain.chain_id, 1, 0, fb.block.block_hash(), one)
    bad = invalid(decoder.decode(TopicKind.BLOCK, FinalizedBlock(block=fb.block, certificate=cert).encode()))
    assert bad.reason == "bad-certificate"
    assert "2/3" in bad.detail
    assert decoder.certified_height == 0


def test_block_of_another_chain_is_refused(chain):
    other = MessageDecoder(dev_network(epoch_length=31).genesis)
    assert invalid(other.decode(TopicKind.BLOCK, chain.blocks[0].encode())).reason == "bad-certificate"


def test_committees_are_followed_across_epochs_and_task_txs_are_listed(net):
    net = dev_network(epoch_length=2)
    dev = DevChain(net)
    dev.produce()
    dev.produce()  # ends epoch 0: names epoch 1's committee
    stx, task_id = post_task(net, nonce=dev.nonce("c0"))
    dev.produce([stx])
    decoder = MessageDecoder(net.genesis)
    assert decoder.committee_for(3) is None
    for fb in dev.blocks[:2]:
        decoded(decoder.decode(TopicKind.BLOCK, fb.encode()))
    assert isinstance(decoder.committee_for(3), Committee)
    d = decoded(decoder.decode(TopicKind.BLOCK, dev.blocks[2].encode()))
    assert d.verified and d.fields["tasks"] == [[task_id.hex(), "PostTask"]]
    vote = decoded(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, height=4)))
    assert vote.verified


def test_learn_blocks_lets_a_late_joiner_verify_later_epochs():
    net = dev_network(epoch_length=2)
    dev = DevChain(net)
    for _ in range(3):
        dev.produce()
    decoder = MessageDecoder(net.genesis)
    assert decoded(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, height=4))).verified is False
    assert decoder.learn_blocks(dev.blocks) == 3
    assert decoded(decoder.decode(TopicKind.CONSENSUS, vote_bytes(net, height=4))).verified is True


# ------------------------------------------------------------------ market


def test_announce_bid_and_decline_decode_with_their_task(net, decoder):
    task = bytes([3]) * 32
    a = decoded(decoder.decode(TopicKind.TASK, announce_bytes(net, task)))
    assert (a.kind, a.fields["task_id"], a.fields["kernel"]) == ("SignedAnnounce", task.hex(), "matmul")
    b = decoded(decoder.decode(TopicKind.BID, bid_bytes(net, task)))
    assert (b.kind, b.fields["unit_price"], b.fields["provider"]) == ("BidMessage", 100, net.address("p0").hex())
    d = decoded(decoder.decode(TopicKind.BID, decline_bytes(net, task)))
    assert (d.kind, d.fields["decline"]) == ("SignedDecline", "busy")


def test_market_message_for_another_chain_is_refused(net, decoder):
    bad = invalid(decoder.decode(TopicKind.BID, bid_bytes(net, bytes(32), chain_id=OTHER_CHAIN)))
    assert (bad.reason, bad.blame) == ("wrong-chain", True)


def test_market_message_signed_by_someone_else_is_refused(net, decoder):
    bad = invalid(decoder.decode(TopicKind.BID, bid_bytes(net, bytes(32), sign_key="p1")))
    assert bad.reason == "signer-mismatch"


def test_market_message_signed_for_another_chain_is_a_bad_signature(net, decoder):
    bad = invalid(decoder.decode(TopicKind.BID, bid_bytes(net, bytes(32), sign_chain=OTHER_CHAIN)))
    assert (bad.reason, bad.blame) == ("bad-signature", True)


def test_bid_on_the_task_topic_is_refused(net, decoder):
    assert invalid(decoder.decode(TopicKind.TASK, bid_bytes(net, bytes(32)))).reason == "wrong-topic"


def test_replayed_bid_is_not_blamed_on_the_forwarder(net, decoder):
    task = bytes([4]) * 32
    decoded(decoder.decode(TopicKind.BID, bid_bytes(net, task)))
    again = invalid(decoder.decode(TopicKind.BID, bid_bytes(net, task, price=99)))  # same auction, other bytes
    assert (again.reason, again.blame) == ("replayed", False)
    decoded(decoder.decode(TopicKind.BID, bid_bytes(net, task, expiry=11)))  # a reopened task's fresh auction


def test_expired_bid_is_refused_once_the_chain_height_is_known(chain, net):
    decoder = MessageDecoder(net.genesis)
    decoded(decoder.decode(TopicKind.BLOCK, chain.blocks[0].encode()))  # height 1 is now certified
    bad = invalid(decoder.decode(TopicKind.BID, bid_bytes(net, bytes(32), expiry=0)))
    assert (bad.reason, bad.blame) == ("expired", False)


def test_assign_names_provider_and_price(net, decoder):
    from ledger.devtools import sign_transaction
    from ledger.transactions import Bid
    from p2pgpu.market import sign_bid

    task = bytes([6]) * 32
    signed = sign_bid(net.key("p0"), net.chain_id, Bid(task_id=task, provider=net.address("p0"), unit_price=42,
                                                         est_seconds=1, expiry_height=9, terms_hash=bytes(32)))
    body = Assign(sender=net.address("c0"), nonce=1, fee=1, task_id=task, bid=signed)
    d = decoded(decoder.decode(TopicKind.TX, sign_transaction(net.key("c0"), net.chain_id, body).encode()))
    assert (d.fields["provider"], d.fields["unit_price"], d.fields["task_id"]) == (
        net.address("p0").hex(), 42, task.hex())


def _advert_bytes(net, *, sequence: int, provider: str = "p0", sign_key: str | None = None) -> bytes:
    from p2pgpu.market.messages import ModelAdvert, WarmModel, encode_market_message, sign_advert

    advert = ModelAdvert(chain_id=net.chain_id, provider=net.address(provider), sequence=sequence, expiry_height=50,
                         free_slots=1, models=(WarmModel(model_id=b"\x07" * 32, unit_price=40),))
    return encode_market_message(sign_advert(net.key(sign_key or provider), advert))


def test_the_advert_topic_is_decoded_and_checked_like_a_client_does(net, decoder):
    d = decoded(decoder.decode(TopicKind.ADVERT, _advert_bytes(net, sequence=5)))
    assert d.kind == "SignedAdvert"
    assert (d.fields["provider"], d.fields["free_slots"], d.fields["models"]) == (
        net.address("p0").hex(), 1, "0707070707070707@40")
    assert invalid(decoder.decode(TopicKind.ADVERT, _advert_bytes(net, sequence=5))).reason == "replayed"
    assert invalid(decoder.decode(TopicKind.ADVERT, _advert_bytes(net, sequence=6, sign_key="p1"))).reason == \
        "signer-mismatch"
    assert invalid(decoder.decode(TopicKind.ADVERT, b"\x00junk")).blame


def test_a_tx_batch_shows_its_types_senders_and_the_tasks_it_touches(net, decoder):
    from p2pgpu.txgossip import encode_tx_batches

    post, task_id = post_task(net, nonce=7)
    txs = [transfer(net, nonce=3), post, transfer(net, nonce=4)]
    (message,) = encode_tx_batches([t.encode() for t in txs])
    d = decoded(decoder.decode(TopicKind.TX, message))
    assert d.kind == "TxBatch"
    assert d.fields["count"] == 3 and d.fields["txs"] == "PostTask x1, Transfer x2"
    assert d.fields["senders"] == [net.address("c0").hex()]
    assert d.fields["tasks"] == [[task_id.hex(), "PostTask"]]


def test_one_forged_transaction_makes_its_batch_a_bad_signature_naming_it(net, decoder):
    from p2pgpu.txgossip import encode_tx_batches

    forged = replace(transfer(net, nonce=1), public_key=net.key("p1").public_key)
    (message,) = encode_tx_batches([transfer(net, nonce=0).encode(), forged.encode()])
    bad = invalid(decoder.decode(TopicKind.TX, message))
    assert bad.reason == "bad-signature" and bad.detail.startswith("transaction 1 of the batch")
