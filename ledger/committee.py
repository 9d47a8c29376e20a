"""Committees, proposers and commit certificates (pure functions).

* ``compute_committee``: a stake-weighted sample (without replacement) of the
  active validators, seeded by the randomness at the end of the previous
  epoch; members in canonical (address) order, which the certificate's
  signer bitfield indexes.
* ``compute_proposer``: stake-weighted choice within the committee, seeded by
  the committee hash, height and round; every node and light client computes
  the same proposer without executing anything.
* ``verify_certificate``: > 2/3 of committee stake, one aggregate BLS check.
* ``verify_chain``: light verification of finalized blocks from genesis.

Sampling uses only integers and SHA-256, so every platform agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from ledger.blocks import FinalizedBlock
from ledger.bls import get_backend
from ledger.codec import encode
from ledger.exceptions import InvalidCertificate
from ledger.signing import Domain, signing_bytes
from ledger.state import Committee, CommitteeMember, Validator, ValidatorStatus
from ledger.votes import CommitCertificate, Vote, VoteStep, indices_from_bitfield


def compute_epoch(height: int, epoch_length: int) -> int:
    """Epoch of block ``height`` (blocks 1..L are epoch 0; genesis, height 0, too)."""
    return max(height - 1, 0) // epoch_length


def is_epoch_end(height: int, epoch_length: int) -> bool:
    """True for the last block of an epoch: its end-of-block step rotates the committee."""
    return height > 0 and height % epoch_length == 0


def _draw(seed: bytes, *parts: int) -> int:
    h = hashlib.sha256(seed)
    for p in parts:
        h.update(p.to_bytes(8, "big"))
    return int.from_bytes(h.digest(), "big")


def is_eligible(validator: Validator, min_stake: int) -> bool:
    return validator.status == ValidatorStatus.ACTIVE and validator.stake >= min_stake and validator.stake > 0


def compute_committee(
    validators: Mapping[bytes, Validator],
    seed: bytes,
    size: int,
    epoch: int,
    min_stake: int,
) -> Committee:
    candidates = sorted((addr, v) for addr, v in validators.items() if is_eligible(v, min_stake))
    if len(candidates) > size:
        chosen: list[tuple[bytes, Validator]] = []
        pool = list(candidates)
        total = sum(v.stake for _, v in pool)
        for i in range(size):
            target = _draw(seed, epoch, i) % total
            for j, (_, v) in enumerate(pool):
                if target < v.stake:
                    break
                target -= v.stake
            picked = pool.pop(j)
            total -= picked[1].stake
            chosen.append(picked)
        candidates = sorted(chosen)
    members = tuple(CommitteeMember(address=a, bls_pubkey=v.bls_pubkey, stake=v.stake) for a, v in candidates)
    return Committee(epoch=epoch, members=members)


def compute_proposer(committee: Committee, height: int, round_: int) -> bytes:
    """Address of the member that proposes at (height, round)."""
    if not committee.members:
        raise ValueError("empty committee has no proposer")
    target = _draw(committee.committee_hash(), height, round_) % committee.total_stake
    for member in committee.members:
        if target < member.stake:
            return member.address
        target -= member.stake
    raise AssertionError("unreachable: target below total stake")


def has_quorum(signed_stake: int, total_stake: int) -> bool:
    """Strictly more than two thirds, in integers."""
    return 3 * signed_stake > 2 * total_stake


def vote_signing_bytes(chain_id: bytes, vote: Vote) -> bytes:
    return signing_bytes(Domain.VOTE, chain_id, encode(vote))


def verify_certificate(
    committee: Committee,
    chain_id: bytes,
    cert: CommitCertificate,
    *,
    height: int | None = None,
    block_hash: bytes | None = None,
) -> None:
    """Raise :class:`InvalidCertificate` unless ``cert`` proves a quorum of ``committee`` precommitted."""
    if height is not None and cert.height != height:
        raise InvalidCertificate(f"certificate is for height {cert.height}, expected {height}")
    if block_hash is not None and cert.block_hash != block_hash:
        raise InvalidCertificate(f"certificate at height {cert.height} is for another block")
    if not committee.members:
        raise InvalidCertificate("no committee to check the certificate against")
    try:
        indices = indices_from_bitfield(cert.signers, len(committee.members))
    except ValueError as exc:
        raise InvalidCertificate(f"height {cert.height}: {exc}") from exc
    signed = sum(committee.members[i].stake for i in indices)
    if not has_quorum(signed, committee.total_stake):
        raise InvalidCertificate(
            f"height {cert.height}: signers hold {signed} of {committee.total_stake} stake, need more than 2/3"
        )
    vote = Vote(height=cert.height, round=cert.round, step=VoteStep.PRECOMMIT, block_hash=cert.block_hash)
    pubkeys = [committee.members[i].bls_pubkey for i in indices]
    if not get_backend().fast_aggregate_verify(pubkeys, vote_signing_bytes(chain_id, vote), cert.aggregate_signature):
        raise InvalidCertificate(f"height {cert.height}: aggregate signature does not verify")


def verify_chain(
    chain_id: bytes,
    genesis_committee: Committee,
    epoch_length: int,
    blocks: Iterable[FinalizedBlock],
    *,
    start_height: int = 1,
    prev_hash: bytes | None = None,
) -> tuple[int, bytes, Committee]:
    """Light verification: check links and certificates without executing blocks.

    Returns (last height, last block hash, committee for the next block).
    Raises :class:`InvalidCertificate` naming the first bad height.
    """
    committee = genesis_committee
    expected_prev = chain_id if prev_hash is None else prev_hash
    height = start_height - 1
    for fb in blocks:
        header = fb.block.header
        height += 1
        if header.height != height:
            raise InvalidCertificate(f"expected block {height}, got {header.height}")
        if header.prev_hash != expected_prev:
            raise InvalidCertificate(f"block {height} does not link to block {height - 1}")
        block_hash = header.block_hash()
        verify_certificate(committee, chain_id, fb.certificate, height=height, block_hash=block_hash)
        if header.next_committee is not None:
            if not is_epoch_end(height, epoch_length):
                raise InvalidCertificate(f"block {height} names a committee but does not end an epoch")
            if header.next_committee.epoch != compute_epoch(height, epoch_length) + 1:
                raise InvalidCertificate(f"block {height} names a committee for the wrong epoch")
            committee = header.next_committee
        elif is_epoch_end(height, epoch_length):
            raise InvalidCertificate(f"block {height} ends an epoch but names no next committee")
        expected_prev = block_hash
    return height, expected_prev, committee
