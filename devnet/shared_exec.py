"""Block execution, block hashes and proposers computed once per process for all the engines a simulator runs.

Every simulated validator executes every proposed block against the same
parent state, hashes the same block objects and draws the same proposer
from the same committee; all three are pure functions of their arguments
(:func:`ledger.transition.apply_block` with the tx signature checks and the
state root; the header encoding; the committee hash and a seeded draw). A
real node computes each once, for itself. The simulator plays a hundred
nodes in one process, so it computes each once for all of them. Nothing is
skipped: the first engine to ask runs the full computation, and the others
receive its result — the same post-state, or the same error.

An execution is found by (parent height, parent head hash, block hash), and
used only if the remembered parent and block are the asked ones themselves
or equal to them field by field (a restarted node replays to an equal, not
an identical, state; a synced block is decoded anew; a forged block may
reuse an honest header with other transactions). Anything else is executed
afresh and replaces the entry. Block hashes and proposers are remembered per
object (blocks and committees are frozen records; the object is kept with
its entry, so its ``id`` cannot be reused while the entry lives).

Post-states are shared between engines. That is sound because the engine,
its host and the mempool never mutate a state they hold (the ledger's rule is
``State.copy`` before any change), which is also what lets one engine share
its state with its own mempool.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ledger.blocks import Block
from ledger.consensus import BlockComputations
from ledger.exceptions import LedgerError
from ledger.state import Committee, State

__all__ = ["SharedComputations"]


class SharedComputations(BlockComputations):
    """A remembering :class:`~ledger.consensus.BlockComputations`, for many engines in one process."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._executions: OrderedDict[tuple[int, bytes, bytes], tuple[State, Block, State | LedgerError]] = OrderedDict()
        self._hashes: OrderedDict[int, tuple[Block, bytes]] = OrderedDict()
        self._proposers: OrderedDict[tuple[int, int, int], tuple[Committee, bytes]] = OrderedDict()
        self.executions = 0
        self.execution_hits = 0

    def _bound(self, entries: OrderedDict[Any, Any], limit: int) -> None:
        while len(entries) > limit:
            entries.popitem(last=False)

    def execute(self, state: State, block: Block) -> State:
        key = (state.height, state.last_block_hash, self.block_hash(block))
        hit = self._executions.get(key)
        if hit is not None and (hit[0] is state or hit[0] == state) and (hit[1] is block or hit[1] == block):
            self.execution_hits += 1
            self._executions.move_to_end(key)
            outcome = hit[2]
        else:
            self.executions += 1
            try:
                outcome = super().execute(state, block)
            except LedgerError as exc:
                outcome = exc
            self._executions[key] = (state, block, outcome)
            self._executions.move_to_end(key)
            self._bound(self._executions, self.max_entries)
        if isinstance(outcome, LedgerError):
            raise outcome.with_traceback(None)
        return outcome

    def block_hash(self, block: Block) -> bytes:
        hit = self._hashes.get(id(block))
        if hit is not None and hit[0] is block:
            return hit[1]
        digest = block.block_hash()
        self._hashes[id(block)] = (block, digest)
        self._bound(self._hashes, 16 * self.max_entries)
        return digest

    def proposer(self, committee: Committee, height: int, round_: int) -> bytes:
        key = (id(committee), height, round_)
        hit = self._proposers.get(key)
        if hit is not None and hit[0] is committee:
            return hit[1]
        address = super().proposer(committee, height, round_)
        self._proposers[key] = (committee, address)
        self._bound(self._proposers, 16 * self.max_entries)
        return address
