"""A model lane over fake live sessions: batching, failover, renewal, idling, and nobody's answer lost or wrong."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import trio
import trio.testing

from p2pgpu.gateway.batcher import BatchPolicy
from p2pgpu.gateway.errors import ModelNotReady, TooManyInferRequests
from p2pgpu.gateway.lanes import (LanePolicy, LaneTarget, ModelLane, NoSession, SessionExhausted, SessionLost)

TARGET = LaneTarget(model_id=b"\x01" * 32, label="mnist@1", output_dtype="float32", output_shape=(2,))


def model(x: np.ndarray) -> np.ndarray:
    """The fake model: per row, (sum, max) of the row."""
    return np.stack([x.sum(axis=1), x.max(axis=1)], axis=1).astype(np.float32)


class FakeSession:
    def __init__(self, provider: int, *, units: int = 1000, latency: float = 0.01,
                 lose_after: int | None = None, stall_after: int | None = None,
                 answer: Callable[[np.ndarray], np.ndarray] = model) -> None:
        self.provider = bytes([provider]) * 20
        self.remaining = units
        self.latency = latency
        self.lose_after = lose_after
        self.stall_after = stall_after
        self.answer = answer
        self.items: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.closed = False

    async def infer(self, item: np.ndarray) -> np.ndarray:
        if self.remaining <= 0:
            raise SessionExhausted("cap reached")
        self.remaining -= 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            n = len(self.items)
            self.items.append(int(item.shape[0]))
            if self.stall_after is not None and n >= self.stall_after:
                await trio.sleep_forever()
            await trio.sleep(self.latency)
            if self.lose_after is not None and n >= self.lose_after:
                raise SessionLost("provider disconnected")
            return self.answer(item)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        self.closed = True


class Opener:
    def __init__(self, *sessions: FakeSession | str) -> None:
        self.queue = list(sessions)
        self.avoided: list[frozenset[bytes]] = []

    async def __call__(self, target: LaneTarget, avoid: frozenset[bytes]) -> FakeSession:
        self.avoided.append(avoid)
        await trio.sleep(0.5)  # an auction
        nxt = self.queue.pop(0) if self.queue else "no bids before the bid window closed"
        if isinstance(nxt, str):
            raise NoSession(nxt)
        return nxt


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)


async def call_many(lane: ModelLane, inputs: list[np.ndarray]) -> list[np.ndarray | Exception]:
    out: list[np.ndarray | Exception] = [np.zeros(0)] * len(inputs)

    async def one(i: int) -> None:
        try:
            out[i] = await lane.infer(inputs[i])
        except Exception as exc:  # noqa: BLE001 -- the test inspects it
            out[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(inputs)):
            nursery.start_soon(one, i)
    return out


async def test_concurrent_callers_share_items_and_each_gets_its_own_rows(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession(1)
    lane = ModelLane(TARGET, Opener(session), LanePolicy(batching=BatchPolicy(max_rows=16), window=2))
    inputs = [rows(1 + i % 3, i) for i in range(64)]
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        out = await call_many(lane, inputs)
        nursery.cancel_scope.cancel()
    for x, y in zip(inputs, out, strict=True):
        assert isinstance(y, np.ndarray)
        np.testing.assert_array_equal(y, model(x))
    assert sum(session.items) == sum(len(x) for x in inputs)
    assert len(session.items) < 64 and max(session.items) <= 16  # batched, never over an item
    assert session.most_in_flight <= 2
    assert lane.stats.answered == 64 and lane.stats.failed == 0


async def test_a_lost_session_fails_over_and_loses_no_request(autojump_clock: trio.abc.Clock) -> None:
    first, second = FakeSession(1, lose_after=3), FakeSession(2)
    opener = Opener(first, second)
    lane = ModelLane(TARGET, opener, LanePolicy(batching=BatchPolicy(max_rows=4), window=2))
    inputs = [rows(1, i) for i in range(40)]
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        out = await call_many(lane, inputs)
        nursery.cancel_scope.cancel()
    for x, y in zip(inputs, out, strict=True):
        assert isinstance(y, np.ndarray), y
        np.testing.assert_array_equal(y, model(x))
    assert lane.stats.sessions_lost == 1 and lane.stats.failovers >= 1
    assert opener.avoided[-1] == frozenset({first.provider})  # the next auction knows who failed
    assert first.closed


async def test_a_stalled_provider_is_given_up_after_stall_s(autojump_clock: trio.abc.Clock) -> None:
    stalled, healthy = FakeSession(1, stall_after=0), FakeSession(2)
    lane = ModelLane(TARGET, Opener(stalled, healthy), LanePolicy(stall_s=2.0))
    x = rows(2, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        start = trio.current_time()
        y = await lane.infer(x)
        waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
    np.testing.assert_array_equal(y, model(x))
    assert 2.0 <= waited < 4.0  # stall_s, then a fresh auction (0.5 s here)


@pytest.mark.parametrize("bad", [
    lambda x: model(x)[:-1],                         # a row short
    lambda x: model(x).astype(np.float64),           # wrong dtype
    lambda x: np.zeros((x.shape[0], 3), np.float32),  # wrong per-item shape
])
async def test_a_wrong_shaped_answer_never_reaches_a_caller(autojump_clock: trio.abc.Clock,
                                                           bad: Callable[[np.ndarray], np.ndarray]) -> None:
    liar, honest = FakeSession(1, answer=bad), FakeSession(2)
    lane = ModelLane(TARGET, Opener(liar, honest), LanePolicy())
    x = rows(2, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        y = await lane.infer(x)
        nursery.cancel_scope.cancel()
    np.testing.assert_array_equal(y, model(x))
    assert lane.stats.sessions_lost == 1


async def test_with_no_provider_every_waiting_request_fails_with_the_reason(autojump_clock: trio.abc.Clock) -> None:
    lane = ModelLane(TARGET, Opener("3 providers declined: price above max_unit_price"), LanePolicy())
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        out = await call_many(lane, [rows(1, i) for i in range(5)])
        nursery.cancel_scope.cancel()
    for y in out:
        assert isinstance(y, ModelNotReady)
        assert "mnist@1" in str(y) and "declined: price above" in str(y)
        assert y.status == 503


async def test_a_request_on_failing_providers_fails_after_max_attempts(autojump_clock: trio.abc.Clock) -> None:
    liars = [FakeSession(i, lose_after=0) for i in range(1, 5)]
    lane = ModelLane(TARGET, Opener(*liars), LanePolicy(max_attempts=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        with pytest.raises(ModelNotReady, match="3 providers of mnist@1 failed this request"):
            await lane.infer(rows(1, 0))
        nursery.cancel_scope.cancel()


async def test_the_next_session_opens_before_the_cap_and_traffic_moves_to_it(autojump_clock: trio.abc.Clock) -> None:
    first, second = FakeSession(1, units=10), FakeSession(2)
    lane = ModelLane(TARGET, Opener(first, second),
                     LanePolicy(batching=BatchPolicy(max_rows=1), window=1, renew_below=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        for i in range(30):
            np.testing.assert_array_equal(await lane.infer(rows(1, i)), model(rows(1, i)))
        nursery.cancel_scope.cancel()
    assert len(first.items) <= 10 and len(first.items) + len(second.items) == 30
    assert lane.stats.sessions_lost == 0 and lane.stats.failed == 0


async def test_an_idle_lane_closes_its_session_and_ends(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession(1)
    lane = ModelLane(TARGET, Opener(session), LanePolicy(idle_s=10.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        await lane.infer(rows(1, 0))
        await trio.sleep(11.0)
        assert lane.closed and session.closed
    with pytest.raises(ModelNotReady, match="stopped"):
        await lane.infer(rows(1, 0))


async def test_a_caller_that_gives_up_leaves_the_others_served(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession(1, latency=1.0)
    lane = ModelLane(TARGET, Opener(session), LanePolicy(batching=BatchPolicy(max_rows=1), window=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        with trio.move_on_after(0.1):  # still waiting for the auction: leaves the queue
            await lane.infer(rows(1, 0))
        out = await call_many(lane, [rows(1, i) for i in range(1, 4)])
        nursery.cancel_scope.cancel()
    assert all(isinstance(y, np.ndarray) for y in out)
    assert session.items == [1, 1, 1]


async def test_a_full_queue_answers_429(autojump_clock: trio.abc.Clock) -> None:
    lane = ModelLane(TARGET, Opener(FakeSession(1, latency=5.0)),
                     LanePolicy(batching=BatchPolicy(max_rows=2, max_queued_rows=4), window=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        for i in range(4):
            nursery.start_soon(lane.infer, rows(1, i))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(TooManyInferRequests, match="overloaded"):
            await lane.infer(rows(1, 9))
        nursery.cancel_scope.cancel()


async def test_a_warm_lane_opens_at_once_stays_open_and_reopens_after_a_loss(autojump_clock: trio.abc.Clock) -> None:
    first, second = FakeSession(1, lose_after=0), FakeSession(2)
    opener = Opener("nobody yet", first, second)
    lane = ModelLane(TARGET, opener, LanePolicy(keep_warm=True, idle_s=1.0, retry_s=2.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        await trio.sleep(5.0)  # the first auction failed; the retry opened `first`
        assert lane.serving and lane.last_refusal is None
        x = rows(1, 0)
        np.testing.assert_array_equal(await lane.infer(x), model(x))  # lost on `first`, answered on `second`
        await trio.sleep(30.0)  # far past idle_s: a warm lane stays
        assert not lane.closed and lane.serving and not second.closed
        nursery.cancel_scope.cancel()
    assert second.closed  # closed when the lane stopped


async def test_a_provider_that_lost_a_session_is_avoided_for_avoid_s_then_forgiven(
        autojump_clock: trio.abc.Clock) -> None:
    first, second, third = FakeSession(1, lose_after=0), FakeSession(2, lose_after=0), FakeSession(3)
    opener = Opener(first, second, third)
    lane = ModelLane(TARGET, opener, LanePolicy(avoid_s=10.0, max_attempts=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        await lane.infer(rows(1, 0))  # lost on 1, lost on 2, answered on 3
        assert opener.avoided == [frozenset(), frozenset({first.provider}),
                                  frozenset({first.provider, second.provider})]
        third.lose_after = 0
        opener.queue.append(FakeSession(4))
        await trio.sleep(11.0)  # 1 and 2 are forgiven; 3 is avoided once it fails
        await lane.infer(rows(1, 1))
        assert opener.avoided[-1] == frozenset({third.provider})
        nursery.cancel_scope.cancel()
