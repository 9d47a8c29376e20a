"""Several devices with real TensorFlow on a machine without GPUs: ``keras_train`` under
MirroredStrategy over two logical CPUs, and workers pinned to (absent) GPUs lending
their devices to a multi-device job."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import trio
import trio.testing

from kernels import KernelRuntime, RuntimeConfig, UnsatisfiableRequirements, make_spec
from tests.kernels.helpers import dense_model

pytestmark = pytest.mark.slow

LAYERS = [(4, "tanh"), (3, "linear")]


@pytest.fixture(scope="module")
def mirrored() -> Iterator[KernelRuntime]:
    """One CPU worker whose CPU is split into two logical devices, so MirroredStrategy runs two replicas."""
    rt = KernelRuntime(RuntimeConfig(workers=1, device="cpu", logical_cpus=2))
    rt.start()
    yield rt
    rt.close()


def train_case(optimizer: str, loss: str, replicas: int) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    model, _ = dense_model(5, LAYERS)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    y = (rng.integers(0, 3, 12).astype(np.int32) if loss.startswith("sparse")
         else rng.standard_normal((12, 3)).astype(np.float32))
    params = {"steps": 6, "batch_size": 4, "learning_rate": 0.05, "optimizer": optimizer, "loss": loss, "seed": 3,
              "replicas": replicas}
    return {**model, "x": x, "y": y}, params


async def train(rt: KernelRuntime, data: dict[str, np.ndarray], params: dict[str, object]) -> dict[str, np.ndarray]:
    spec = make_spec("keras_train", 1, params, data)
    with trio.fail_after(120):
        return (await rt.run(spec, data)).outputs


@pytest.mark.parametrize(("optimizer", "loss"), [("sgd", "mse"), ("adam", "sparse_categorical_crossentropy")])
async def test_two_replicas_train_as_one_device_does_and_verify(mirrored: KernelRuntime, optimizer: str,
                                                                loss: str) -> None:
    data, params = train_case(optimizer, loss, replicas=2)
    two = await train(mirrored, data, params)
    one = await train(mirrored, data, {**params, "replicas": 1})
    assert set(two) == set(one)
    for name in one:  # the same step up to rounding: halves of the batch, gradients summed
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    again = await train(mirrored, data, params)  # op determinism holds across replicas too
    assert {k: v.tobytes() for k, v in again.items()} == {k: v.tobytes() for k, v in two.items()}

    spec = make_spec("keras_train", 1, params, data)
    with trio.fail_after(120):
        verdict = await mirrored.verify(spec, data, two)  # a one-device CPU re-run, at the usual tolerance
        assert verdict.ok and verdict.max_error is not None and verdict.max_error < 1e-5
        bad = dict(two, loss=two["loss"] * np.float32(1.01))
        assert not (await mirrored.verify(spec, data, bad)).ok


async def test_more_replicas_than_devices_is_refused_and_keeps_the_worker(mirrored: KernelRuntime,
                                                                         runtime: KernelRuntime) -> None:
    data, params = train_case("sgd", "mse", replicas=4)
    before = mirrored.replacements
    with pytest.raises(UnsatisfiableRequirements, match="4 devices at once; this runtime's workers see 2 cpu"):
        await train(mirrored, data, params)
    assert mirrored.replacements == before
    data, params = train_case("sgd", "mse", replicas=2)
    with pytest.raises(UnsatisfiableRequirements, match="workers see 1 cpu"):
        await train(runtime, data, params)  # the session runtime's worker has one device


async def test_pinned_workers_lend_their_gpus_to_a_multi_device_job() -> None:
    """Workers pinned to GPUs "0" and "1" (absent here, so TensorFlow falls back to two logical CPUs).

    A replicas=2 job takes both GPUs: their workers are stopped, a worker
    that sees both runs the job, and a single-device job that arrives
    meanwhile waits instead of sharing a GPU. Afterwards each GPU has a
    fresh pinned worker again.
    """
    rt = KernelRuntime(RuntimeConfig(workers=2, gpus=(0, 1), logical_cpus=2))
    try:
        with trio.fail_after(240):
            await rt.wait_ready()
            pinned = rt.worker_infos()
            assert sorted(i["cuda_visible_devices"] for i in pinned.values()) == ["0", "1"]
            assert all(i["gpus"] == (i["cuda_visible_devices"],) for i in pinned.values())

            data, params = train_case("sgd", "mse", replicas=2)
            spec = make_spec("keras_train", 1, params, data)
            single = make_spec("matmul", 1, {}, {"a": np.eye(3, dtype=np.float32), "b": np.eye(3, dtype=np.float32)})
            finished: list[str] = []
            results = {}

            async def job(name: str, s: object, inputs: dict[str, np.ndarray]) -> None:
                results[name] = await rt.run(s, inputs)  # type: ignore[arg-type]
                finished.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(job, "multi", spec, data)
                await trio.testing.wait_all_tasks_blocked()
                (gang_pid,) = rt.busy_pids()
                assert rt.worker_gpus() == {gang_pid: ("0", "1")}  # the pinned workers made way
                nursery.start_soon(job, "single", single, {"a": np.eye(3, dtype=np.float32),
                                                           "b": np.eye(3, dtype=np.float32)})
                await trio.testing.wait_all_tasks_blocked()
                assert rt.busy_pids() == [gang_pid]  # the single job waits: no GPU is free
            assert finished == ["multi", "single"]
            assert results["multi"].stats.worker_pid == gang_pid
            assert rt.worker_infos()[results["single"].stats.worker_pid]["device_count"] == 2

            gpus = rt.worker_gpus()
            assert sorted(gpus.values()) == [("0",), ("1",)]
            assert not set(gpus) & {gang_pid, *pinned}  # fresh workers, the gang worker is gone
            assert rt.replacements == 0
            verdict = await rt.verify(spec, data, results["multi"].outputs)
            assert verdict.ok, verdict.reason
    finally:
        rt.close()


async def test_close_ends_checkouts_still_waiting_for_a_worker() -> None:
    """A job queued behind a busy worker (or behind GPUs held by a multi-device job) must not wait forever."""
    from kernels import RuntimeClosed, WorkerCrashed

    rt = KernelRuntime(RuntimeConfig(workers=1, device="cpu"))
    data, params = train_case("sgd", "mse", replicas=1)
    endless = make_spec("keras_train", 1, {**params, "steps": 100_000}, data)
    outcomes: list[str] = []

    async def job() -> None:
        try:
            await rt.run(endless, data)
        except (WorkerCrashed, RuntimeClosed) as exc:
            outcomes.append(type(exc).__name__)

    try:
        with trio.fail_after(120):
            await rt.wait_ready()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(job)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(job)
                await trio.testing.wait_all_tasks_blocked()
                rt.close()
    finally:
        rt.close()
    assert sorted(outcomes) == ["RuntimeClosed", "WorkerCrashed"]
