"""The provider's model cache entered by many callers at once for one model, and the prefetcher's eviction racing a
task's fetch.

The interleaving each test forces: the holder's answer is held back on a ``trio.Event`` until every caller has
reached the cache (``wait_all_tasks_blocked``), so all of them are inside :meth:`ModelCache.bundle` while the one
fetch is in flight; then the answer (or failure, or a cancellation of the caller leading the fetch) is released.

Against the cache as it was (a per-model ``trio.Lock``, no check of the holder's bytes), the failure test fails
(each of the 24 callers fetched again from every holder in turn: 48 fetches, not 2), the corrupt-answer test fails
(another model's bundle was accepted as this one), and the prefetcher test fails (an eviction refused for a fetch
in flight was forgotten: the model stayed held over ``model_cache_bytes`` with nothing deferred to retry it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from kernels.bundle import ModelBundle, decode_bundle, encode_bundle, load_model_file, model_id
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.dataplane import DataPlaneError
from p2pgpu.market.warmset import ModelInfo, WarmPlan
from p2pgpu.modelcache import ModelCache, ModelUnavailable
from p2pgpu.modelwarm import ModelPrefetcher
from tests.kernels.test_bundle import keras_file

CALLERS = 24


class Holders:
    """Peers answering a fetch only when ``release`` is set; ``answers[peer]`` is bytes or an exception."""

    def __init__(self, store: BlobStore, answers: dict[str, bytes | Exception]) -> None:
        self.store = store
        self.answers = answers
        self.asked: list[str] = []
        self.release = trio.Event()

    async def fetch(self, peer: str, blob_hash: bytes, max_bytes: int) -> bytes:
        self.asked.append(peer)
        await self.release.wait()
        answer = self.answers[peer]
        if isinstance(answer, Exception):
            raise answer
        self.store.put(answer)  # as the data plane does (here without its hash check: the cache must not rely on it)
        return answer


def setup(tmp_path: Path, answers: dict[str, bytes | Exception]) -> tuple[ModelCache, Holders, BlobStore]:
    store = BlobStore(tmp_path / "blobs")
    holders = Holders(store, answers)
    return ModelCache(store, BlobAccess(lambda task_id, address: None), holders.fetch), holders, store


def bundles(tmp_path: Path) -> tuple[bytes, bytes]:
    """Two canonical bundles: the model, and another model (one weight differs)."""
    data = encode_bundle(load_model_file(keras_file(tmp_path)))
    bundle = decode_bundle(data)
    weights = list(bundle.weights)
    weights[-1] = (weights[-1] + np.float32(1)).astype(weights[-1].dtype)
    return data, encode_bundle(dataclasses.replace(bundle, weights=tuple(weights)))


Outcome = ModelBundle | str


async def callers(cache: ModelCache, ident: bytes, holders: Holders, peers: list[str], *,
                  n: int = CALLERS) -> list[Outcome]:
    """``n`` callers at once; once all wait on the one fetch, the holders answer. Each outcome: bundle or error."""
    out: list[Outcome] = []

    async def one() -> None:
        try:
            out.append(await cache.bundle(ident, holders=peers, max_bytes=1 << 20))
        except ModelUnavailable as exc:
            out.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert cache.fetching(ident)
        holders.release.set()
    return out


def test_many_callers_share_one_fetch_one_decode_and_one_pin(tmp_path: Path) -> None:
    data, _ = bundles(tmp_path)
    ident = model_id(decode_bundle(data))
    cache, holders, store = setup(tmp_path, {"owner": data})
    out = trio.run(callers, cache, ident, holders, ["owner"])
    assert len(out) == CALLERS and all(o is out[0] for o in out) and model_id(out[0]) == ident  # type: ignore[arg-type]
    assert holders.asked == ["owner"] and cache.fetches == 1 and not cache.fetching(ident)
    store.unpin(ident)  # pinned exactly once
    assert not store.is_pinned(ident)


def test_a_failed_fetch_is_every_callers_same_error_and_the_next_call_tries_again(tmp_path: Path) -> None:
    data, _ = bundles(tmp_path)
    ident = model_id(decode_bundle(data))
    cache, holders, _ = setup(tmp_path, {"client": DataPlaneError("gone"), "owner": DataPlaneError("refused")})
    out = trio.run(callers, cache, ident, holders, ["client", "owner"])
    assert len(out) == CALLERS and len(set(out)) == 1  # type: ignore[arg-type]
    assert isinstance(out[0], str) and "client: DataPlaneError: gone" in out[0] and "owner" in out[0]
    assert holders.asked == ["client", "owner"]  # one fetch (each holder once), not one per caller
    holders.answers["owner"] = data
    got = trio.run(lambda: cache.bundle(ident, holders=["client", "owner"], max_bytes=1 << 20))
    assert model_id(got) == ident and holders.asked == ["client", "owner", "client", "owner"]


def test_a_corrupt_holder_answer_is_refused_for_all_and_the_next_holder_asked(tmp_path: Path) -> None:
    """The first holder answers another model's (valid, decodable) bundle: nobody gets it as this model."""
    data, other = bundles(tmp_path)
    ident = model_id(decode_bundle(data))
    cache, holders, store = setup(tmp_path, {"liar": other, "owner": data})
    out = trio.run(callers, cache, ident, holders, ["liar", "owner"])
    assert all(not isinstance(o, str) and model_id(o) == ident for o in out)
    assert holders.asked == ["liar", "owner"] and cache.fetches == 1
    assert store.get(ident) == data and cache.held_sizes() == {ident: len(data)}
    other_id = model_id(decode_bundle(other))
    assert not store.is_pinned(other_id) and ANY_PEER not in cache.access.allowed.get(other_id, set())


