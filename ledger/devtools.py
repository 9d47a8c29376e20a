"""Deterministic keys, genesis and signed objects for devnets, tests and benchmarks.

Everything here derives keys from names (``sha256(name)``), so a devnet,
a test and a benchmark all build the same chain from the same names. Never
use these keys for value: anyone can derive them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ledger.blocks import Block, FinalizedBlock
from ledger.bls import get_backend
from ledger.committee import compute_proposer, vote_signing_bytes
from ledger.exceptions import InvalidTransaction
from ledger.genesis import Genesis, GenesisAccount, GenesisProvider, GenesisValidator, initial_state
from ledger.keys import AccountKey, ValidatorKey
from ledger.params import Params
from ledger.state import Committee, State
from ledger.transactions import (  # sign_bid, sign_receipt, sign_stream_output: re-exported for tests and tools
    SignedTransaction,
    Transaction,
    registration_message,
    sign_bid,
    sign_receipt,
    sign_stream_output,
)
from ledger.transition import (  # sign_transaction: re-exported for tests and tools
    apply_block, build_block, committee_for_height, sign_transaction,
)
from ledger.votes import CommitCertificate, SignedVote, Vote, VoteStep, bitfield_from_indices


def dev_account_key(name: str) -> AccountKey:
    return AccountKey.from_seed(hashlib.sha256(b"p2pgpu-dev-account/" + name.encode()).digest())


def dev_validator_key(name: str) -> ValidatorKey:
    return ValidatorKey.from_ikm(hashlib.sha256(b"p2pgpu-dev-bls/" + name.encode()).digest())


def sign_registration(key: ValidatorKey, chain_id: bytes, account: bytes) -> bytes:
    """The proof a RegisterValidator carries: the BLS key signs (chain, key, account)."""
    return key.sign(registration_message(chain_id, key.public_key, account))


def sign_vote(key: ValidatorKey, address: bytes, chain_id: bytes, vote: Vote) -> SignedVote:
    return SignedVote(vote=vote, validator=address, signature=key.sign(vote_signing_bytes(chain_id, vote)))


@dataclass
class DevIdentity:
    name: str
    account: AccountKey
    bls: ValidatorKey | None = None

    @property
    def address(self) -> bytes:
        return self.account.address


@dataclass
class DevNetwork:
    """Named identities plus the genesis they share."""

    genesis: Genesis
    identities: dict[str, DevIdentity] = field(default_factory=dict)

    @property
    def chain_id(self) -> bytes:
        return self.genesis.chain_id()

    def key(self, name: str) -> AccountKey:
        return self.identities[name].account

    def address(self, name: str) -> bytes:
        return self.identities[name].address

    def validator_keys(self) -> dict[bytes, ValidatorKey]:
        return {i.address: i.bls for i in self.identities.values() if i.bls is not None}

    def by_address(self, address: bytes) -> DevIdentity:
        for ident in self.identities.values():
            if ident.address == address:
                return ident
        raise KeyError(address.hex())


def make_dev_network(
    *,
    validators: Sequence[str] = ("v0", "v1", "v2", "v3"),
    providers: Sequence[str] = ("p0", "p1", "p2"),
    clients: Sequence[str] = ("c0",),
    balance: int = 1_000_000,
    stake: int = 10_000,
    bond: int = 1_000,
    params: Params | None = None,
    chain_name: str = "devnet",
    stakes: dict[str, int] | None = None,
) -> DevNetwork:
    """A genesis where every named identity is funded; validators stake, providers bond."""
    idents: dict[str, DevIdentity] = {}
    for name in (*validators, *providers, *clients):
        idents[name] = DevIdentity(name, dev_account_key(name))
    for name in validators:
        idents[name].bls = dev_validator_key(name)
    stakes = stakes or {}
    genesis = Genesis(
        chain_name=chain_name,
        genesis_time_ms=0,
        params=params or Params(),
        accounts=tuple(GenesisAccount(address=i.address, balance=balance) for i in idents.values()),
        validators=tuple(
            GenesisValidator(
                address=idents[n].address,
                bls_pubkey=idents[n].bls.public_key,  # type: ignore[union-attr]
                proof_of_possession=idents[n].bls.proof_of_possession(),  # type: ignore[union-attr]
                stake=stakes.get(n, stake),
            )
            for n in validators
        ),
        providers=tuple(GenesisProvider(address=idents[n].address, capabilities=b"", bond=bond) for n in providers),
    )
    return DevNetwork(genesis=genesis, identities=idents)


def certify(
    committee: Committee,
    keys: dict[bytes, ValidatorKey],
    chain_id: bytes,
    height: int,
    round_: int,
    block_hash: bytes,
    signers: Iterable[bytes] | None = None,
) -> CommitCertificate:
    """A commit certificate signed by ``signers`` (default: every committee member we hold a key for)."""
    wanted = set(signers) if signers is not None else None
    vote = Vote(height=height, round=round_, step=VoteStep.PRECOMMIT, block_hash=block_hash)
    msg = vote_signing_bytes(chain_id, vote)
    indices, sigs = [], []
    for i, m in enumerate(committee.members):
        if m.address in keys and (wanted is None or m.address in wanted):
            indices.append(i)
            sigs.append(keys[m.address].sign(msg))
    return CommitCertificate(
        height=height,
        round=round_,
        block_hash=block_hash,
        signers=bitfield_from_indices(indices, len(committee.members)),
        aggregate_signature=get_backend().aggregate(sigs),
    )


@dataclass
class DevChain:
    """A single-process chain driver: builds, certifies and applies blocks.

    Not consensus: it stands in for the committee so ledger tests and
    benchmarks can run many blocks quickly with real signatures.
    """

    network: DevNetwork
    state: State = field(init=False)
    blocks: list[FinalizedBlock] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = initial_state(self.network.genesis)

    @property
    def chain_id(self) -> bytes:
        return self.state.chain_id

    def next_proposer(self, round_: int = 0) -> bytes:
        height = self.state.height + 1
        return compute_proposer(committee_for_height(self.state, height), height, round_)

    def produce(self, txs: Iterable[SignedTransaction] = (), *, check_signatures: bool = True) -> tuple[Block, list[tuple[SignedTransaction, InvalidTransaction]]]:
        """Build the next block from ``txs``, certify it, apply it (re-validating); return it and rejects."""
        last_commit = self.blocks[-1].certificate if self.blocks else None
        block, _, rejected = build_block(
            self.state, txs, proposer=self.next_proposer(), last_commit=last_commit,
            timestamp_ms=self.state.height * 1000, check_signatures=check_signatures,
        )
        self.state = apply_block(self.state, block, check_signatures=check_signatures)
        cert = certify(
            committee_for_height(self.state, block.height), self.network.validator_keys(), self.chain_id,
            block.height, 0, block.block_hash(),
        )
        self.blocks.append(FinalizedBlock(block=block, certificate=cert))
        return block, rejected

    def sign(self, name: str, body: Transaction) -> SignedTransaction:
        return sign_transaction(self.network.key(name), self.chain_id, body)

    def nonce(self, name: str) -> int:
        return self.state.get_account(self.network.address(name)).nonce
