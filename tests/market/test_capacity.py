"""Provider capacity: slots run jobs at once, a queue waits for them, bids price in the wait, busy re-bids."""

from __future__ import annotations

from p2pgpu.market import ClientConfig, DeclineReason, JobPhase, PricingPolicy, ProviderConfig, PublishBid

from .sim import MarketSim, matmul_job

WINDOW = ClientConfig(bid_window=6, exec_blocks=40, audit_rate_bps=0, enough_bids=1)
QUICK = PricingPolicy(overhead_seconds=1.0, slot_overhead_seconds=1.0)  # each job holds its slot ~1 s


def _bids(sim: MarketSim, name: str) -> list:
    return [a for a in sim.logs[name].actions if isinstance(a, PublishBid)]


def test_slots_run_jobs_at_once_and_the_queue_waits_its_turn_earliest_deadline_first() -> None:
    sim = MarketSim(providers=("p0",))
    sim.hold_jobs = True
    role = sim.add_provider("p0", pricing=QUICK, config=ProviderConfig(max_concurrent_jobs=2, max_queued=2))
    sim.step()
    tasks = [sim.submit("c0", *matmul_job(seed=i), max_unit_price=1_000, config=WINDOW) for i in range(4)]
    sim.run_until(lambda: len(sim.running["p0"]) == 2 and sum(
        role.phase(t.task_id) is JobPhase.QUEUED for t in tasks) == 2)
    assert role.running_jobs == 2 and role.active_jobs == 4
    first = sim.running["p0"][0].task_id
    sim.finish("p0", first)
    assert len(sim.running["p0"]) == 2, "a freed slot goes to a queued job at once"
    while sim.running["p0"]:
        sim.finish("p0", sim.running["p0"][0].task_id)
    sim.run_until(lambda: all(t.closed for t in tasks))
    assert all(sim.task(t.task_id).outcome == 1 for t in tasks)  # TaskOutcome.PAID


def test_each_bid_prices_in_the_queue_wait() -> None:
    sim = MarketSim(providers=("p0",))
    sim.hold_jobs = True
    sim.add_provider("p0", pricing=QUICK, config=ProviderConfig(max_concurrent_jobs=1, max_queued=3))
    sim.step()
    for i in range(3):
        sim.submit("c0", *matmul_job(seed=i), max_unit_price=1_000, config=WINDOW)
    etas = [b.signed.bid.est_seconds for b in _bids(sim, "p0")]
    assert etas == sorted(etas) and etas[0] < etas[-1], etas


def test_full_capacity_declines_busy_with_its_load_and_bids_again_when_a_slot_frees() -> None:
    sim = MarketSim(providers=("p0",))
    sim.hold_jobs = True
    role = sim.add_provider("p0", pricing=QUICK, config=ProviderConfig(max_concurrent_jobs=1, max_queued=0))
    sim.step()
    first = sim.submit("c0", *matmul_job(seed=1), max_unit_price=1_000, config=WINDOW)
    second = sim.submit("c0", *matmul_job(seed=2), max_unit_price=1_000, config=WINDOW)
    assert role.phase(second.task_id) is JobPhase.DECLINED
    assert role.jobs[second.task_id].decline.reason == DeclineReason.BUSY
    assert "1 bid(s) open; limit 1" in role.jobs[second.task_id].decline.detail
    sim.run_until(lambda: sim.running["p0"])
    sim.finish("p0", first.task_id)
    assert any(b.signed.bid.task_id == second.task_id for b in _bids(sim, "p0")), "no bid once the slot freed"
    sim.run_until(lambda: sim.running["p0"])
    sim.finish("p0", second.task_id)
    sim.run_until(lambda: first.closed and second.closed)
    assert sim.task(second.task_id).provider == sim.address("p0")


def test_only_slot_time_makes_the_queue_wait() -> None:
    """Fetching inputs and delivering results happen outside the slot: a queue of small jobs waits for their
    compute, not for each one's full per-job overhead (which once made a provider with nothing running
    decline as 'busy: queue wait ~22 s')."""
    sim = MarketSim(providers=("p0",))
    sim.hold_jobs = True
    role = sim.add_provider("p0", pricing=PricingPolicy(overhead_seconds=1.0, slot_overhead_seconds=0.05),
                            config=ProviderConfig(max_concurrent_jobs=1, max_queued=100))
    sim.step()
    for i in range(40):
        sim.submit("c0", *matmul_job(seed=i), max_unit_price=1_000, config=WINDOW)
    assert role.active_jobs == 40 and role.queue_seconds() < 3.0


def test_a_wait_that_would_miss_the_deadline_is_declined_not_promised() -> None:
    sim = MarketSim(providers=("p0",))
    sim.hold_jobs = True
    slow = PricingPolicy(overhead_seconds=5.0, slot_overhead_seconds=5.0)  # ~5 s a job; 42 blocks of 1 s and a safety factor of 2: 4 fit
    role = sim.add_provider("p0", pricing=slow, config=ProviderConfig(max_concurrent_jobs=1, max_queued=50))
    sim.step()
    window = ClientConfig(bid_window=6, exec_blocks=42, audit_rate_bps=0, enough_bids=1)
    tasks = [sim.submit("c0", *matmul_job(seed=i), max_unit_price=10_000, config=window) for i in range(6)]
    phases = [role.phase(t.task_id) for t in tasks]
    assert phases.count(JobPhase.BID) == 4 and phases.count(JobPhase.DECLINED) == 2, phases
    assert "does not fit" in role.jobs[tasks[-1].task_id].decline.detail


def test_early_bids_per_client_are_bounded_by_what_its_balance_can_escrow() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0", pricing=QUICK, config=ProviderConfig(max_concurrent_jobs=1, max_queued=50))
    sim.step()
    balance = sim.balance("c0")
    price = balance // 3 + 1  # the balance covers two such announces, not three
    from .test_early_bids import _announce

    key = sim.network.key("c0")
    outs = [role.handle(_announce(sim, key, task_id=bytes([i]) * 32, max_unit_price=price)) for i in (1, 2, 3)]
    bid = [any(isinstance(a, PublishBid) for a in out) for out in outs]
    assert bid == [True, True, False]
    assert role.phase(bytes([3]) * 32) is JobPhase.AWAITING_LEDGER
