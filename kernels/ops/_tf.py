"""Lazy TensorFlow access for kernels: imported on first use, inside a worker."""

from __future__ import annotations

from typing import Any

from kernels.errors import UnsatisfiableRequirements


def tf() -> Any:
    import tensorflow

    return tensorflow


def cpu_device() -> Any:
    """A context that pins ops to the CPU (used by deterministic re-execution)."""
    return tf().device("/CPU:0")


def replica_devices(count: int) -> list[str]:
    """Names of the first ``count`` devices a data-parallel job replicates over: GPUs, else (logical) CPUs.

    The runtime checks the count before the job arrives; checking again
    here keeps a direct call of a kernel from silently running fewer
    replicas than its spec asked for.
    """
    t = tf()
    pool = t.config.list_logical_devices("GPU") or t.config.list_logical_devices("CPU")
    if len(pool) < count:
        raise UnsatisfiableRequirements(f"job runs {count} replicas but this worker sees {len(pool)} device(s)")
    return [d.name for d in pool[:count]]
