"""Per-key token buckets: how much gossip one sender, client or peer may make us handle.

Pure and synchronous (no I/O, no Trio): the caller passes a clock, so tests
drive time by hand and the gossip validators (plain functions called from
inside libp2p's validation) can ask without awaiting anything. There is no
``await`` between reading a bucket and charging it, so concurrent callers in
one Trio run cannot interleave inside :meth:`KeyedRateLimiter.allow`.

Each key has a bucket of ``burst`` tokens that refills at ``rate`` tokens per
second; a message takes one token, and a message that finds its bucket empty
is refused and takes nothing. Memory is bounded: at most ``max_keys`` buckets
are kept, least recently used first out. Evicting a bucket that has been idle
for ``burst / rate`` seconds loses nothing (it had refilled, and a new bucket
starts full); evicting a younger one forgives what its key had used, which a
sender can force only by making ``max_keys`` other keys be counted first --
and every limiter here counts only messages that passed their signature
check (and funding checks), so each key is a funded account or a connected
peer, not a number an attacker can make up.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["KeyedRateLimiter", "RateLimit", "RateLimitError"]

K = TypeVar("K", bound=Hashable)


class RateLimitError(ValueError):
    """A rate limit that cannot work (a rate or burst out of range); the message names the bad value."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``burst`` messages at once, then ``rate`` per second on average."""

    rate: float
    """Tokens added per second (> 0)."""
    burst: int
    """Bucket capacity: what a key may send at once after being quiet (>= 1)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise RateLimitError(f"rate must be a finite number > 0 per second, got {self.rate}")
        if self.burst < 1:
            raise RateLimitError(f"burst must be >= 1, got {self.burst}")

    @property
    def refill_seconds(self) -> float:
        """How long an emptied bucket takes to fill again."""
        return self.burst / self.rate


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class KeyedRateLimiter(Generic[K]):
    """One token bucket per key, at most ``max_keys`` of them (see the module docstring)."""

    def __init__(self, limit: RateLimit, *, max_keys: int = 65_536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise RateLimitError(f"max_keys must be >= 1, got {max_keys}")
        self.limit = limit
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[K, _Bucket] = OrderedDict()
        self.allowed = 0
        """Messages let through so far."""
        self.refused = 0
        """Messages refused so far (their bucket was empty)."""
        self.evicted = 0
        """Buckets dropped to stay within ``max_keys``."""

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.updated)  # a clock that steps back refills nothing, takes nothing
        return min(float(self.limit.burst), bucket.tokens + elapsed * self.limit.rate)

    def tokens(self, key: K) -> float:
        """Tokens ``key`` has now (``burst`` for a key not tracked); does not count as a use."""
        bucket = self._buckets.get(key)
        return float(self.limit.burst) if bucket is None else self._refilled(bucket, self._clock())

    def allow(self, key: K, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it has them: True (let through) or False (refused)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.limit.burst), now)
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self.evicted += 1
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = self._refilled(bucket, now)
            bucket.updated = max(bucket.updated, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            self.allowed += 1
            return True
        self.refused += 1
        return False
