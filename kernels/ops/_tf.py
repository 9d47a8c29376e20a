"""Lazy TensorFlow access for kernels: imported on first use, inside a worker."""

from __future__ import annotations

from typing import Any


def tf() -> Any:
    import tensorflow

    return tensorflow


def cpu_device() -> Any:
    """A context that pins ops to the CPU (used by deterministic re-execution)."""
    return tf().device("/CPU:0")
