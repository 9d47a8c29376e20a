"""The inbound stream policy (p2pgpu/net/quota.py): pure, driven with explicit times."""

from __future__ import annotations

import random

import pytest

from p2pgpu.net import ConfigError
from p2pgpu.net.quota import Admitted, InboundQuota, QuotaError, Refusal, Refused, StreamLimits

DATA, SYNC = "/p2pgpu/data/1", "/p2pgpu/sync/1"
LIMITS = StreamLimits(total=10, per_peer=4, per_protocol=6, outbound_per_peer=3, charge_interval=1.0)


def admit(q: InboundQuota, peer: str, protocol: str = DATA, now: float = 0.0, **kw) -> Admitted:
    decision = q.admit(peer, protocol, now, **kw)
    assert isinstance(decision, Admitted), decision
    return decision


def test_one_peer_cannot_take_more_than_its_quota_and_others_still_get_in() -> None:
    q = InboundQuota(LIMITS)
    held = [admit(q, "greedy") for _ in range(4)]
    refused = q.admit("greedy", SYNC, 0.0)  # the quota spans protocols
    assert isinstance(refused, Refused) and refused.reason is Refusal.PEER_QUOTA and refused.charge
    assert "holds 4" in refused.detail
    admit(q, "honest")
    assert q.of_peer("greedy") == 4 and q.of_peer("honest") == 1 and q.total == 5
    q.release(held[0].slot)
    admit(q, "greedy", SYNC)


def test_quota_refusals_are_charged_once_per_interval_per_peer() -> None:
    q = InboundQuota(LIMITS)
    q.set_budget(DATA, 8)
    for _ in range(4):
        admit(q, "a")
        admit(q, "b")
    charges = [q.admit("a", DATA, t).charge for t in (0.0, 0.1, 0.5, 0.99, 1.0, 1.5, 2.2)]
    assert charges == [True, False, False, False, True, False, True]
    assert q.admit("b", DATA, 0.2).charge  # another peer's clock is its own


def test_protocol_budget_and_node_ceiling_refuse_without_charging() -> None:
    q = InboundQuota(LIMITS)
    for peer in ("a", "b", "c"):
        admit(q, peer)
        admit(q, peer)
    refused = q.admit("d", DATA, 0.0)
    assert isinstance(refused, Refused) and refused.reason is Refusal.PROTOCOL_BUDGET and not refused.charge
    q.set_budget(SYNC, 10)
    for peer in ("d", "e"):
        admit(q, peer, SYNC)
        admit(q, peer, SYNC)
    refused = q.admit("f", SYNC, 0.0)
    assert isinstance(refused, Refused) and refused.reason is Refusal.NODE_LIMIT and not refused.charge
    assert q.total == 10 and q.by_protocol() == {DATA: 6, SYNC: 4}


def test_a_banned_peer_gets_nothing_whatever_room_is_left() -> None:
    q = InboundQuota(LIMITS)
    refused = q.admit("bad", DATA, 0.0, banned=True)
    assert isinstance(refused, Refused) and refused.reason is Refusal.BANNED and not refused.charge
    assert q.total == 0


def test_releasing_twice_or_a_foreign_slot_is_a_bug() -> None:
    q = InboundQuota(LIMITS)
    slot = admit(q, "a").slot
    q.release(slot)
    with pytest.raises(QuotaError, match="twice"):
        q.release(slot)
    other = InboundQuota(LIMITS)
    with pytest.raises(QuotaError):
        other.release(admit(q, "a").slot)


def test_random_admits_and_releases_keep_every_bound_and_return_to_zero() -> None:
    rng = random.Random(13)
    q = InboundQuota(LIMITS)
    q.set_budget(SYNC, 3)
    live = []
    for step in range(5_000):
        if live and rng.random() < 0.45:
            q.release(live.pop(rng.randrange(len(live))))
        else:
            decision = q.admit(f"p{rng.randrange(6)}", rng.choice((DATA, SYNC)), step * 0.01)
            if isinstance(decision, Admitted):
                live.append(decision.slot)
        assert q.total == len(live) <= LIMITS.total
        assert q.of_protocol(DATA) <= LIMITS.per_protocol and q.of_protocol(SYNC) <= 3
        assert all(q.of_peer(f"p{i}") <= LIMITS.per_peer for i in range(6))
    for slot in live:
        q.release(slot)
    assert q.total == 0 and q.by_protocol() == {}
    q.expire(1e9)
    assert q.peers_tracked() == 0  # nothing kept for peers that are gone


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"per_peer": 0}, "per_peer must be >= 1"),
    ({"per_peer": 200, "per_protocol": 100}, "per_peer <= per_protocol <= total"),
    ({"per_protocol": 300}, "per_peer <= per_protocol <= total"),
    ({"outbound_per_peer": 17}, "refused \\(and charged\\)"),
    ({"idle_timeout": 0}, "idle_timeout must be > 0"),
])
def test_limits_are_checked(kwargs: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        StreamLimits(**kwargs)


def test_a_protocol_budget_is_within_the_node_ceiling() -> None:
    q = InboundQuota(LIMITS)
    with pytest.raises(ConfigError, match="1..10"):
        q.set_budget(DATA, 11)
    q.set_budget(DATA, 2)
    assert q.budget(DATA) == 2
    q.set_budget(DATA, None)
    assert q.budget(DATA) == LIMITS.per_protocol
