"""Kernel runtime benchmark: what isolation costs, side by side in one run.

Figures (last line of output is one JSON object):
  matmul_gflops_runtime / _tf_inprocess / _numpy -- 2048x2048 float32 matmul,
      through a warm worker (shared-memory arena), TensorFlow in this
      process, and NumPy; runtime_efficiency = runtime / in-process.
  dispatch_overhead_ms_p50 -- a warm runtime's time for a tiny matmul job,
      minus the kernel's own time measured inside the worker.
  stream_items_per_s -- items through a stream session (small Keras
      classifier), and its ratio to calling the same traced model in-process.

Usage: python bench/kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# This file is named kernels.py: keep its own directory off sys.path so that
# ``import kernels`` finds the package (in spawned workers too).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import trio  # noqa: E402

from kernels import KernelRuntime, RuntimeConfig, make_spec  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


async def bench_runtime(rt: KernelRuntime, n: int, repeats: int, tiny_jobs: int, items: int) -> dict[str, float]:
    from tests.kernels.helpers import dense_model

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    inputs = {"a": a, "b": b}
    spec = make_spec("matmul", 1, {}, inputs, seconds=600)
    await rt.run(spec, inputs, check_hashes=False)  # warm up the arena and kernels
    best = float("inf")
    best_checked = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        await rt.run(spec, inputs, check_hashes=False)  # blobs are hash-checked once on arrival
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        await rt.run(spec, inputs)  # re-hashing 32 MiB of inputs on every call
        best_checked = min(best_checked, time.perf_counter() - t0)
    flops = 2.0 * n**3

    tiny = {"a": np.ones((4, 4), np.float32), "b": np.ones((4, 4), np.float32)}
    tspec = make_spec("matmul", 1, {}, tiny)
    overheads = []
    for _ in range(tiny_jobs):
        r = await rt.run(tspec, tiny)
        overheads.append(r.stats.total_seconds - r.stats.kernel_seconds)

    model, _ = dense_model(32, [(64, "relu"), (10, "softmax")])
    sspec = make_spec("stream_infer", 1, {}, model)
    xs = rng.standard_normal((items, 32)).astype(np.float32)
    async with await rt.open_stream(sspec, model) as session:
        await session.infer(xs[0])
        t0 = time.perf_counter()
        for x in xs:
            await session.infer(x)
        stream_s = time.perf_counter() - t0
    return {
        "runtime_s": best,
        "runtime_checked_s": best_checked,
        "gflops": flops / best / 1e9,
        "gflops_checked": flops / best_checked / 1e9,
        "overhead_ms_p50": 1e3 * statistics.median(overheads),
        "stream_items_per_s": items / stream_s,
    }


def bench_inprocess(n: int, repeats: int, items: int) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import tensorflow as tf

    from kernels.ops import _keras
    from tests.kernels.helpers import dense_model

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    flops = 2.0 * n**3
    tf.linalg.matmul(a, b).numpy()
    tf_s = best_seconds(lambda: tf.linalg.matmul(a, b).numpy(), repeats)
    np_s = best_seconds(lambda: a @ b, repeats)

    inputs, _ = dense_model(32, [(64, "relu"), (10, "softmax")])
    model, _ = _keras.load(inputs)
    fn = _keras.forward_fn(model)
    xs = rng.standard_normal((items, 32)).astype(np.float32)
    np.asarray(fn(tf.convert_to_tensor(xs[:1])))
    t0 = time.perf_counter()
    for x in xs:
        np.asarray(fn(tf.convert_to_tensor(x[None])))[0]
    stream_s = time.perf_counter() - t0
    return {"tf_gflops": flops / tf_s / 1e9, "numpy_gflops": flops / np_s / 1e9, "stream_items_per_s": items / stream_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (finishes in under 40 s)")
    args = parser.parse_args()
    n = 2048
    repeats, tiny_jobs, items = (3, 50, 300) if args.quick else (8, 300, 2000)

    t0 = time.perf_counter()
    rt = KernelRuntime(RuntimeConfig(workers=1, device="cpu"))
    rt.start()  # the worker imports TensorFlow while this process measures the in-process baseline
    try:
        base = bench_inprocess(n, repeats, items)
        r = trio.run(bench_runtime, rt, n, repeats, tiny_jobs, items)
    finally:
        rt.close()
    figures = {
        "matrix_n": n,
        "matmul_gflops_runtime": round(r["gflops"], 2),
        "matmul_gflops_runtime_hash_checked": round(r["gflops_checked"], 2),
        "matmul_gflops_tf_inprocess": round(base["tf_gflops"], 2),
        "matmul_gflops_numpy": round(base["numpy_gflops"], 2),
        "runtime_efficiency": round(r["gflops"] / base["tf_gflops"], 3),
        "runtime_efficiency_hash_checked": round(r["gflops_checked"] / base["tf_gflops"], 3),
        "dispatch_overhead_ms_p50": round(r["overhead_ms_p50"], 3),
        "stream_items_per_s": round(r["stream_items_per_s"], 1),
        "stream_inprocess_items_per_s": round(base["stream_items_per_s"], 1),
        "stream_ratio": round(r["stream_items_per_s"] / base["stream_items_per_s"], 3),
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
