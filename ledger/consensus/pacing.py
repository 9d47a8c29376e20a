"""Early blocks: when a proposer with transactions waiting may end its post-commit pause.

Tendermint's ``timeout_commit`` paces blocks (deadlines are counted in
blocks) and lets transactions gather. With ``ConsensusConfig.early_blocks``
on, a proposer whose mempool has executable transactions may propose as soon
as ``min_commit_pause_s`` after the commit (and ``tx_batch_s`` after the
first transaction of the height), as long as its last ``pace_window``
commits stay ``timeout_commit_s`` apart on average. Plain arithmetic over
this node's commit times; the engine decides whether it is the waiting
proposer and schedules the ``COMMIT`` timeout this returns.
"""

from __future__ import annotations

from collections import deque

from ledger.consensus.config import ConsensusConfig

__all__ = ["BlockPacer"]


class BlockPacer:
    """This node's recent commit times, and when the next block may be proposed."""

    def __init__(self, config: ConsensusConfig) -> None:
        self.config = config
        # our commit times of the last pace_window blocks (the newest last)
        self._commit_times: deque[int] = deque(maxlen=max(config.pace_window, 1))
        self._early_scheduled = -1  # the height whose early proposal is already scheduled
        self._txs_seen: tuple[int, int] = (-1, 0)  # (height, now_ms) of the first TxsAvailable at that height
        self.early_proposals = 0  # proposals made before timeout_commit_s because transactions waited

    def on_commit(self, now_ms: int) -> None:
        self._commit_times.append(now_ms)

    def regular_proposal_ms(self, now_ms: int) -> int:
        """When the post-commit pause ends (``timeout_commit_s`` after our last commit)."""
        if not self._commit_times:
            return now_ms
        return self._commit_times[-1] + round(self.config.timeout_commit_s * 1000)

    def on_proposal(self, now_ms: int) -> None:
        """The waiting proposer proposes now (its COMMIT timeout fired): count it if the pause was cut short."""
        if now_ms < self.regular_proposal_ms(now_ms):
            self.early_proposals += 1

    def early_proposal_ms(self, height: int, now_ms: int) -> int | None:
        """The earliest time ``height``'s block may be proposed with transactions waiting, or None.

        Not before ``min_commit_pause_s`` after the commit, and not before the last ``pace_window`` blocks
        would average ``timeout_commit_s`` apart (so under steady load blocks keep their configured pace, and
        deadlines counted in blocks keep their length); never later than the regular pause.
        """
        cfg = self.config
        # fewer than pace_window commits since start: the same rule over the ones we saw (at least 2)
        known = len(self._commit_times)
        if not cfg.early_blocks or known < 2:
            return None
        seen_height, seen_ms = self._txs_seen
        first_tx_ms = seen_ms if seen_height == height else now_ms
        earliest = max(self._commit_times[-1] + round(cfg.min_commit_pause_s * 1000),
                       self._commit_times[0] + round(known * cfg.timeout_commit_s * 1000),
                       first_tx_ms + round(cfg.tx_batch_s * 1000))
        regular = self.regular_proposal_ms(now_ms)
        return earliest if earliest < regular else None

    def is_scheduled(self, height: int) -> bool:
        """Whether ``height``'s early proposal is already scheduled."""
        return self._early_scheduled == height

    def schedule_early(self, height: int, now_ms: int) -> float | None:
        """Transactions are waiting for the proposer of ``height``: the delay (s) after which it may propose,
        or None (no earlier than the regular pause). Remembers the first call per height (``tx_batch_s``
        counts from it) and that the proposal is scheduled."""
        if self._txs_seen[0] != height:
            self._txs_seen = (height, now_ms)
        at = self.early_proposal_ms(height, now_ms)
        if at is None:
            return None
        self._early_scheduled = height
        return max(0, at - now_ms) / 1000
