"""Batch tasks end to end on a real ledger: settlement, bid choice, expiry, misses, fraud."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ledger.params import BPS
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import Assign, AuditVerdict
from p2pgpu.market import (
    ClientConfig,
    FetchInputs,
    FetchResult,
    JobPhase,
    RunJob,
    DeclineReason,
    PricingPolicy,
    ReportProgress,
    ResultReady,
    Stage,
    TaskClosed,
    decode_result,
)
from p2pgpu.market.results import result_hash

from .sim import TEST_PARAMS, MarketSim, cheating_matmul, matmul_job, silent

NO_AUDIT = ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0)


def closed(sim: MarketSim, task) -> TaskClosed | None:
    found = sim.logs["task:" + task.task_id.hex()].of(TaskClosed)
    return found[0] if found else None


def test_batch_task_is_paid_with_the_right_balances() -> None:
    sim = MarketSim()
    # Same device, different cost: p1 is cheapest, so it wins on price (equal reputation and ETA).
    sim.add_provider("p0", pricing=PricingPolicy(cost_per_second=300))
    sim.add_provider("p1", pricing=PricingPolicy(cost_per_second=100))
    sim.add_provider("p2", pricing=PricingPolicy(cost_per_second=200))
    spec, inputs = matmul_job()
    before = {n: sim.balance(n) for n in ("c0", "p0", "p1", "p2")}
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=NO_AUDIT)
    sim.run_until(lambda: task.closed)

    ledger_task = sim.task(task.task_id)
    assert ledger_task.status == TaskStatus.SETTLED and ledger_task.outcome == TaskOutcome.PAID
    assert ledger_task.provider == sim.address("p1")
    price = ledger_task.unit_price
    assert price == 121  # (1 s overhead + 1,024 FLOP at 50 GFLOP/s) x 100/s x 1.2 margin, rounded up
    cut = price * TEST_PARAMS.protocol_fee_bps // BPS
    fee = NO_AUDIT.fee
    assert sim.balance("c0") == before["c0"] - price - 2 * fee  # PostTask + Assign fees; audit fee refunded
    assert sim.balance("p1") == before["p1"] + price - cut - fee  # CommitResult fee; collateral returned
    assert sim.balance("p0") == before["p0"] and sim.balance("p2") == before["p2"]
    assert sim.chain.state.providers[sim.address("p1")].completed == 1

    log = sim.logs["task:" + task.task_id.hex()]
    (ready,) = log.of(ResultReady)
    np.testing.assert_allclose(ready.outputs["c"], inputs["a"] @ inputs["b"], rtol=1e-5)
    assert result_hash(decode_result(ready.data)) == ledger_task.result_hash
    stages = []
    for p in log.of(ReportProgress):
        if not stages or stages[-1] != p.stage:
            stages.append(p.stage)
    assert stages == [Stage.POSTED, Stage.BIDS, Stage.ASSIGNED, Stage.RUNNING, Stage.DELIVERED, Stage.SETTLED]
    assert closed(sim, task).outcome == TaskOutcome.PAID
    assert sim.gossip_rejects == [] and sim.tx_rejects == []


def test_provider_does_not_start_before_the_assignment_is_final() -> None:
    sim = MarketSim(providers=("p0",))
    sim.providers_first = True  # the provider sees each block before the client opens access: it must retry
    role = sim.add_provider("p0")
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, enough_bids=1, audit_rate_bps=0))
    sim.step()  # PostTask final -> announce -> bid -> client submits Assign at once (enough_bids=1)
    assert any(isinstance(a.body, Assign) for _, a in sim.pending)
    assert role.phase(task.task_id) is JobPhase.BID
    assert not sim.logs["p0"].of(FetchInputs) and not sim.logs["p0"].of(RunJob)
    sim.step()  # the Assign's block is final: now, and only now, the provider fetches
    assert sim.task(task.task_id).status == TaskStatus.ASSIGNED
    assert len(sim.logs["p0"].of(FetchInputs)) == 1 and not sim.logs["p0"].of(RunJob)
    sim.step()  # first fetch was refused (client not yet serving); the retry succeeds and the job runs
    assert len(sim.logs["p0"].of(RunJob)) == 1
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert role.active_jobs == 0


def test_client_ignores_unregistered_and_failing_providers_and_picks_by_policy() -> None:
    sim = MarketSim(providers=("p0", "p1", "p2"), extra=("rogue",))
    # rogue is funded but not a registered provider, and bids lowest of all.
    sim.add_provider("rogue", pricing=PricingPolicy(cost_per_second=10))
    # p0 is cheap but has failed many tasks.
    sim.add_provider("p0", pricing=PricingPolicy(cost_per_second=50))
    sim.add_provider("p1", pricing=PricingPolicy(cost_per_second=150))
    sim.add_provider("p2", pricing=PricingPolicy(cost_per_second=200))
    addr = sim.address("p0")
    sim.chain.state.providers[addr] = replace(sim.chain.state.providers[addr], failed=5, completed=1)
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=NO_AUDIT)
    sim.run_until(lambda: task.closed)
    assert len(task.bids) == 4
    assert sim.task(task.task_id).provider == sim.address("p1")
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_no_bids_means_expiry_and_refund_reported() -> None:
    sim = MarketSim()
    sim.add_provider("p0")
    sim.add_provider("p1")
    spec, inputs = matmul_job(device="gpu")  # CPU-only providers decline
    before = sim.balance("c0")
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=NO_AUDIT)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.EXPIRED
    done = closed(sim, task)
    assert done.outcome == TaskOutcome.EXPIRED and "no bids" in done.detail and "2 provider(s) declined" in done.detail
    assert sim.balance("c0") == before - NO_AUDIT.fee  # all escrow back, only the PostTask fee spent
    assert {r for r, _ in task.declines.values()} == {DeclineReason.REQUIRES_GPU}


def test_provider_that_never_delivers_is_reported_missed() -> None:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0", runner=silent)
    spec, inputs = matmul_job()
    before_client, before_provider = sim.balance("c0"), sim.balance("p0")
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=NO_AUDIT)
    sim.run_until(lambda: task.closed)
    ledger_task = sim.task(task.task_id)
    assert ledger_task.outcome == TaskOutcome.MISSED
    done = closed(sim, task)
    assert done.outcome == TaskOutcome.MISSED and "missed its deadline" in done.detail
    assert sim.balance("c0") == before_client - 2 * NO_AUDIT.fee
    collateral = ledger_task.unit_price * TEST_PARAMS.collateral_bps // BPS
    slash = collateral * TEST_PARAMS.missed_deadline_slash_bps // BPS
    assert sim.balance("p0") == before_provider - slash
    assert sim.chain.state.providers[sim.address("p0")].missed == 1


def test_wrong_result_is_disputed_audited_and_slashed() -> None:
    sim = MarketSim()
    sim.add_provider("p0", runner=cheating_matmul, pricing=PricingPolicy(cost_per_second=50))  # wins on price
    sim.add_provider("p1")
    sim.add_provider("p2")
    spec, inputs = matmul_job()
    before = sim.balance("c0")
    config = replace(NO_AUDIT, spot_check=True)
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=config)
    sim.run_until(lambda: task.closed)
    ledger_task = sim.task(task.task_id)
    assert ledger_task.provider == sim.address("p0")
    assert ledger_task.outcome == TaskOutcome.FRAUD
    assert closed(sim, task).outcome == TaskOutcome.FRAUD
    # both verifiers recomputed and attested fail
    assert sorted(ledger_task.verifiers) == sorted([sim.address("p1"), sim.address("p2")])
    assert [a.verdict for a in ledger_task.attestations] == [AuditVerdict.FAIL, AuditVerdict.FAIL]
    assert sim.chain.state.providers[sim.address("p0")].failed == 1
    # client: compensated from the collateral, dispute bond and escrow back, three fees spent
    collateral = ledger_task.unit_price * TEST_PARAMS.collateral_bps // BPS
    to_client = collateral * TEST_PARAMS.fraud_client_share_bps // BPS
    assert sim.balance("c0") == before - 3 * config.fee - TEST_PARAMS.audit_fee + to_client
    assert not task.accepted and "spot check failed" in task.dispute_reason


def test_an_unserved_result_is_reported_unavailable_and_settled_as_a_no_show_not_fraud() -> None:
    """A provider commits, then serves its result to nobody: the client disputes, the verifiers try through
    the audit window, attest UNAVAILABLE (never FAIL: nothing was fetched, nothing checked), and the ledger
    settles by the no-show rule."""
    sim = MarketSim()
    sim.add_provider("p0", pricing=PricingPolicy(cost_per_second=50))
    sim.add_provider("p1")
    sim.add_provider("p2")
    sim.withhold.add("p0")  # commits, but nobody can fetch what it committed
    spec, inputs = matmul_job()
    before = sim.balance("c0")
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=NO_AUDIT)
    sim.run_until(lambda: task.closed)
    final = sim.task(task.task_id)
    assert [a.verdict for a in final.attestations] == [AuditVerdict.UNAVAILABLE] * 2
    assert final.outcome == TaskOutcome.MISSED and closed(sim, task).outcome == TaskOutcome.MISSED
    assert "did not serve its committed result" in closed(sim, task).detail
    record = sim.chain.state.providers[sim.address("p0")]
    assert (record.failed, record.missed) == (0, 1)
    assert "no acceptable result" in task.dispute_reason
    # the client got everything back but its fees and the audit fee (which paid the verifiers)
    assert sim.balance("c0") == before - 3 * NO_AUDIT.fee - TEST_PARAMS.audit_fee
    # each verifier asked more than once before reporting
    for name in ("p1", "p2"):
        fetches = [a for a in sim.logs[name].of(FetchResult) if a.task_id == task.task_id]
        assert len(fetches) >= 2 and all(a.timeout_s is not None and a.timeout_s > 0 for a in fetches)


def test_inputs_pushed_with_the_assign_report_running_once_that_provider_is_assigned() -> None:
    """``InputsPushed`` (the shell pushed the sealed inputs over the winner's bid link with the Assign) arrives
    while the Assign is in flight: the client reports RUNNING when the ledger shows that provider assigned, at
    the same block, not when a fetch that no longer happens would have finished; a push to another provider
    (one the ledger did not assign) reports nothing."""
    from p2pgpu.market import ClientState, InputsPushed

    for pushed_to in ("p0", "p1"):
        sim = MarketSim()
        sim.add_provider("p0")
        spec, inputs = matmul_job()
        task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=NO_AUDIT)
        sim.run_until(lambda: task.state is ClientState.ASSIGNING)
        sim.deliver_client(task.task_id, InputsPushed(task.task_id, sim.address(pushed_to)))
        sim.drain()
        sim.run_until(lambda: task.state is ClientState.RUNNING)
        progress = sim.logs["task:" + task.task_id.hex()].of(ReportProgress)
        stages = [(p.stage, p.detail) for p in progress]
        assigned = stages.index(next(s for s in stages if s[0] is Stage.ASSIGNED))
        pushed = (Stage.RUNNING, "inputs pushed to the provider with the assignment")
        if pushed_to == "p0":
            assert stages[assigned + 1] == pushed, stages
        else:
            assert pushed not in stages, stages
        sim.run_until(lambda: task.closed)
        assert closed(sim, task).outcome == TaskOutcome.PAID
