"""The warm pool on a real two-worker CPU runtime: a wanted model is loaded in a worker ahead of any task, the first
stream task for it gets that session without a load (a second one at the same time loads cold), a by-model batch
runs through it with keras_infer's own outputs, a job that finds no idle worker makes the pool give one back, and
the pool never holds the last worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio

from kernels import KernelRuntime, RuntimeConfig
from kernels.bundle import ModelBundle, load_model_file, model_id
from kernels.bymodel import expand_model_spec, make_model_spec
from kernels.errors import BlobHashMismatch, UnsatisfiableRequirements
from kernels.runtime import NoIdleWorker
from kernels.spec import make_spec
from p2pgpu.config import ProviderConfig
from p2pgpu.provider_warmup import provider_runtime_config, provider_slots
from p2pgpu.providerservice import provider_role_config
from p2pgpu.warmpool import WarmPool, model_key, warm_session_limit
from tests.kernels.helpers import dense_model
from tests.kernels.test_bundle import LAYERS, keras_file, standard_members, write_zip


@pytest.fixture(scope="module")
def runtime2() -> Iterator[KernelRuntime]:
    """Two CPU workers (each pays a TensorFlow import once for the module)."""
    rt = KernelRuntime(RuntimeConfig(workers=2, device="cpu"))
    rt.start()
    yield rt
    rt.close()


def _bundles(tmp_path: Path) -> tuple[ModelBundle, ModelBundle]:
    first = load_model_file(keras_file(tmp_path))
    other = write_zip(tmp_path / "other.keras", standard_members(weights=dense_model(4, LAYERS, 5)[1]))
    return first, load_model_file(other)


def _pool(runtime: KernelRuntime, bundles: dict[bytes, ModelBundle], slots: int = 2) -> WarmPool:
    async def bundle_of(model: bytes) -> ModelBundle:
        await trio.lowlevel.checkpoint()
        return bundles[model]

    return WarmPool(lambda: runtime, slots, bundle_of, poll_seconds=0.05)


def _stream_spec(bundle: ModelBundle, seconds: float = 30.0):  # type: ignore[no-untyped-def]
    return expand_model_spec(make_model_spec(model_id(bundle), {}, None, kernel="stream_infer", seconds=seconds,
                                             device="cpu", memory_bytes=256 << 20), bundle, {})


async def _until(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def test_the_pool_never_takes_every_slot() -> None:
    assert [warm_session_limit(s) for s in (0, 1, 2, 4)] == [0, 0, 1, 3]
    for cfg in (ProviderConfig(slots=3, device="cpu"), ProviderConfig(max_concurrent_jobs=1, device="cpu")):
        slots = provider_slots(cfg)
        # The runtime has one worker per slot and the role still runs `slots` jobs: an idle warm session is not a
        # job, it gives its worker back when a job finds none idle (yield_worker).
        assert provider_runtime_config(cfg).workers == slots == provider_role_config(cfg).max_concurrent_jobs
        assert warm_session_limit(slots) == slots - 1


async def test_a_wanted_model_is_loaded_and_handed_to_the_first_stream_task_the_second_loads_cold(
        runtime2: KernelRuntime, tmp_path: Path) -> None:
    bundle, other = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle, model_id(other): other})
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident, model_id(other)])  # two wanted, one may be held: the other worker stays free
        await _until(lambda: pool.is_loaded(ident))
        await trio.sleep(0.3)
        assert not pool.is_loaded(model_id(other)) and runtime2.idle_workers() == 1 and pool.loads == 1
        spec, inputs = _stream_spec(bundle)
        item = np.linspace(-1, 1, 4, dtype=np.float32)
        sessions: list = []

        async def open_one() -> None:
            sessions.append(await pool.open_stream(spec, inputs))

        async with trio.open_nursery() as two:  # two stream tasks for the same warm model at once
            two.start_soon(open_one)
            two.start_soon(open_one)
        warm = [s for s in sessions if getattr(s, "warm_start", False)]
        cold = [s for s in sessions if not getattr(s, "warm_start", False)]
        assert len(warm) == 1 and len(cold) == 1 and pool.handovers == 1
        assert warm[0].model_loads == 0 and cold[0].model_loads == 1  # the warm task paid no load in its worker
        assert warm[0]._inner.spec == spec  # rebound to the task's own spec (its limits)
        assert pool.in_use() == {ident} and not pool.is_loaded(ident)
        np.testing.assert_array_equal(await warm[0].infer(item), await cold[0].infer(item))
        for s in sessions:
            await s.aclose()
        assert pool.in_use() == set()
        await _until(lambda: pool.is_loaded(ident))  # replaced in the background once a worker was spare
        assert pool.loads == 2
        nursery.cancel_scope.cancel()
    assert runtime2.idle_workers() == 2  # the pool closed its session when it stopped


async def test_a_by_model_batch_runs_through_the_warm_session_with_keras_infers_outputs(
        runtime2: KernelRuntime, tmp_path: Path) -> None:
    bundle, _ = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    x = np.random.default_rng(3).standard_normal((37, 4)).astype(np.float32)
    task_spec = make_model_spec(ident, {"batch_size": 8}, x, device="cpu", memory_bytes=256 << 20, seconds=30)
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        assert await pool.run_job(task_spec, {"x": x}) is None  # nothing loaded yet: the caller loads cold
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        warm = await pool.run_job(task_spec, {"x": x})
        assert warm is not None and pool.is_loaded(ident)  # lent, then back in the pool
        expanded, full = expand_model_spec(task_spec, bundle, {"x": x})
        cold = await runtime2.run(expanded, full)
        np.testing.assert_array_equal(warm["y"], cold.outputs["y"])
        verdict = await runtime2.verify(expanded, full, warm)
        assert verdict.ok, verdict.reason
        nursery.cancel_scope.cancel()


async def test_a_job_that_finds_no_idle_worker_makes_the_pool_give_its_worker_back(
        runtime2: KernelRuntime, tmp_path: Path) -> None:
    bundle, _ = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    a = np.ones((64, 64), np.float32)
    matmul = make_spec("matmul", 1, {}, {"a": a, "b": a}, seconds=60)
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        spec, inputs = _stream_spec(bundle)
        held = await runtime2.open_stream(spec, inputs)  # the last idle worker
        with pytest.raises(NoIdleWorker):  # the pool's own way in never waits, so it never queues before a job
            await runtime2.open_stream(spec, inputs, wait=False)
        await held.aclose()
        results: list = []

        async def job() -> None:
            results.append(await runtime2.run(matmul, {"a": a, "b": a}))

        async with trio.open_nursery() as jobs:  # two jobs, one idle worker: the second starves the pool's
            for _ in range(2):
                jobs.start_soon(job)
        assert len(results) == 2 and pool.yielded >= 1
        nursery.cancel_scope.cancel()


async def test_a_model_no_longer_wanted_has_its_session_closed(runtime2: KernelRuntime, tmp_path: Path) -> None:
    bundle, _ = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        assert model_key(_stream_spec(bundle)[0]) in pool._keys
        pool.set_wanted([])
        assert not pool.is_loaded(ident) and pool._keys == {}
        await _until(lambda: runtime2.idle_workers() == 2)
        nursery.cancel_scope.cancel()


async def test_a_one_slot_provider_keeps_nothing_loaded(runtime2: KernelRuntime, tmp_path: Path) -> None:
    bundle, _ = _bundles(tmp_path)
    pool = _pool(runtime2, {model_id(bundle): bundle}, slots=1)
    pool.set_wanted([model_id(bundle)])
    assert await pool.fill_once() == 0 and not pool.is_loaded(model_id(bundle))


async def test_many_stream_tasks_at_once_each_warm_session_goes_to_exactly_one(runtime2: KernelRuntime,
                                                                               tmp_path: Path) -> None:
    bundle, _ = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    spec, inputs = _stream_spec(bundle)
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        got: list = []

        async def task() -> None:  # opens, serves one item, ends: its worker goes back for the next caller
            session = await pool.open_stream(spec, inputs)
            got.append((session, await session.infer(np.ones(4, np.float32))))
            await session.aclose()

        async with trio.open_nursery() as many:
            for _ in range(6):
                many.start_soon(task)
        warm = [s for s, _ in got if getattr(s, "warm_start", False)]
        assert len(got) == 6 and 1 <= len(warm) == pool.handovers
        assert len({id(s._inner) for s in warm}) == len(warm)  # no loaded session was handed to two tasks
        assert all(np.array_equal(out, got[0][1]) for _, out in got)
        assert pool.in_use() == set()
        nursery.cancel_scope.cancel()


async def test_a_warm_session_serves_only_its_own_model_on_a_device_it_has(runtime2: KernelRuntime,
                                                                           tmp_path: Path) -> None:
    bundle, other = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        session = pool._warm[ident].session
        with pytest.raises(UnsatisfiableRequirements, match="another model"):
            session.rebind(_stream_spec(other)[0])
        assert pool.take(_stream_spec(other)[0]) is None  # another model: loads cold
        gpu = expand_model_spec(make_model_spec(ident, {}, None, kernel="stream_infer", device="gpu"), bundle, {})[0]
        assert pool.take(gpu) is None and pool.is_loaded(ident)  # a device this worker lacks: stays in the pool
        x = np.ones((2, 4), np.float32)
        assert await pool.run_job(make_model_spec(ident, {}, x, device="gpu"), {"x": x}) is None
        with pytest.raises(BlobHashMismatch):  # a batch's x is checked against its spec as a cold run checks it
            await pool.run_job(make_model_spec(ident, {}, x, device="cpu"), {"x": x + 1})
        assert pool.is_loaded(ident) and pool.in_use() == set()
        nursery.cancel_scope.cancel()


async def test_a_plan_change_racing_the_hand_over_never_closes_a_session_a_task_holds(runtime2: KernelRuntime,
                                                                                     tmp_path: Path) -> None:
    """``take`` and ``set_wanted`` interleaved at every checkpoint: stream tasks open while the plan drops the
    model and wants it again. A task that got the warm session keeps it open and serving (the model stays in
    use, so the prefetcher cannot evict it) until the task itself closes it; only idle sessions are closed.
    Both calls are synchronous (no await between reading the pool and writing it), and ``set_wanted`` closes
    only sessions still in ``_warm`` (a handed one left it in the same step). Checked against a variant whose
    ``set_wanted`` also closed the handed sessions of a model dropped from the plan: the task's next ``infer``
    fails (``ClosedResourceError`` on the worker's channel)."""
    bundle, _ = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    spec, inputs = _stream_spec(bundle)
    item = np.ones(4, np.float32)
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        warm: list = []
        outs: list = []

        async def task() -> None:
            session = pool.take(spec)
            if session is None:
                return  # no idle warm session right now (dropped, or another task has it): it would load cold
            warm.append(session)
            assert ident in pool.in_use()
            for _ in range(3):  # the plan flips while it serves
                await trio.sleep(0)
                outs.append(await session.infer(item))
            await session.aclose()

        async def planner() -> None:
            await trio.sleep(0)  # the tasks' takes run first: one of them holds the session when the plan drops it
            for i in range(40):
                pool.set_wanted([] if i % 2 == 0 else [ident])
                await trio.sleep(0)

        async with trio.open_nursery() as many:
            many.start_soon(planner)
            for _ in range(8):
                many.start_soon(task)
        assert len(warm) >= 1 and len(warm) == pool.handovers and len({id(s._inner) for s in warm}) == len(warm)
        assert len(outs) == 3 * len(warm) and all(np.array_equal(o, outs[0]) for o in outs)
        assert pool.in_use() == set() and not pool.handed
        nursery.cancel_scope.cancel()


async def test_a_warm_session_handed_to_a_batching_task_answers_batches(runtime2: KernelRuntime,
                                                                       tmp_path: Path) -> None:
    """The warm session was opened for one-sample items; the gateway's task batches (``rows``): the task's spec wins.

    Before, the worker kept the opening's one-sample rule and refused the task's first batch (``bad_item``), so
    every gateway session on a warm provider was lost at its first request.
    """
    bundle, _ = _bundles(tmp_path)
    ident = model_id(bundle)
    pool = _pool(runtime2, {ident: bundle})
    await runtime2.wait_ready()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        pool.set_wanted([ident])
        await _until(lambda: pool.is_loaded(ident))
        spec, inputs = expand_model_spec(make_model_spec(ident, {"rows": 4}, None, kernel="stream_infer", seconds=30,
                                                         device="cpu", memory_bytes=256 << 20), bundle, {})
        session = await pool.open_stream(spec, inputs)
        assert getattr(session, "warm_start", False) and session.model_loads == 0
        batch = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        out = await session.infer(batch)
        one, one_inputs = _stream_spec(bundle)
        cold = await runtime2.open_stream(one, one_inputs)
        try:
            rows = [await cold.infer(row) for row in batch]
        finally:
            await cold.aclose()
        np.testing.assert_allclose(out, np.stack(rows), rtol=1e-5, atol=1e-6)
        await session.aclose()
        nursery.cancel_scope.cancel()
