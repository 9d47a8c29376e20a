"""The client's submission policy: what a task's terms become, and whether the node can afford to post it.

Pure (no I/O, no clock): the node's client service (``p2pgpu.clientservice``) asks
:func:`plan_submission` before it takes a nonce, seals inputs or writes the
journal, and maps a refusal to its API error (``invalid_terms`` → 422,
``Unaffordable`` → 402). Kept here, beside :class:`ClientTask`, because it is
market policy -- how long a job may run, what escrow it locks -- not
plumbing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from .client import ClientConfig

__all__ = ["MIN_EXEC_BLOCKS", "ChainLimits", "InvalidTerms", "SubmissionPlan", "SubmissionRefused", "SubmissionTerms",
           "Unaffordable", "exec_blocks_for", "plan_submission"]

MIN_EXEC_BLOCKS = 20
"""No task gets fewer blocks to run in than this, however short its spec's time limit."""
EXEC_SLACK_S = 5
"""Seconds added to a spec's time limit (fetching inputs, delivering) before the 3x margin."""


class ChainLimits(Protocol):
    """What of the chain's ``ledger.params.Params`` a submission is planned against."""

    @property
    def min_fee(self) -> int: ...
    @property
    def max_exec_blocks(self) -> int: ...
    @property
    def max_bid_window(self) -> int: ...
    @property
    def max_stream_units(self) -> int: ...
    @property
    def audit_fee(self) -> int: ...
    @property
    def reopen_after_blocks(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SubmissionTerms:
    """The market terms of one submission (the API's ``SubmitRequest`` without its tensors)."""

    limit_seconds: float
    """The spec's ``limits.seconds``."""
    max_unit_price: int
    units: int
    bid_window: int
    audit_rate_bps: int
    royalty_per_unit: int = 0
    """The registered royalty of the model the spec names (escrowed per unit beside the price; 0 without one)."""


@dataclass(frozen=True, slots=True)
class SubmissionPlan:
    config: ClientConfig
    escrow: int
    """What the PostTask locks: ``(max_unit_price + royalty_per_unit) * units`` plus the audit fee."""
    cost: int
    """Escrow plus the PostTask's fee: what the node's available balance must cover."""


class SubmissionRefused(Exception):
    """The task cannot be posted as asked; nothing was reserved or sent."""


class InvalidTerms(SubmissionRefused):
    """Terms outside the chain's limits (a clear refusal, not a transaction the mempool would refuse)."""


class Unaffordable(SubmissionRefused):
    def __init__(self, plan: SubmissionPlan, available: int) -> None:
        self.plan = plan
        self.available = available
        super().__init__(f"this task needs {plan.cost} but {max(available, 0)} is available")


def exec_blocks_for(limit_seconds: float, block_seconds: float, max_exec_blocks: int) -> int:
    """Blocks the provider gets to run the job: three times its time limit plus slack, at least
    :data:`MIN_EXEC_BLOCKS`, at most what the chain allows."""
    wanted = max(MIN_EXEC_BLOCKS, math.ceil(3 * (limit_seconds + EXEC_SLACK_S) / block_seconds))
    return min(wanted, max_exec_blocks)


def plan_submission(terms: SubmissionTerms, limits: ChainLimits, *, available: int, block_seconds: float,
                    enough_bids: int, max_wait_blocks: int) -> SubmissionPlan:
    """The task's client configuration and what it costs; raises :class:`InvalidTerms` or :class:`Unaffordable`.

    ``available``: the node's balance minus what its unexecuted transactions
    may still take (``TxSender.available``).
    """
    config = ClientConfig(
        fee=limits.min_fee,
        bid_window=terms.bid_window,
        exec_blocks=exec_blocks_for(terms.limit_seconds, block_seconds, limits.max_exec_blocks),
        audit_rate_bps=terms.audit_rate_bps,
        enough_bids=enough_bids,
        max_wait_blocks=max_wait_blocks,
        reopen_after_blocks=limits.reopen_after_blocks,
    )
    if not 1 <= terms.bid_window <= limits.max_bid_window:
        raise InvalidTerms(f"bid_window {terms.bid_window}: this chain allows 1..{limits.max_bid_window} blocks")
    if not 1 <= terms.units <= limits.max_stream_units:
        raise InvalidTerms(f"units {terms.units}: this chain allows 1..{limits.max_stream_units}")
    escrow = (terms.max_unit_price + terms.royalty_per_unit) * terms.units + limits.audit_fee
    plan = SubmissionPlan(config=config, escrow=escrow, cost=escrow + limits.min_fee)
    if available < plan.cost:
        raise Unaffordable(plan, available)
    return plan
