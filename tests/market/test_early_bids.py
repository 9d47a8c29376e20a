"""Bidding on an announce before its PostTask is final, and what keeps that safe for both sides."""

from __future__ import annotations

from dataclasses import replace

from ledger.devtools import dev_account_key
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import Assign, TaskKind
from p2pgpu.market import (
    AnnounceReceived,
    BidReceived,
    ClientConfig,
    JobPhase,
    ProviderConfig,
    PublishBid,
    Report,
    SubmitTx,
    make_announce,
    sign_announce,
)

from .sim import MarketSim, matmul_job

EARLY = ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0, enough_bids=1)


def _reports(actions) -> list[str]:
    return [a.message for a in actions if isinstance(a, Report)]


def _announce(sim: MarketSim, key, *, task_id: bytes, **changes):
    spec, _ = matmul_job()
    a = make_announce(chain_id=sim.chain_id, task_id=task_id, client=key.address, kind=TaskKind.BATCH, spec=spec,
                      max_unit_price=1_000, units=1, exec_blocks=10,
                      bid_deadline_height=sim.chain.state.height + 4, data_peer=b"x")
    return AnnounceReceived(sign_announce(key, replace(a, **changes)))


def test_post_and_assign_are_final_in_the_same_block() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0")
    sim.step()  # the provider has a ledger view
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=EARLY)
    # before any block: the provider bid on the announce and the client already sent its Assign
    assert role.phase(task.task_id) is JobPhase.BID
    assert any(isinstance(a, SubmitTx) and isinstance(a.body, Assign) for a in sim.logs["c0"].actions)
    sim.step()
    on_ledger = sim.task(task.task_id)
    assert on_ledger.status == TaskStatus.ASSIGNED
    assert on_ledger.assign_height == on_ledger.post_height == sim.chain.state.height
    sim.run_until(lambda: task.closed)
    assert task.outcome == TaskOutcome.PAID and sim.tx_rejects == []


def test_without_enough_bids_the_client_waits_for_the_ledger() -> None:
    sim = MarketSim(providers=("p0", "p1"))
    sim.add_provider("p0")
    sim.add_provider("p1", config=ProviderConfig(bid_before_final=False))  # has not answered yet
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=replace(EARLY, enough_bids=0))
    assert task.bids and not any(isinstance(a, SubmitTx) and isinstance(a.body, Assign)
                                 for a in sim.logs["c0"].actions)
    sim.run_until(lambda: task.closed)
    assert task.outcome == TaskOutcome.PAID


def test_a_bid_on_a_task_never_posted_is_withdrawn_and_frees_capacity() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0", config=ProviderConfig(unposted_wait_blocks=2))
    sim.step()
    ghost = bytes([9]) * 32
    out = role.handle(_announce(sim, sim.network.key("c0"), task_id=ghost, bid_deadline_height=50))
    assert any(isinstance(a, PublishBid) for a in out)
    assert role.phase(ghost) is JobPhase.BID and role.active_jobs == 1
    sim.step(2)
    assert role.phase(ghost) is JobPhase.BID
    sim.step()
    assert role.phase(ghost) is JobPhase.DROPPED and role.active_jobs == 0
    assert any("bid withdrawn" in m for m in _reports(sim.logs["p0"].actions))


def test_no_early_bid_for_a_client_that_cannot_pay() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0")
    sim.step()
    pauper = dev_account_key("pauper")
    out = role.handle(_announce(sim, pauper, task_id=bytes([5]) * 32))
    assert out == [] and role.phase(bytes([5]) * 32) is JobPhase.AWAITING_LEDGER and role.active_jobs == 0


def test_early_bids_per_client_are_limited() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0", config=ProviderConfig(max_concurrent_jobs=4, max_unposted_bids_per_client=1))
    sim.step()
    key = sim.network.key("c0")
    first = role.handle(_announce(sim, key, task_id=bytes([1]) * 32))
    second = role.handle(_announce(sim, key, task_id=bytes([2]) * 32))
    assert any(isinstance(a, PublishBid) for a in first) and second == []
    assert role.phase(bytes([2]) * 32) is JobPhase.AWAITING_LEDGER


def test_an_announce_whose_requirements_contradict_its_spec_gets_no_early_bid() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0")
    sim.step()
    out = role.handle(_announce(sim, sim.network.key("c0"), task_id=bytes([3]) * 32, memory_bytes=1))
    assert role.phase(bytes([3]) * 32) is JobPhase.DROPPED
    assert any("requirements disagree" in m for m in _reports(out))


def test_the_client_ignores_a_bid_made_for_other_terms() -> None:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0", config=ProviderConfig(bid_before_final=False))
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=EARLY)
    from ledger.devtools import sign_bid
    from ledger.transactions import Bid

    bid = Bid(task_id=task.task_id, provider=sim.address("p0"), unit_price=10, est_seconds=1, expiry_height=99,
              terms_hash=bytes(32))
    out = task.handle(BidReceived(sign_bid(sim.network.key("p0"), sim.chain_id, bid)))
    assert any("other terms" in m for m in _reports(out)) and not task.bids


def test_the_client_chooses_once_every_registered_provider_answered() -> None:
    sim = MarketSim(providers=("p0", "p1"))
    sim.add_provider("p0")
    sim.add_provider("p1", config=ProviderConfig(supported_kernels=frozenset({"conv2d"})))  # declines
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=replace(EARLY, enough_bids=0, bid_window=20))
    assert task.declines and task.bids
    assert any(isinstance(a, SubmitTx) and isinstance(a.body, Assign) for a in sim.logs["c0"].actions)
    sim.step()
    assert sim.task(task.task_id).status == TaskStatus.ASSIGNED


def test_max_wait_blocks_bounds_the_wait_for_a_provider_that_never_answers() -> None:
    sim = MarketSim(providers=("p0", "p1"))  # p1 is registered but runs no provider role
    sim.add_provider("p0")
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=replace(EARLY, enough_bids=0, bid_window=20, max_wait_blocks=2))
    sim.run_until(lambda: sim.task(task.task_id) is not None and sim.task(task.task_id).status != TaskStatus.POSTED,
                  max_blocks=10)
    on_ledger = sim.task(task.task_id)
    assert on_ledger.status == TaskStatus.ASSIGNED
    assert on_ledger.assign_height <= on_ledger.post_height + 3 < on_ledger.bid_deadline - 10


def test_a_withdrawn_bid_that_still_wins_is_honoured_not_missed() -> None:
    """The provider withdrew its early bid when the PostTask was late, but the client's Assign carried the
    signed bid and landed: the ledger holds the provider to it, so it must run the job (a miss is slashed)."""
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0", config=ProviderConfig(unposted_wait_blocks=2))
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=EARLY)
    assert any(isinstance(a, SubmitTx) and isinstance(a.body, Assign) for a in sim.logs["c0"].actions)
    held, sim.pending = sim.pending, []  # the client's PostTask and Assign are slow to land
    sim.step(3)
    assert role.phase(task.task_id) is JobPhase.DROPPED
    sim.pending = held
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert any("withdrawn; running it" in m for m in _reports(sim.logs["p0"].actions))
