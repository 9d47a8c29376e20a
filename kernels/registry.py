"""Kernel lookup by (name, version). The table is fixed at import: no plug-ins, no user code."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from kernels.errors import UnknownKernel
from kernels.kernel import Kernel
from kernels.ops import conv2d, keras_infer, keras_train, matmul, stream_infer

__all__ = ["KERNELS", "lookup"]

KERNELS: Mapping[tuple[str, int], Kernel] = MappingProxyType(
    {(k.name, k.version): k for k in (m.KERNEL for m in (matmul, conv2d, keras_infer, keras_train, stream_infer))}
)


def lookup(name: str, version: int) -> Kernel:
    kernel = KERNELS.get((name, version))
    if kernel is None:
        known = sorted(f"{n} v{v}" for n, v in KERNELS)
        if any(n == name for n, _ in KERNELS):
            raise UnknownKernel(f"kernel {name!r} has no version {version} (known: {', '.join(known)})")
        raise UnknownKernel(f"unknown kernel {name!r} (known: {', '.join(known)})")
    return kernel
