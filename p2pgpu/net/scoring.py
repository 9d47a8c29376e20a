"""Per-peer reputation from gossip validation: a pure state machine, no I/O.

Each rejection costs a peer ``rejection_penalty`` points; the score recovers
linearly towards zero at ``recovery_per_second`` so an honest peer that once
relayed one bad message is not punished forever. Crossing ``ban_threshold``
bans the peer for ``ban_seconds``: the shell disconnects it and does not
redial or accept it until the ban expires. Time is passed in by the caller
(``now``, seconds on any monotonic clock), which keeps this testable without
a clock and usable from a deterministic simulator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    rejection_penalty: float = 10.0
    recovery_per_second: float = 0.5
    ban_threshold: float = -50.0
    ban_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.rejection_penalty <= 0:
            raise ValueError(f"rejection_penalty must be > 0, got {self.rejection_penalty}")
        if self.recovery_per_second < 0:
            raise ValueError(f"recovery_per_second must be >= 0, got {self.recovery_per_second}")
        if self.ban_threshold >= 0:
            raise ValueError(f"ban_threshold must be < 0, got {self.ban_threshold}")
        if self.ban_seconds <= 0:
            raise ValueError(f"ban_seconds must be > 0, got {self.ban_seconds}")


@dataclass(frozen=True, slots=True)
class ScoreSummary:
    """What an operator can watch of the scores without a label per peer (peer ids grow without bound)."""

    banned: int
    """Peers kept out now: banned for a low score, or refused without one (e.g. a peer of another chain)."""
    below_zero: int
    """Peers charged and not yet recovered to zero, banned ones included."""
    lowest: float
    """The lowest score among the peers asked about (the connected ones); 0.0 when none was charged."""


@dataclass(slots=True)
class _Entry:
    score: float
    updated: float


@dataclass(slots=True)
class PeerScores:
    """Scores and bans keyed by peer id (any hashable; the shell uses base58 strings)."""

    config: ScoreConfig = field(default_factory=ScoreConfig)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _banned_until: dict[str, float] = field(default_factory=dict)

    def score(self, peer: str, now: float) -> float:
        entry = self._entries.get(peer)
        if entry is None:
            return 0.0
        return self._recovered(entry, now)

    def _recovered(self, entry: _Entry, now: float) -> float:
        elapsed = max(0.0, now - entry.updated)
        return min(0.0, entry.score + elapsed * self.config.recovery_per_second)

    def on_rejection(self, peer: str, now: float) -> bool:
        """Charge ``peer`` for one invalid message; True if this call banned it."""
        entry = self._entries.get(peer)
        current = 0.0 if entry is None else self._recovered(entry, now)
        new_score = current - self.config.rejection_penalty
        self._entries[peer] = _Entry(new_score, now)
        if new_score <= self.config.ban_threshold and not self.is_banned(peer, now):
            self._banned_until[peer] = now + self.config.ban_seconds
            return True
        return False

    def ban(self, peer: str, now: float, seconds: float) -> bool:
        """Ban ``peer`` for ``seconds`` whatever its score (a peer of another chain); True if it is new."""
        new = not self.is_banned(peer, now)
        self._banned_until[peer] = max(self._banned_until.get(peer, now), now + seconds)
        return new

    def is_banned(self, peer: str, now: float) -> bool:
        until = self._banned_until.get(peer)
        return until is not None and now < until

    def banned(self, now: float) -> list[str]:
        return [peer for peer, until in self._banned_until.items() if now < until]

    def expire(self, now: float) -> list[str]:
        """Lift bans that have run out and forget fully recovered peers.

        Returns the peers whose ban was lifted, so the shell can undo what it did
        when banning them. A lifted peer starts again from zero.
        """
        lifted = [peer for peer, until in self._banned_until.items() if now >= until]
        for peer in lifted:
            del self._banned_until[peer]
            self._entries.pop(peer, None)
        recovered = [p for p, e in self._entries.items() if self._recovered(e, now) >= 0.0]
        for peer in recovered:
            del self._entries[peer]
        return lifted

    def summary(self, now: float, peers: Iterable[str]) -> ScoreSummary:
        """Counts over every scored peer, and the lowest score among ``peers`` (an unscored peer counts 0.0).

        For ``/metrics``: bounded cardinality whatever the number of peers, and
        pure (no expiry): a ban past its end is not counted though
        :meth:`expire` has not run yet.
        """
        banned = sum(1 for until in self._banned_until.values() if now < until)
        below = sum(1 for entry in self._entries.values() if self._recovered(entry, now) < 0.0)
        lowest = min((self.score(peer, now) for peer in peers), default=0.0)
        return ScoreSummary(banned=banned, below_zero=below, lowest=min(lowest, 0.0))

    def snapshot(self, now: float) -> dict[str, float]:
        return {peer: self._recovered(entry, now) for peer, entry in self._entries.items()}