def test_a_cancelled_caller_leading_the_fetch_does_not_break_the_others(tmp_path: Path) -> None:
    data, _ = bundles(tmp_path)
    ident = model_id(decode_bundle(data))
    cache, holders, _ = setup(tmp_path, {"owner": data})
    out: list[Outcome] = []
    cancelled: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            leader = trio.CancelScope()

            async def first() -> None:
                with leader:
                    await cache.bundle(ident, holders=["owner"], max_bytes=1 << 20)
                cancelled.append(leader.cancelled_caught)

            async def other() -> None:
                out.append(await cache.bundle(ident, holders=["owner"], max_bytes=1 << 20))

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()  # the first caller leads the fetch
            for _ in range(CALLERS - 1):
                nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()  # the others wait on it
            leader.cancel()
            await trio.testing.wait_all_tasks_blocked()  # one of them has taken the fetch over
            assert cache.fetching(ident) and holders.asked == ["owner", "owner"]
            holders.release.set()

    trio.run(main)
    assert cancelled == [True]
    assert len(out) == CALLERS - 1 and all(o is out[0] and model_id(o) == ident for o in out)  # type: ignore[arg-type]
    assert cache.fetches == 1 and not cache.fetching(ident)


def test_eviction_waits_for_a_fetch_in_flight_and_the_prefetcher_retries_it(tmp_path: Path) -> None:
    """The plan evicts a model a task is fetching right now (not yet a running job, so not in use): the cache
    refuses, the prefetcher defers it, and a later plan evicts it once the fetch is done and nothing uses it."""
    data, _ = bundles(tmp_path)
    ident = model_id(decode_bundle(data))
    cache, holders, store = setup(tmp_path, {"owner": data})
    prefetcher = ModelPrefetcher(cache, catalog=None, wanted=[], budget_bytes=0)  # type: ignore[arg-type]
    plan = WarmPlan(keep=(), fetch=(), evict=(ident,), cold=(), used_bytes=0)
    got: list[ModelBundle] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def task() -> None:
                got.append(await cache.bundle(ident, holders=["owner"], max_bytes=1 << 20))

            nursery.start_soon(task)
            await trio.testing.wait_all_tasks_blocked()
            holders.release.set()
            # the holder answered; the task is still in the cache (hash check, decode) when the plan evicts
            await trio.sleep(0)
            assert cache.fetching(ident)
            assert prefetcher.evict(plan) == []
            assert ident in prefetcher.deferred
        assert model_id(got[0]) == ident and cache.held_sizes() == {ident: len(data)}  # the task got its model

    trio.run(main)
    assert prefetcher.evict(plan) == [ident] and ident not in prefetcher.deferred
    assert not store.has(ident) and cache.held_sizes() == {}


@pytest.mark.parametrize("seed", range(3))
def test_a_task_fetch_racing_plans_that_evict_it_never_loses_the_bundle(tmp_path: Path, seed: int) -> None:
    """Many tasks fetch while plans evict at random checkpoints: each task gets the bundle; whatever the cache
    still holds is pinned and on disk, and what it dropped is gone from the disk."""
    data, _ = bundles(tmp_path)
    ident = model_id(decode_bundle(data))
    cache, holders, store = setup(tmp_path, {"owner": data})
    holders.release.set()
    prefetcher = ModelPrefetcher(cache, catalog=None, wanted=[], budget_bytes=0)  # type: ignore[arg-type]
    plan = WarmPlan(keep=(), fetch=(), evict=(ident,), cold=(), used_bytes=0)
    rng = np.random.default_rng(seed)
    got: list[ModelBundle] = []

    async def task(delay: int) -> None:
        for _ in range(delay):
            await trio.sleep(0)
        got.append(await cache.bundle(ident, holders=["owner"], max_bytes=1 << 20))

    async def planner() -> None:
        for _ in range(60):
            prefetcher.evict(plan)
            held = ident in cache.held_sizes()
            assert held == store.is_pinned(ident) and (not held or store.has(ident))
            await trio.sleep(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(planner)
            for _ in range(CALLERS):
                nursery.start_soon(task, int(rng.integers(0, 40)))

    trio.run(main)
    assert len(got) == CALLERS and all(model_id(b) == ident for b in got)
    assert holders.asked.count("owner") == cache.fetches >= 1
