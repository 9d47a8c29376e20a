"""The per-key token bucket (``p2pgpu.net.ratelimit``): pure, clock injected, bounded memory.

The limiter is synchronous and holds no ``await``: a check and its charge
happen in one step, so concurrent Trio callers cannot interleave inside it
(nothing to race; no many-callers test needed beyond the sequence below).
"""

from __future__ import annotations

import pytest

from p2pgpu.net.ratelimit import KeyedRateLimiter, RateLimit, RateLimitError


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_refills() -> None:
    clock = FakeClock()
    limiter: KeyedRateLimiter[str] = KeyedRateLimiter(RateLimit(rate=10.0, burst=5), clock=clock)
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allowed == 5 and limiter.refused == 2
    clock.now += 0.25  # 2.5 tokens
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    clock.now += 60.0  # refills to the burst, never beyond
    assert limiter.tokens("a") == 5.0
    assert [limiter.allow("a") for _ in range(6)] == [True] * 5 + [False]


def test_keys_are_independent_and_a_refused_message_takes_nothing() -> None:
    clock = FakeClock()
    limiter: KeyedRateLimiter[str] = KeyedRateLimiter(RateLimit(rate=1.0, burst=2), clock=clock)
    assert limiter.allow("a") and limiter.allow("a")
    for _ in range(100):
        assert not limiter.allow("a")
    assert limiter.allow("b") and limiter.allow("b")
    clock.now += 1.0
    assert limiter.allow("a")  # a hundred refusals did not push "a" into debt
    assert not limiter.allow("a")


def test_a_clock_that_steps_back_neither_refills_nor_takes() -> None:
    clock = FakeClock(50.0)
    limiter: KeyedRateLimiter[str] = KeyedRateLimiter(RateLimit(rate=1.0, burst=1), clock=clock)
    assert limiter.allow("a")
    clock.now = 10.0
    assert not limiter.allow("a")
    clock.now = 50.5
    assert not limiter.allow("a")
    clock.now = 51.0
    assert limiter.allow("a")


def test_memory_is_bounded_and_the_least_recently_seen_key_goes_first() -> None:
    clock = FakeClock()
    limiter: KeyedRateLimiter[int] = KeyedRateLimiter(RateLimit(rate=1.0, burst=1), max_keys=3, clock=clock)
    for key in (1, 2, 3):
        assert limiter.allow(key)
    assert not limiter.allow(1)  # 1 is now the most recently seen
    assert limiter.allow(4)  # evicts 2, the least recently seen
    assert len(limiter) == 3 and limiter.evicted == 1
    assert not limiter.allow(1) and not limiter.allow(3) and not limiter.allow(4)
    assert limiter.allow(2)  # forgotten, so it starts full again
    for key in range(10, 10_010):
        limiter.allow(key)
    assert len(limiter) == 3


def test_bad_limits_are_refused_with_the_value_named() -> None:
    with pytest.raises(RateLimitError, match="rate must be a finite number > 0.*got 0"):
        RateLimit(rate=0.0, burst=1)
    with pytest.raises(RateLimitError, match="rate.*got nan"):
        RateLimit(rate=float("nan"), burst=1)
    with pytest.raises(RateLimitError, match="burst must be >= 1, got 0"):
        RateLimit(rate=1.0, burst=0)
    with pytest.raises(RateLimitError, match="max_keys must be >= 1, got 0"):
        KeyedRateLimiter(RateLimit(rate=1.0, burst=1), max_keys=0)
    assert RateLimit(rate=4.0, burst=8).refill_seconds == 2.0
