"""The runtime end to end: every kernel against NumPy, determinism, verification,
and recovery from timeouts, crashes, memory blow-ups and cancellation."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import trio
import trio.testing

from kernels import (
    Capabilities,
    JobTimeout,
    KernelRuntime,
    ModelWeightsMismatch,
    OutOfMemory,
    OutputTooLarge,
    RuntimeClosed,
    ShapeMismatch,
    UnsatisfiableRequirements,
    WorkerCrashed,
    make_spec,
)
from kernels.ops import conv2d
from ledger.codec import decode
from tests.kernels.helpers import dense_forward, dense_model

pytestmark = pytest.mark.slow

CLASSIFIER = [(8, "relu"), (3, "softmax")]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


async def run_ok(runtime: KernelRuntime, kernel: str, params: dict, inputs: dict, **kw: object) -> dict[str, np.ndarray]:
    spec = make_spec(kernel, 1, params, inputs, **kw)
    with trio.fail_after(120):
        return (await runtime.run(spec, inputs)).outputs


async def test_matmul_matches_numpy_and_is_deterministic(runtime: KernelRuntime) -> None:
    inputs = {"a": rng().standard_normal((64, 48)).astype(np.float32), "b": rng(1).standard_normal((48, 32)).astype(np.float32)}
    first = await run_ok(runtime, "matmul", {}, inputs)
    np.testing.assert_allclose(first["c"], inputs["a"].astype(np.float64) @ inputs["b"], rtol=1e-5, atol=1e-5)
    assert first["c"].dtype == np.float32
    again = await run_ok(runtime, "matmul", {}, inputs)
    assert again["c"].tobytes() == first["c"].tobytes()


@pytest.mark.parametrize(("stride", "dilation", "padding"), [(1, 1, "valid"), (2, 1, "same"), (1, 2, "same")])
async def test_conv2d_matches_numpy(runtime: KernelRuntime, stride: int, dilation: int, padding: str) -> None:
    inputs = {"x": rng(2).standard_normal((2, 9, 8, 3)).astype(np.float32), "w": rng(3).standard_normal((3, 3, 3, 4)).astype(np.float32)}
    out = await run_ok(runtime, "conv2d", {"stride": stride, "dilation": dilation, "padding": padding}, inputs)
    ref = conv2d.reference(inputs["x"], inputs["w"], stride, dilation, padding)
    np.testing.assert_allclose(out["y"], ref, rtol=1e-4, atol=1e-4)


async def test_keras_infer_and_stream_infer_match_numpy(runtime: KernelRuntime) -> None:
    model, weights = dense_model(4, CLASSIFIER)
    x = rng(4).standard_normal((10, 4)).astype(np.float32)
    ref = dense_forward(x, CLASSIFIER, weights)
    out = await run_ok(runtime, "keras_infer", {"batch_size": 3}, {**model, "x": x})
    np.testing.assert_allclose(out["y"], ref, rtol=1e-5, atol=1e-6)
    out = await run_ok(runtime, "stream_infer", {}, {**model, "x": x})
    np.testing.assert_allclose(out["y"], ref, rtol=1e-5, atol=1e-6)


def train_case(steps: int = 4) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict]:
    model, weights = dense_model(3, [(2, "linear")])
    data = {**model, "x": rng(5).standard_normal((8, 3)).astype(np.float32), "y": rng(6).standard_normal((8, 2)).astype(np.float32)}
    return data, weights, {"steps": steps, "batch_size": 4, "learning_rate": 0.1, "seed": 7}


async def test_keras_train_matches_numpy_sgd_and_repeats_bit_for_bit(runtime: KernelRuntime) -> None:
    data, weights, params = train_case()
    out = await run_ok(runtime, "keras_train", params, data)
    w, b = weights[0].astype(np.float64), weights[1].astype(np.float64)
    losses = []
    for step in range(params["steps"]):  # plain SGD on mean squared error, batches taken in order
        rows = (step * 4 + np.arange(4)) % 8
        err = data["x"][rows] @ w + b - data["y"][rows]
        losses.append((err**2).mean())
        w -= 0.1 * 2 * data["x"][rows].T @ err / err.size
        b -= 0.1 * 2 * err.sum(axis=0) / err.size
    np.testing.assert_allclose(out["loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(out["weight_000"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["weight_001"], b, rtol=1e-5, atol=1e-6)
    again = await run_ok(runtime, "keras_train", params, data)
    assert {k: v.tobytes() for k, v in again.items()} == {k: v.tobytes() for k, v in out.items()}


async def test_keras_train_verify(runtime: KernelRuntime) -> None:
    data, _, params = train_case()
    spec = make_spec("keras_train", 1, params, data)
    claimed = (await runtime.run(spec, data)).outputs
    with trio.fail_after(120):
        verdict = await runtime.verify(spec, data, claimed)
        assert verdict.ok and verdict.max_error == 0.0
        noisy = {k: v + (1e-6 * np.abs(v)).astype(v.dtype) for k, v in claimed.items()}
        assert (await runtime.verify(spec, data, noisy)).ok
        bad_loss = dict(claimed, loss=claimed["loss"].copy())
        bad_loss["loss"][-1] *= 1.1
        verdict = await runtime.verify(spec, data, bad_loss)
        assert not verdict.ok and verdict.max_error is not None and verdict.max_error > verdict.tolerance
        scaled = dict(claimed, weight_000=claimed["weight_000"] * np.float32(1.01))
        assert not (await runtime.verify(spec, data, scaled)).ok
        shaped = dict(claimed, weight_001=claimed["weight_001"][:1])
        verdict = await runtime.verify(spec, data, shaped)
        assert not verdict.ok and "shape" in verdict.reason


async def test_keras_infer_verify(runtime: KernelRuntime) -> None:
    model, _ = dense_model(4, CLASSIFIER)
    data = {**model, "x": rng(8).standard_normal((6, 4)).astype(np.float32)}
    spec = make_spec("keras_infer", 1, {}, data)
    with trio.fail_after(120):
        y = (await runtime.run(spec, data)).outputs["y"]
        noisy = y + np.float32(1e-6) * rng(9).uniform(-1, 1, y.shape).astype(np.float32)
        assert (await runtime.verify(spec, data, {"y": noisy})).ok
        one = y.copy()
        one[2, 1] += 0.05
        assert not (await runtime.verify(spec, data, {"y": one})).ok
        assert not (await runtime.verify(spec, data, {"y": y * np.float32(1.01)})).ok
        assert not (await runtime.verify(spec, data, {"y": y[:5]})).ok
        assert not (await runtime.verify(spec, data, {"y": y.astype(np.float64)})).ok


async def test_worker_side_errors_keep_their_type_and_the_worker(runtime: KernelRuntime) -> None:
    model, weights = dense_model(4, CLASSIFIER)
    model["weight_000"] = np.zeros((5, 8), np.float32)  # does not fit the model's first layer
    before = runtime.replacements
    with trio.fail_after(120), pytest.raises(ModelWeightsMismatch, match="expects weight shapes"):
        await run_ok(runtime, "keras_infer", {}, {**model, "x": np.zeros((2, 4), np.float32)})
    inputs = {"a": np.ones((64, 64), np.float32), "b": np.ones((64, 64), np.float32)}
    with trio.fail_after(120), pytest.raises(OutputTooLarge, match="limit is 1000"):
        await run_ok(runtime, "matmul", {}, inputs, output_bytes=1000)
    assert runtime.replacements == before  # job errors are not worker failures


async def test_requirements_checked(runtime: KernelRuntime) -> None:
    inputs = {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    with trio.fail_after(120), pytest.raises(UnsatisfiableRequirements, match="needs a gpu"):
        await run_ok(runtime, "matmul", {}, inputs, device="gpu")


async def test_probe(runtime: KernelRuntime) -> None:
    with trio.fail_after(120):
        caps = await runtime.probe(n=128, repeats=1)
    assert caps.device_kind == "cpu" and caps.matmul_gflops > 0 and caps.memory_bytes > 0
    assert decode(Capabilities, caps.encode()) == caps


async def test_stream_session_serves_many_items_with_one_model_load(runtime: KernelRuntime) -> None:
    model, weights = dense_model(4, CLASSIFIER)
    spec = make_spec("stream_infer", 1, {}, model, seconds=30)
    items = rng(10).standard_normal((40, 4)).astype(np.float32)
    with trio.fail_after(120):
        async with await runtime.open_stream(spec, model) as session:
            outs = [await session.infer(item) for item in items]
            with pytest.raises(ShapeMismatch, match="does not fit the model's input shape"):
                await session.infer(np.zeros(5, np.float32))
            outs.append(await session.infer(items[0]))  # a bad item does not end the session
            assert session.model_loads == 1
            assert session.items == 41
        with pytest.raises(RuntimeClosed):
            await session.infer(items[0])
    np.testing.assert_allclose(np.stack(outs[:40]), dense_forward(items, CLASSIFIER, weights), rtol=1e-5, atol=1e-6)


async def test_a_batched_stream_session_answers_each_batch_in_one_call_and_verifies_it(runtime: KernelRuntime) -> None:
    from kernels.ops.stream_infer import disputed_item_batch
    from kernels.spec import validate_stream_items

    model, weights = dense_model(4, CLASSIFIER)
    spec = make_spec("stream_infer", 1, {"rows": 5}, model, seconds=30)
    batches = [rng(11).standard_normal((n, 4)).astype(np.float32) for n in (1, 5, 3)]
    with trio.fail_after(120):
        async with await runtime.open_stream(spec, model) as session:
            outs = [await session.infer(b) for b in batches]
            with pytest.raises(ShapeMismatch, match="not a batch of 1 to 5 rows"):
                await session.infer(np.zeros((6, 4), np.float32))
            assert session.items == 3  # one item per batch
    for batch, out in zip(batches, outs):
        assert out.shape == (batch.shape[0], 3)
        np.testing.assert_allclose(out, dense_forward(batch, CLASSIFIER, weights), rtol=1e-5, atol=1e-6)
    # a disputed batch is re-run as the batch it was (and a wrong one is caught)
    x, y = disputed_item_batch(spec, batches[1], outs[1])
    assert x.shape == (5, 4) and y.shape == (5, 3)
    check = make_spec("stream_infer", 1, {"rows": 5}, {**model, "x": x}, seconds=30)
    with trio.fail_after(120):
        assert (await runtime.verify(check, {**model, "x": x}, {"y": y})).ok
        assert not (await runtime.verify(check, {**model, "x": x}, {"y": y + 1})).ok
    # as a batch job, rows of x go through in batches of `rows`
    x = rng(12).standard_normal((12, 4)).astype(np.float32)
    out = await run_ok(runtime, "stream_infer", {"rows": 5}, {**model, "x": x})
    np.testing.assert_allclose(out["y"], dense_forward(x, CLASSIFIER, weights), rtol=1e-5, atol=1e-6)
    # submit-time items are batches too
    validate_stream_items(spec, model, np.zeros((2, 5, 4), np.float32))
    with pytest.raises(ShapeMismatch):
        validate_stream_items(spec, model, np.zeros((2, 6, 4), np.float32))


async def test_timeout_kills_the_worker_and_the_next_job_succeeds(runtime: KernelRuntime) -> None:
    data, _, params = train_case(steps=100_000)
    before = runtime.replacements
    with trio.fail_after(120):
        await runtime.wait_ready()
        with pytest.raises(JobTimeout, match="limit of 0.5 s"):
            await run_ok(runtime, "keras_train", params, data, seconds=0.5)
    assert runtime.replacements == before + 1
    await test_matmul_matches_numpy_and_is_deterministic(runtime)


async def test_killed_worker_is_reported_and_replaced(runtime: KernelRuntime) -> None:
    data, _, params = train_case(steps=100_000)
    with trio.fail_after(120):
        await runtime.wait_ready()
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []

            async def job() -> None:
                try:
                    await run_ok(runtime, "keras_train", params, data, seconds=60)
                except WorkerCrashed as exc:
                    failures.append(exc)

            nursery.start_soon(job)
            await trio.testing.wait_all_tasks_blocked()  # the job is in the worker
            (pid,) = runtime.busy_pids()
            os.kill(pid, signal.SIGKILL)
        assert len(failures) == 1 and "SIGKILL" in str(failures[0])
    await test_matmul_matches_numpy_and_is_deterministic(runtime)


async def test_memory_blowup_is_out_of_memory(runtime: KernelRuntime) -> None:
    # an outer product: tiny inputs, a 256 MiB output, against a 1 MiB budget (+64 MiB headroom)
    inputs = {"a": np.ones((8192, 1), np.float32), "b": np.ones((1, 8192), np.float32)}
    with trio.fail_after(120):
        await runtime.wait_ready()
        with pytest.raises(OutOfMemory, match="memory budget"):
            await run_ok(runtime, "matmul", {}, inputs, memory_bytes=1 << 20)
    await test_matmul_matches_numpy_and_is_deterministic(runtime)


async def test_cancel_recycles_the_worker(runtime: KernelRuntime) -> None:
    data, _, params = train_case(steps=100_000)
    before = runtime.replacements
    with trio.fail_after(120):
        await runtime.wait_ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_ok, runtime, "keras_train", params, data)
            await trio.testing.wait_all_tasks_blocked()
            assert runtime.busy_pids()
            nursery.cancel_scope.cancel()
    assert runtime.replacements == before + 1 and not runtime.busy_pids()
    await test_matmul_matches_numpy_and_is_deterministic(runtime)
