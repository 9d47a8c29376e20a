"""The engine's tunables (timeouts, sync pacing, early blocks) and its step enums."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ConsensusConfig", "Step", "TimeoutStep"]


@dataclass(frozen=True, slots=True)
class ConsensusConfig:
    timeout_propose_s: float = 0.3
    timeout_propose_delta_s: float = 0.15
    timeout_prevote_s: float = 0.1
    timeout_prevote_delta_s: float = 0.05
    timeout_precommit_s: float = 0.1
    timeout_precommit_delta_s: float = 0.05
    rebroadcast_s: float = 0.5  # re-send own proposal and votes while a round lasts (lossy links)
    sync_wait_s: float = 0.2  # how long next-height messages may precede our own commit before we sync
    max_block_txs: int = 1000
    max_block_bytes: int = 4 << 20
    max_buffered_messages: int = 4096  # next-height messages held until we commit
    max_round_ahead: int = 64  # votes further ahead than this are dropped
    sync_batch: int = 64  # blocks per sync request; a full batch back means we are further behind
    sync_retry_s: float = 0.5  # a sync request that brought nothing is retried after this, doubling each time
    sync_retry_max_s: float = 10.0  # ... up to this
    max_claim_requests: int = 4  # sync requests an unproven claim (unknown committee) may cause before it is dropped
    # Tendermint's timeout_commit: after a commit the next proposer waits this long before proposing,
    # which paces blocks (deadlines are counted in blocks) and lets transactions gather. 0 = no pause.
    timeout_commit_s: float = 0.0
    # Early blocks: with executable transactions waiting, the proposer may propose as soon as
    # ``min_commit_pause_s`` after the commit, instead of ``timeout_commit_s``, provided the last
    # ``pace_window`` blocks (by this node's commit times) still average at least ``timeout_commit_s``
    # apart. Latency borrows the time consensus itself took; the pace of blocks is kept.
    # ``min_commit_pause_s >= timeout_commit_s`` or ``pace_window = 0`` turns it off.
    min_commit_pause_s: float = 0.0
    pace_window: int = 0
    # ... and not before ``tx_batch_s`` after the first transaction became available at this height, so a
    # burst of related transactions (a PostTask, then its Assign once bids are in) shares one block.
    tx_batch_s: float = 0.0

    @property
    def early_blocks(self) -> bool:
        """Whether a proposer with transactions waiting may end its post-commit pause early."""
        return self.pace_window > 0 and self.min_commit_pause_s < self.timeout_commit_s

    def timeout_propose(self, round_: int) -> float:
        return self.timeout_propose_s + round_ * self.timeout_propose_delta_s

    def timeout_prevote(self, round_: int) -> float:
        return self.timeout_prevote_s + round_ * self.timeout_prevote_delta_s

    def timeout_precommit(self, round_: int) -> float:
        return self.timeout_precommit_s + round_ * self.timeout_precommit_delta_s


class Step(enum.IntEnum):
    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2


class TimeoutStep(enum.IntEnum):
    """The consensus timers of one (height, round). The catch-up schedule has a timer kind of its own
    (:class:`~ledger.consensus.events.ScheduleSync`); 4 was its step when it borrowed this one."""

    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2
    REBROADCAST = 3
    COMMIT = 5  # the pause after a commit is over: the proposer of round 0 proposes
