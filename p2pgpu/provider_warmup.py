"""Start a provider's kernel workers as early as the node process can, so TensorFlow loads while the node joins.

A provider cannot bid before its kernel runtime is warm: each worker
process imports TensorFlow (seconds of CPU) and reports its device.
``Node.run`` spawns the workers (:func:`start_provider_runtime`) before it
opens the chain and joins the network, so the import overlaps joining,
syncing and the first blocks instead of starting once the node is up; the
market roles then take over the started runtime (``Node.kernel_runtime``)
and only wait for it and probe it.

Not earlier, at process start: the workers share their node's session,
hence its scheduler autogroup on Linux, so importing TensorFlow alongside
the node's own libp2p import halves the node's CPU share and it joins late,
while its peers are already finalizing blocks it must then sync.

A node without the provider role gets ``None`` and never imports the
kernel runtime, let alone TensorFlow.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from p2pgpu.config import NodeConfig, ProviderConfig

if TYPE_CHECKING:
    from kernels.runtime import KernelRuntime, RuntimeConfig

__all__ = ["provider_runtime_config", "provider_slots", "start_provider_runtime"]

# The kernels package is imported inside these functions, when a provider needs it: p2pgpu.node imports this module,
# and importing kernels costs a node 0.47 s on top of p2pgpu.node (numpy, the runtime; measured), which a node
# without the provider role never pays. TensorFlow itself loads only in the worker processes.


def provider_slots(provider: ProviderConfig) -> int:
    """Jobs this provider runs at once: ``slots`` (or its old name ``max_concurrent_jobs``), else the device's."""
    if provider.slots is not None:
        return provider.slots
    if provider.max_concurrent_jobs is not None:
        return provider.max_concurrent_jobs
    from kernels.probe import default_slots, detect_gpus, system_memory  # no TensorFlow: GPUs from the driver

    gpus = () if provider.device == "cpu" else detect_gpus()
    return default_slots("gpu" if gpus else "cpu", len(gpus), len(os.sched_getaffinity(0)), system_memory())


def provider_runtime_config(provider: ProviderConfig) -> RuntimeConfig:
    """The kernel runtime a provider with these settings runs: one worker per slot."""
    from kernels.runtime import RuntimeConfig

    return RuntimeConfig(workers=provider_slots(provider), device="cpu" if provider.device == "cpu" else "auto")


def start_provider_runtime(config: NodeConfig) -> KernelRuntime | None:
    """Spawn the provider's kernel workers now (returns at once); ``None`` for a node without the provider role.

    The caller owns the runtime and closes it (closing twice is harmless).
    """
    if "provider" not in config.roles:
        return None
    from kernels.runtime import KernelRuntime

    runtime = KernelRuntime(provider_runtime_config(config.provider))
    runtime.start()
    return runtime
