from __future__ import annotations

import pytest

from ledger.devtools import DevChain, make_dev_network
from ledger.params import Params

# Small windows so lifecycle tests need few blocks.
TEST_PARAMS = Params(
    epoch_length=8,
    committee_size=4,
    min_validator_stake=1_000,
    unbonding_period=3,
    jail_period=4,
    challenge_window=2,
    audit_window=3,
    verifier_count=2,
    audit_fee=10,
    dispute_bond=50,
    min_provider_bond=100,
)


@pytest.fixture(scope="session")
def dev_network():
    return make_dev_network(
        validators=("v0", "v1", "v2", "v3"),
        providers=("p0", "p1", "p2"),
        clients=("c0", "c1"),
        params=TEST_PARAMS,
    )


@pytest.fixture
def chain(dev_network) -> DevChain:
    return DevChain(dev_network)
