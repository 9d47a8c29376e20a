"""What a peer's status says about its chain: only a positive claim of another chain refuses a peer."""

from __future__ import annotations

import pytest

from p2pgpu.chainguard import classify_peer

OURS = "fd346c3488656eea"


@pytest.mark.parametrize("status, verdict", [
    ({"chain": OURS, "height": 3}, "same"),
    ({"chain": "8a4b9de93ebc48d4"}, "other"),
    (None, "unknown"),  # no status protocol, a timeout, a reset
    ({}, "unknown"),
    ({"chain": ""}, "unknown"),
    ({"chain": 7}, "unknown"),  # a malformed answer is not a claim of another chain
    ({"chain": None}, "unknown"),
])
def test_a_peer_is_refused_only_on_a_positive_claim_of_another_chain(status, verdict) -> None:
    assert classify_peer(OURS, status) == verdict
