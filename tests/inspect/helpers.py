"""Real signed messages of every kind for the inspector tests, built with ledger.devtools."""

from __future__ import annotations

import numpy as np

from kernels.spec import make_spec
from ledger.consensus import CONSENSUS_MESSAGES, Proposal, SignedProposal, VoteMessage, proposal_signing_bytes
from ledger.devtools import DevChain, DevNetwork, make_dev_network, sign_transaction, sign_vote
from ledger.params import Params
from ledger.transactions import Bid, PostTask, SignedTransaction, TaskKind, Transfer, compute_task_id
from ledger.votes import Vote, VoteStep
from p2pgpu.market import (
    BidMessage,
    DeclineNotice,
    DeclineReason,
    encode_market_message,
    make_announce,
    sign_announce,
    sign_bid,
    sign_decline,
)

OTHER_CHAIN = bytes(range(32))


def dev_network(epoch_length: int = 32) -> DevNetwork:
    return make_dev_network(params=Params(epoch_length=epoch_length))


def transfer(net: DevNetwork, *, nonce: int = 0, chain_id: bytes | None = None,
             sender: str = "c0") -> SignedTransaction:
    body = Transfer(sender=net.address(sender), nonce=nonce, fee=1, to=net.address("p0"), amount=5)
    return sign_transaction(net.key(sender), chain_id or net.chain_id, body)


def post_task(net: DevNetwork, *, nonce: int = 0) -> tuple[SignedTransaction, bytes]:
    body = PostTask(sender=net.address("c0"), nonce=nonce, fee=1, kind=int(TaskKind.BATCH), spec_hash=bytes(32),
                    requirements=b"", max_unit_price=500, units=1, bid_window=5, exec_blocks=20, audit_rate_bps=0)
    return sign_transaction(net.key("c0"), net.chain_id, body), compute_task_id(net.address("c0"), nonce)


def vote_bytes(net: DevNetwork, *, height: int = 1, round_: int = 0, step: VoteStep = VoteStep.PREVOTE,
               signer: str = "v0", claimed: str | None = None, chain_id: bytes | None = None) -> bytes:
    key = net.identities[signer].bls
    assert key is not None
    vote = Vote(height=height, round=round_, step=int(step), block_hash=bytes([9]) * 32)
    sv = sign_vote(key, net.address(claimed or signer), chain_id or net.chain_id, vote)
    return CONSENSUS_MESSAGES.encode(VoteMessage(sv))


def proposal_bytes(chain: DevChain, *, signer: bytes | None = None, claimed: bytes | None = None,
                   block_hash: bytes | None = None) -> bytes:
    """A signed proposal for chain.blocks[0] (height 1, round 0); by default from its real proposer."""
    block = chain.blocks[0].block
    proposer = block.header.proposer
    keys = chain.network.validator_keys()
    p = Proposal(height=1, round=0, pol_round=-1, block_hash=block_hash or block.block_hash())
    sig = keys[signer or proposer].sign(proposal_signing_bytes(chain.chain_id, p))
    return CONSENSUS_MESSAGES.encode(SignedProposal(proposal=p, block=block, proposer=claimed or proposer,
                                                    signature=sig))


def announce_bytes(net: DevNetwork, task_id: bytes, *, chain_id: bytes | None = None, deadline: int = 10) -> bytes:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4)).astype(np.float32)
    spec = make_spec("matmul", 1, {}, {"a": a, "b": a})
    ann = make_announce(chain_id=chain_id or net.chain_id, task_id=task_id, client=net.address("c0"),
                        kind=TaskKind.BATCH, spec=spec, max_unit_price=500, units=1, exec_blocks=20,
                        bid_deadline_height=deadline, data_peer=b"peer")
    return encode_market_message(sign_announce(net.key("c0"), ann))


def bid_bytes(net: DevNetwork, task_id: bytes, *, provider: str = "p0", chain_id: bytes | None = None,
              sign_key: str | None = None, sign_chain: bytes | None = None, expiry: int = 10,
              price: int = 100) -> bytes:
    bid = Bid(task_id=task_id, provider=net.address(provider), unit_price=price, est_seconds=3, expiry_height=expiry,
              terms_hash=bytes(32))
    signed = sign_bid(net.key(sign_key or provider), sign_chain or chain_id or net.chain_id, bid)
    return encode_market_message(BidMessage(chain_id=chain_id or net.chain_id, signed=signed))


def decline_bytes(net: DevNetwork, task_id: bytes, *, provider: str = "p1") -> bytes:
    notice = DeclineNotice(chain_id=net.chain_id, task_id=task_id, provider=net.address(provider),
                           reason=int(DeclineReason.BUSY), detail="busy", expiry_height=10)
    return encode_market_message(sign_decline(net.key(provider), notice))
