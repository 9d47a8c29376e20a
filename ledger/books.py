"""The ledger's books: every bucket funds can sit in, and whether they add up.

Funds only move between buckets; ``block_reward`` is the only mint (see
:mod:`ledger.transition`). So at every height the buckets must sum to the
genesis supply plus what has been minted. :func:`get_books` breaks that sum
down by bucket, so someone outside the node (the API serves it at
``GET /ledger/supply``) can see *where* the money is, recompute the total
from the parts, and tell a leak from a mint.

Burned funds stay in the books as a bucket of their own: burning moves funds
out of use, it does not make them unaccounted for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # state.py imports this module for total_supply(); no runtime cycle
    from ledger.state import State

__all__ = ["BUCKETS", "Books", "get_books"]

BUCKETS: tuple[str, ...] = ("balances", "escrow", "collateral", "dispute_bonds", "stake", "unbonding",
                            "provider_bonds", "fee_pool", "burned")
"""The :class:`Books` fields funds sit in; they sum to the total (readers of ``GET /ledger/supply`` add these)."""


@dataclass(frozen=True, slots=True)
class Books:
    """The funds in each bucket at one height, and the two figures they must add up to."""

    height: int
    balances: int  # accounts' spendable balances
    escrow: int  # clients' funds held by tasks (price part + model royalty part + audit fee)
    collateral: int  # providers' funds locked per assigned task
    dispute_bonds: int  # clients' bonds on disputed tasks
    stake: int  # validators' bonded stake
    unbonding: int  # stake on its way back to balances
    provider_bonds: int  # providers' registration bonds
    fee_pool: int  # fees of the block being applied (paid out at its end, so 0 between blocks)
    burned: int  # slashed or unclaimed funds, and model registration fees, taken out of use
    genesis_supply: int  # what the genesis record created
    minted: int  # block rewards so far

    @property
    def total(self) -> int:
        """Everything that exists, summed from the buckets (``State.total_supply`` is this)."""
        return sum(getattr(self, bucket) for bucket in BUCKETS)

    @property
    def conserved(self) -> bool:
        """True when nothing was created but by minting and nothing was lost: total == genesis + minted."""
        return self.total == self.genesis_supply + self.minted


def get_books(state: State) -> Books:
    """The books of ``state``: one pass over its accounts, validators, providers and tasks."""
    escrow = collateral = dispute_bonds = 0
    for t in state.tasks.values():
        escrow += t.escrow
        collateral += t.collateral
        dispute_bonds += t.dispute_bond
    stake = unbonding = 0
    for v in state.validators.values():
        stake += v.stake
        unbonding += sum(u.amount for u in v.unbonding)
    return Books(
        height=state.height,
        balances=sum(a.balance for a in state.accounts.values()),
        escrow=escrow,
        collateral=collateral,
        dispute_bonds=dispute_bonds,
        stake=stake,
        unbonding=unbonding,
        provider_bonds=sum(p.bond for p in state.providers.values()),
        fee_pool=state.fee_pool,
        burned=state.burned,
        genesis_supply=state.genesis_supply,
        minted=state.minted,
    )
