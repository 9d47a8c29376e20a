"""The one certificate check, as each of its callers sees it (engine, node validator, Chain.commit, inspector)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ledger import exceptions as ex
from ledger.consensus import UNKNOWN_COMMITTEE, SignatureVerifier, certificate_problem, verify_finalized_block
from ledger.devtools import DevChain, certify
from ledger.genesis import initial_state
from ledger.transition import committee_for_height


def test_a_certificate_proves_its_block_by_the_committee_of_its_height(net4) -> None:
    dev = DevChain(net4)
    dev.produce()
    genesis = initial_state(net4.genesis)
    good = dev.blocks[0]
    committee = committee_for_height(genesis, 1)
    keys = net4.validator_keys()
    minority = replace(good, certificate=certify(committee, keys, genesis.chain_id, 1, 0, good.block.block_hash(),
                                                 signers=list(keys)[:2]))
    other_block = replace(good, certificate=certify(committee, keys, genesis.chain_id, 1, 0, b"\x01" * 32))
    verifier = SignatureVerifier()
    for check_with in (None, verifier, verifier):  # afresh, then through the cache (a miss, then a hit)
        verify_finalized_block(good, committee, genesis.chain_id, verifier=check_with)
        for bad in (minority, other_block):
            with pytest.raises(ex.InvalidCertificate):
                verify_finalized_block(bad, committee, genesis.chain_id, verifier=check_with)
        assert certificate_problem(genesis, good, check_with) is None
        assert certificate_problem(genesis, minority, check_with) == "bad_certificate"
    far = replace(good, block=replace(good.block, header=replace(good.block.header, height=10**6)))
    assert certificate_problem(genesis, far, verifier) == UNKNOWN_COMMITTEE
