"""The gateway's dynamic batcher: order kept, items never over ``max_rows``, nothing taken twice or lost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.gateway.batcher import BatchPolicy, DynamicBatcher, QueueFull


def test_a_lone_request_goes_out_at_once_when_there_is_room() -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=8))
    b.add(1, 3, now=0.0)
    assert b.take(0.0, room=False) is None  # no room: it waits for a slot
    assert b.take(0.0, room=True) == [(1, 3)]
    assert len(b) == 0 and b.queued_rows == 0


def test_requests_that_gathered_while_busy_share_one_item_up_to_max_rows() -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=8))
    for key, rows in enumerate([3, 4, 2, 5]):
        b.add(key, rows, now=0.0)
    assert b.take(0.0, room=True) == [(0, 3), (1, 4)]  # 3+4=7; +2 would be 9
    assert b.take(0.0, room=True) == [(2, 2), (3, 5)]
    assert b.take(0.0, room=True) is None


def test_max_delay_holds_a_non_full_item_back_but_not_a_full_one() -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=4, max_delay_s=0.01))
    b.add(1, 1, now=1.0)
    assert b.next_deadline() == pytest.approx(1.01)
    assert b.take(1.005, room=True) is None
    assert b.take(1.01, room=True) == [(1, 1)]
    b.add(2, 2, now=2.0)
    b.add(3, 2, now=2.0)
    assert b.take(2.0, room=True) == [(2, 2), (3, 2)]  # full: no wait


def test_a_failed_batch_goes_back_to_the_front_in_order() -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=4))
    b.add(1, 2, now=0.0)
    b.add(2, 2, now=0.0)
    b.add(3, 1, now=0.0)
    first = b.take(0.0, room=True)
    assert first == [(1, 2), (2, 2)]
    b.requeue(first, now=1.0)
    assert b.take(1.0, room=True) == [(1, 2), (2, 2)]
    assert b.take(1.0, room=True) == [(3, 1)]


def test_the_queue_limit_refuses_new_requests_but_never_a_requeued_batch() -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=4, max_queued_rows=6))
    b.add(1, 4, now=0.0)
    b.add(2, 2, now=0.0)
    with pytest.raises(QueueFull, match="6 rows already wait"):
        b.add(3, 1, now=0.0)
    b.requeue([(9, 4)], now=0.0)
    assert b.queued_rows == 10


def test_drop_and_drain() -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=4))
    for key in range(3):
        b.add(key, 1, now=0.0)
    assert b.drop(1) and not b.drop(1)
    assert b.drain() == [0, 2]
    assert b.queued_rows == 0 and b.next_deadline() is None


@pytest.mark.parametrize("policy", [dict(max_rows=0), dict(max_delay_s=-1.0), dict(max_rows=8, max_queued_rows=4)])
def test_a_policy_that_cannot_work_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**policy)  # type: ignore[arg-type]


def test_a_request_over_one_item_is_a_bug_caught_here() -> None:
    with pytest.raises(ValueError, match="1 to 4 rows"):
        DynamicBatcher(BatchPolicy(max_rows=4)).add(1, 5, now=0.0)


@settings(max_examples=200, deadline=None)
@given(max_rows=st.integers(1, 16),
       ops=st.lists(st.tuples(st.sampled_from(["add", "take", "fail"]), st.integers(1, 16)), max_size=80))
def test_every_request_is_taken_exactly_once_in_order_and_no_item_overflows(max_rows: int,
                                                                          ops: list[tuple[str, int]]) -> None:
    b = DynamicBatcher(BatchPolicy(max_rows=max_rows, max_queued_rows=10_000))
    added: list[int] = []
    done: list[int] = []
    key = 0
    for op, n in ops:
        if op == "add":
            b.add(key, min(n, max_rows), now=0.0)
            added.append(key)
            key += 1
        else:
            batch = b.take(0.0, room=True)
            if batch is None:
                continue
            assert 1 <= sum(rows for _, rows in batch) <= max_rows
            if op == "fail":
                b.requeue(batch, now=0.0)
            else:
                done.extend(k for k, _ in batch)
    while (batch := b.take(0.0, room=True)) is not None:
        done.extend(k for k, _ in batch)
    assert done == added
