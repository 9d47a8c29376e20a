"""The one check that a finalized block's commit certificate proves it.

A certificate proves a block when its signers hold more than 2/3 of the
stake of the committee of the block's height and their aggregate signature
verifies on a precommit for that block (:func:`ledger.committee.verify_certificate`).
Four places ask: the engine (a synced or announced block), the node's ``/block``
gossip validator, ``Chain.commit`` before anything is stored, and the gossip
inspector. They all ask here, so the question is asked the same way; only
where the committee comes from differs (our state, or the inspector's own
table of epochs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ledger import exceptions as ex
from ledger.blocks import Block, FinalizedBlock
from ledger.committee import verify_certificate
from ledger.consensus.precheck import UNKNOWN_COMMITTEE
from ledger.state import Committee, State
from ledger.transition import committee_for_height
from ledger.votes import CommitCertificate

__all__ = ["CertificateVerifier", "certificate_problem", "verify_finalized_block"]


class CertificateVerifier(Protocol):
    """A cache of certificate checks (:class:`~ledger.consensus.verifier.SignatureVerifier`); raises
    :class:`~ledger.exceptions.InvalidCertificate`."""

    def verify_certificate(self, committee: Committee, chain_id: bytes, cert: CommitCertificate, *, height: int,
                           block_hash: bytes) -> None: ...


def verify_finalized_block(
    finalized: FinalizedBlock,
    committee: Committee,
    chain_id: bytes,
    *,
    verifier: CertificateVerifier | None = None,
    block_hash: bytes | None = None,
) -> None:
    """Raise :class:`~ledger.exceptions.InvalidCertificate` unless ``finalized.certificate`` proves that
    ``committee`` finalized ``finalized.block``.

    ``verifier`` remembers verdicts (without one the check is made afresh); ``block_hash`` is the block's
    hash if the caller has it already (hashing encodes the whole block).
    """
    block = finalized.block
    digest = block_hash if block_hash is not None else block.block_hash()
    check = verifier.verify_certificate if verifier is not None else verify_certificate
    check(committee, chain_id, finalized.certificate, height=block.height, block_hash=digest)


def certificate_problem(
    state: State, finalized: FinalizedBlock, verifier: CertificateVerifier | None = None, *,
    hash_block: Callable[[Block], bytes] | None = None,
) -> str | None:
    """What a node at head ``state`` can say of a finalized block's certificate.

    None: it proves the block. ``"bad_certificate"`` (a
    :data:`~ledger.consensus.events.REJECT_REASONS` label): it does not.
    :data:`~ledger.consensus.precheck.UNKNOWN_COMMITTEE`: the block is in an
    epoch whose committee ``state`` does not know, so it proves nothing either way.
    ``hash_block`` computes the block's hash (a host's shared cache), only once the committee is known.
    """
    try:
        committee = committee_for_height(state, finalized.block.height)
    except ex.InvalidBlock:
        return UNKNOWN_COMMITTEE
    try:
        digest = hash_block(finalized.block) if hash_block is not None else None
        verify_finalized_block(finalized, committee, state.chain_id, verifier=verifier, block_hash=digest)
    except ex.InvalidCertificate:
        return "bad_certificate"
    return None
