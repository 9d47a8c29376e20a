from __future__ import annotations

from dataclasses import dataclass

import pytest

from ledger.blocks import Block
from ledger.consensus import (
    ConsensusConfig,
    ConsensusEngine,
    Proposal,
    SignatureVerifier,
    SignedProposal,
    ValidatorSigner,
    VoteMessage,
    proposal_signing_bytes,
)
from ledger.devtools import DevNetwork, make_dev_network, sign_vote
from ledger.genesis import initial_state
from ledger.params import Params
from ledger.signer_guard import SignerGuard
from ledger.state import State
from ledger.transition import build_block, committee_for_height
from ledger.votes import Vote, VoteStep

PARAMS = Params(epoch_length=4, committee_size=16, jail_period=1000, min_validator_stake=1_000)


@pytest.fixture(scope="session")
def net4() -> DevNetwork:
    return make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=(), clients=("c0", "c1"), params=PARAMS)


@pytest.fixture(scope="session")
def genesis4(net4: DevNetwork) -> State:
    return initial_state(net4.genesis)


@dataclass
class Harness:
    """Engines of one height driven by hand: the test plays the network."""

    net: DevNetwork
    state: State
    verifier: SignatureVerifier

    def name_of(self, address: bytes) -> str:
        return self.net.by_address(address).name

    def proposer(self, round_: int, height: int = 1) -> str:
        from ledger.committee import compute_proposer

        return self.name_of(compute_proposer(committee_for_height(self.state, height), height, round_))

    def engine(self, name: str, *, guard: SignerGuard | None = None, config: ConsensusConfig | None = None) -> ConsensusEngine:
        ident = self.net.identities[name]
        guard = guard if guard is not None else SignerGuard(self.state.chain_id)
        signer = ValidatorSigner(ident.address, ident.bls, guard)  # type: ignore[arg-type]
        return ConsensusEngine(config or ConsensusConfig(), self.state, None, signer=signer, verifier=self.verifier)

    def block(self, round_: int, *, timestamp_ms: int = 0) -> Block:
        proposer = self.net.address(self.proposer(round_))
        block, _, _ = build_block(self.state, [], proposer=proposer, round_=round_, timestamp_ms=timestamp_ms)
        return block

    def proposal(self, round_: int, block: Block, pol_round: int = -1) -> SignedProposal:
        name = self.proposer(round_)
        ident = self.net.identities[name]
        p = Proposal(height=1, round=round_, pol_round=pol_round, block_hash=block.block_hash())
        sig = ident.bls.sign(proposal_signing_bytes(self.state.chain_id, p))  # type: ignore[union-attr]
        return SignedProposal(proposal=p, block=block, proposer=ident.address, signature=sig)

    def vote(self, name: str, round_: int, step: VoteStep, block_hash: bytes, height: int = 1) -> VoteMessage:
        ident = self.net.identities[name]
        vote = Vote(height=height, round=round_, step=step, block_hash=block_hash)
        return VoteMessage(sign_vote(ident.bls, ident.address, self.state.chain_id, vote))  # type: ignore[arg-type]


@pytest.fixture
def harness(net4: DevNetwork, genesis4: State) -> Harness:
    return Harness(net4, genesis4, SignatureVerifier())
