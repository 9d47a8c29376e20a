"""Capability probe: what a provider advertises and prices from.

``measure_capabilities`` runs inside a worker (it needs TensorFlow); the
caller gets a :class:`Capabilities` record, which has a canonical encoding
so it can go on the wire (``RegisterProvider``, bids) as is.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

from ledger.codec import U64, Float, Record, Text, record

__all__ = ["Capabilities", "describe_device", "matmul_gflops", "measure_capabilities"]


@record
class Capabilities(Record):
    device_kind: Annotated[str, Text(8, min_len=1)]  # "cpu" | "gpu"
    device_name: Annotated[str, Text(128)]
    memory_bytes: U64
    tf_version: Annotated[str, Text(32)]
    matmul_gflops: Annotated[float, Float(0.0)]


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def describe_device() -> dict[str, Any]:
    """Device kind, name and memory as TensorFlow sees them (imports TensorFlow)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = str(details.get("device_name", gpus[0].name))
        memory = 0
        try:
            tf.zeros(1)  # initialise the device so memory info is available
            memory = int(tf.config.experimental.get_memory_info("GPU:0").get("peak", 0))
        except (ValueError, RuntimeError):
            memory = 0
        return {"device_kind": "gpu", "device_name": name[:128], "memory_bytes": memory or _system_memory(),
                "tf_version": tf.__version__}
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"device_kind": "cpu", "device_name": f"{name} x{os.cpu_count() or 1}"[:128],
            "memory_bytes": _system_memory(), "tf_version": tf.__version__}


def matmul_gflops(n: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` float32 matmul throughput on TensorFlow's default device."""
    import tensorflow as tf

    a = tf.random.stateless_uniform((n, n), seed=(1, 2))
    b = tf.random.stateless_uniform((n, n), seed=(3, 4))
    tf.linalg.matmul(a, b).numpy()  # warm up kernels and allocator
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def measure_capabilities(n: int = 1024, repeats: int = 3) -> Capabilities:
    info = describe_device()
    return Capabilities(
        device_kind=info["device_kind"],
        device_name=info["device_name"],
        memory_bytes=int(info["memory_bytes"]),
        tf_version=str(info["tf_version"])[:32],
        matmul_gflops=float(matmul_gflops(n, repeats)),
    )
