"""One block execution per (parent state, block) for all the engines a simulator runs in one process.

Every simulated validator executes every proposed block against the same
parent state, and :func:`ledger.transition.apply_block` (with the tx
signature checks and the state root) is a pure function of the two. A real
node executes each block once, for itself; the simulator plays a hundred
nodes in one process, so it executes each block once for all of them.
Nothing is skipped: the first engine to ask runs the full execution, and the
others receive its verdict — the same post-state, or the same error.

A result is found by (parent height, parent head hash, block hash), and
used only if the remembered parent and block are the asked ones themselves
or equal to them field by field (a restarted node replays to an equal, not
an identical, state; a synced block is decoded anew; a forged block may
reuse an honest header with other transactions). Anything else is executed
afresh and replaces the entry.

Post-states are shared between engines. That is sound because the engine,
its host and the mempool never mutate a state they hold (the ledger's rule is
``State.copy`` before any change), which is also what lets one engine share
its state with its own mempool.
"""

from __future__ import annotations

from collections import OrderedDict

from ledger.blocks import Block
from ledger.consensus import BlockExecutor, execute_block
from ledger.exceptions import LedgerError
from ledger.state import State

__all__ = ["SharedExecutor"]

_Key = tuple[int, bytes, bytes]


class SharedExecutor:
    """A caching :data:`~ledger.consensus.BlockExecutor`: ``executor(state, block) -> post-state``."""

    def __init__(self, execute: BlockExecutor = execute_block, max_entries: int = 256) -> None:
        self._execute = execute
        self.max_entries = max_entries
        self._entries: OrderedDict[_Key, tuple[State, Block, State | LedgerError]] = OrderedDict()
        self.executions = 0
        self.hits = 0

    def __call__(self, state: State, block: Block) -> State:
        key = (state.height, state.last_block_hash, block.block_hash())
        hit = self._entries.get(key)
        if hit is not None and (hit[0] is state or hit[0] == state) and (hit[1] is block or hit[1] == block):
            self.hits += 1
            self._entries.move_to_end(key)
            outcome = hit[2]
        else:
            self.executions += 1
            try:
                outcome = self._execute(state, block)
            except LedgerError as exc:
                outcome = exc
            self._entries[key] = (state, block, outcome)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        if isinstance(outcome, LedgerError):
            raise outcome.with_traceback(None)
        return outcome
