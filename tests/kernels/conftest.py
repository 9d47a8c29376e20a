from __future__ import annotations

from collections.abc import Iterator

import pytest

from kernels import KernelRuntime, RuntimeConfig


@pytest.fixture(scope="session")
def runtime() -> Iterator[KernelRuntime]:
    """One warm CPU runtime for the whole session (each worker pays a ~4 s TensorFlow import).

    The runtime keeps no Trio state between calls, so each trio test can use it.
    A small memory headroom lets the out-of-memory test trip the budget cheaply.
    """
    rt = KernelRuntime(RuntimeConfig(workers=1, device="cpu", memory_headroom_bytes=64 << 20))
    rt.start()
    yield rt
    rt.close()
