"""The model cache's pure core: what to fetch, keep and evict within the byte budget, and start-up estimates."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from p2pgpu.market.warmset import ColdReason, ModelInfo, estimate_startup_seconds, plan_warm_set


def mid(n: int) -> bytes:
    return bytes([n]) * 32


class FakeCatalog:
    """The registry seam as a table (``State.models`` after the registry merge)."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.infos = {mid(n): ModelInfo(model_id=mid(n), bundle_size=size) for n, size in sizes.items()}

    def lookup(self, model_id: bytes) -> ModelInfo | None:
        return self.infos.get(model_id)

    def model_ids(self) -> Iterable[bytes]:
        return list(self.infos)


def test_listed_models_in_file_order_while_they_fit() -> None:
    plan = plan_warm_set([mid(1), mid(2), mid(3)], FakeCatalog({1: 60, 2: 50, 3: 40}), 100, {})
    assert [i.model_id for i in plan.keep] == [mid(1), mid(3)]
    assert [i.model_id for i in plan.fetch] == [mid(1), mid(3)]
    assert plan.cold == ((mid(2), ColdReason.OVER_BUDGET),)
    assert plan.used_bytes == 100 and plan.evict == ()


def test_unregistered_model_stays_cold_and_a_repeat_counts_once() -> None:
    plan = plan_warm_set([mid(9), mid(1), mid(1)], FakeCatalog({1: 10}), 100, {})
    assert plan.cold == ((mid(9), ColdReason.UNREGISTERED),)
    assert [i.model_id for i in plan.keep] == [mid(1)]


def test_held_models_are_not_fetched_again_and_unwanted_ones_are_evicted() -> None:
    plan = plan_warm_set([mid(1), mid(2)], FakeCatalog({1: 10, 2: 10, 3: 10}), 100, {mid(1): 10, mid(3): 10})
    assert [i.model_id for i in plan.fetch] == [mid(2)]
    assert plan.evict == (mid(3),)


def test_wildcard_keeps_held_first_then_smallest_within_budget() -> None:
    catalog = FakeCatalog({1: 30, 2: 10, 3: 20, 4: 90})
    plan = plan_warm_set(None, catalog, 60, {mid(1): 30})
    assert [i.model_id for i in plan.keep] == [mid(1), mid(2), mid(3)]
    assert [i.model_id for i in plan.fetch] == [mid(2), mid(3)]
    assert plan.cold == ((mid(4), ColdReason.OVER_BUDGET),)


def test_zero_budget_keeps_nothing_and_evicts_everything_held() -> None:
    plan = plan_warm_set(None, FakeCatalog({1: 1}), 0, {mid(1): 1})
    assert plan.keep == () and plan.evict == (mid(1),)
    with pytest.raises(ValueError):
        plan_warm_set(None, FakeCatalog({}), -1, {})


def test_startup_is_zero_when_warm_and_grows_with_a_fetch() -> None:
    assert estimate_startup_seconds(10**9, warm=True, on_disk=False).seconds == 0.0
    on_disk = estimate_startup_seconds(20_000_000, warm=False, on_disk=True)
    fetched = estimate_startup_seconds(20_000_000, warm=False, on_disk=False)
    assert not on_disk.warm and 0 < on_disk.seconds < fetched.seconds
