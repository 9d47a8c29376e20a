"""The action table every driver fills in, and the pure submission planner."""

from __future__ import annotations

import pytest

from ledger.params import Params
from p2pgpu.market import events
from p2pgpu.market.executor import ACTION_TYPES, ActionExecutor, IncompleteActionTable
from p2pgpu.market.planner import InvalidTerms, SubmissionTerms, Unaffordable, exec_blocks_for, plan_submission


def _all_action_types() -> set[type]:
    found, todo = set(), [events.Action]
    while todo:
        for sub in todo.pop().__subclasses__():
            if getattr(events, sub.__name__, None) is sub:  # not the pre-``slots`` copy dataclass leaves behind
                found.add(sub)
            todo.append(sub)
    return found


def test_the_table_names_every_action_a_role_can_return() -> None:
    assert set(ACTION_TYPES) == _all_action_types()


def test_an_executor_refuses_a_table_with_a_gap_or_a_duplicate() -> None:
    def noop(origin: object, action: object) -> None:
        pass

    full = {kind: noop for kind in ACTION_TYPES}
    ActionExecutor(full, unsupported=noop)
    with pytest.raises(IncompleteActionTable, match="RunJob"):
        ActionExecutor({k: v for k, v in full.items() if k is not events.RunJob}, unsupported=noop)
    with pytest.raises(IncompleteActionTable, match="two handlers"):
        ActionExecutor({**full, (events.RunJob, events.RunVerify): noop}, unsupported=noop)


def test_an_action_goes_to_its_own_handler() -> None:
    seen: list[tuple[str, object]] = []
    table = {kind: (lambda origin, action, k=kind: seen.append((k.__name__, origin))) for kind in ACTION_TYPES}
    run = ActionExecutor(table, unsupported=lambda origin, action: seen.append(("unsupported", origin)))
    run("t1", events.Report(b"\x00" * 32, "hi"))
    assert seen == [("Report", "t1")]


TERMS = SubmissionTerms(limit_seconds=10, max_unit_price=100, units=1, bid_window=5, audit_rate_bps=0)


def test_exec_blocks_cover_three_times_the_limit_within_the_chains_bounds() -> None:
    assert exec_blocks_for(10, 1.0, 1_000) == 45
    assert exec_blocks_for(0.1, 1.0, 1_000) == 20  # never fewer than MIN_EXEC_BLOCKS
    assert exec_blocks_for(1_000, 1.0, 64) == 64


def test_a_plan_locks_escrow_and_fee_and_refuses_what_the_balance_cannot_cover() -> None:
    params = Params()
    cost = 100 + params.audit_fee + params.min_fee
    plan = plan_submission(TERMS, params, available=cost, block_seconds=1.0, enough_bids=2, max_wait_blocks=0)
    assert (plan.escrow, plan.cost) == (100 + params.audit_fee, cost)
    assert plan.config.fee == params.min_fee and plan.config.enough_bids == 2
    with pytest.raises(Unaffordable) as refused:
        plan_submission(TERMS, params, available=cost - 1, block_seconds=1.0, enough_bids=0, max_wait_blocks=0)
    assert refused.value.plan.cost == cost and refused.value.available == cost - 1
    with pytest.raises(InvalidTerms, match="bid_window"):
        plan_submission(SubmissionTerms(10, 100, 1, params.max_bid_window + 1, 0), params, available=cost,
                        block_seconds=1.0, enough_bids=0, max_wait_blocks=0)
