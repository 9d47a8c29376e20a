"""A verifier that cannot fetch the committed result never attests fraud (issue 13).

A third peer starving the provider's data plane made verifiers' fetches fail;
they attested ``fail`` and honest providers were slashed for fraud. Now a
verifier retries with backoff for as long as the audit window allows and
then reports the result ``UNAVAILABLE``, which the ledger never counts as
fraud (it settles by the no-show rule, and only on a majority of the drawn).
These run the real provider role against a real ledger (tests/market/sim.py).
"""

from __future__ import annotations

import dataclasses

import pytest

from ledger.state import TaskOutcome
from ledger.transactions import Attest, AuditVerdict
from p2pgpu.market import ClientConfig, PricingPolicy, SubmitTx
from p2pgpu.market.provider import next_result_attempt

from .sim import TEST_PARAMS, MarketSim, matmul_job

WINDOW = 12
PARAMS = dataclasses.replace(TEST_PARAMS, audit_window=WINDOW)
AUDITED = ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=10_000)  # every task drawn for audit
VERIFIERS = ("p1", "p2")


def market() -> MarketSim:
    sim = MarketSim(params=PARAMS)
    sim.add_provider("p0", pricing=PricingPolicy(cost_per_second=50))  # cheapest: wins the task
    for name in VERIFIERS:
        sim.add_provider(name)
    return sim


def attests(sim: MarketSim, name: str) -> list[Attest]:
    return [a.body for a in sim.logs[name].of(SubmitTx) if isinstance(a.body, Attest)]


def run_audited_task(sim: MarketSim):
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=AUDITED)
    sim.run_until(lambda: task.closed)
    final = sim.task(task.task_id)
    assert final.provider == sim.address("p0") and sorted(final.verifiers) == sorted(map(sim.address, VERIFIERS))
    return final


@pytest.mark.parametrize(("height", "failures", "expected"), [
    (100, 1, 101),   # 1 block after the first failure
    (101, 2, 103),   # then 2
    (103, 3, 107),   # then 4
    (107, 4, 110),   # at most max_wait=4 apart, and never later than deadline - margin (112 - 2)
    (110, 5, None),  # nothing fits any more: report now
    (111, 1, None),  # past the last attempt already
    (100, 40, 104),  # huge failure counts do not overflow the wait
])
def test_next_result_attempt_backs_off_within_the_audit_window(height, failures, expected) -> None:
    assert next_result_attempt(height, failures, 112, margin=2, max_wait=4) == expected


def test_next_result_attempt_needs_a_failure() -> None:
    with pytest.raises(ValueError, match="failures"):
        next_result_attempt(100, 0, 112, margin=2, max_wait=4)


def test_a_withheld_result_is_retried_with_backoff_then_reported_unavailable_never_fail() -> None:
    sim = market()
    sim.withhold.add("p0")  # commits, then serves its result to nobody
    final = run_audited_task(sim)
    drawn_at = final.audit_deadline - WINDOW
    for name in VERIFIERS:
        assert sim.fetch_heights[name] == [drawn_at + d for d in (0, 1, 3, 7, 10)]
        (attest,) = attests(sim, name)
        assert attest.verdict == AuditVerdict.UNAVAILABLE and "did not serve" in attest.detail
    assert final.outcome == TaskOutcome.MISSED  # the no-show rule, not fraud
    record = sim.chain.state.providers[sim.address("p0")]
    assert (record.failed, record.missed, record.completed) == (0, 1, 0)


def test_a_provider_unreachable_for_a_while_is_fetched_later_in_the_window_and_paid() -> None:
    """The attack of issue 13, once quotas let it end: the first four fetches of each verifier are refused."""
    sim = market()
    for name in VERIFIERS:
        sim.failing_verifier_fetches[name] = 4
    final = run_audited_task(sim)
    for name in VERIFIERS:
        assert len(sim.fetch_heights[name]) == 5
        assert [a.verdict for a in attests(sim, name)] == [AuditVerdict.PASS]
    assert final.outcome == TaskOutcome.PAID
    record = sim.chain.state.providers[sim.address("p0")]
    assert (record.failed, record.missed, record.completed) == (0, 0, 1)


def test_bytes_that_are_not_the_committed_result_count_as_not_served_not_as_fraud() -> None:
    sim = market()
    sim.tamper.add("p0")
    final = run_audited_task(sim)
    assert [a.verdict for a in final.attestations] == [AuditVerdict.UNAVAILABLE] * 2
    assert final.outcome == TaskOutcome.MISSED


def test_a_verifier_that_can_fetch_nothing_abstains_and_one_claim_alone_settles_nothing() -> None:
    sim = market()
    sim.withhold.add("p0")
    sim.cut_off.add("p1")  # p1's own network is down: it cannot tell a withholding provider from that
    final = run_audited_task(sim)
    assert attests(sim, "p1") == []
    assert [a.verdict for a in attests(sim, "p2")] == [AuditVerdict.UNAVAILABLE]
    assert final.outcome == TaskOutcome.PAID  # one "unavailable" of two drawn is no majority
    assert sim.chain.state.providers[sim.address("p0")].failed == 0


def test_no_verifier_ever_attests_fail_for_a_result_it_did_not_fetch() -> None:
    """Whatever mix of refusals, withholding and tampering: FAIL only follows a fetched, checked result."""
    for setup in ({"withhold"}, {"tamper"}, {"busy"}, {"withhold", "busy"}):
        sim = market()
        if "withhold" in setup:
            sim.withhold.add("p0")
        if "tamper" in setup:
            sim.tamper.add("p0")
        if "busy" in setup:
            sim.failing_verifier_fetches["p1"] = 100
        final = run_audited_task(sim)
        assert final.outcome != TaskOutcome.FRAUD, setup
        assert all(a.verdict != AuditVerdict.FAIL for name in VERIFIERS for a in attests(sim, name)), setup
        assert sim.chain.state.providers[sim.address("p0")].failed == 0
