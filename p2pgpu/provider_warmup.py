"""Start a provider's kernel workers as early as the node process can, so TensorFlow loads while the node joins.

A provider cannot bid before its kernel runtime is warm: each worker
process imports TensorFlow (seconds of CPU) and reports its device. The
node itself spends seconds importing libp2p, unlocking keys and joining
the network first. Spawning the workers at the very start of ``p2pgpu
node run`` (:func:`start_provider_runtime`, called right after the config
is read) lets the two overlap instead of running one after the other; the
market roles then take over the already-started runtime
(``Node.kernel_runtime``) and only wait for it and probe it.

A node without the provider role gets ``None`` and never imports the
kernel runtime, let alone TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pgpu.config import NodeConfig, ProviderConfig

if TYPE_CHECKING:
    from kernels.runtime import KernelRuntime, RuntimeConfig

__all__ = ["provider_runtime_config", "start_provider_runtime"]


def provider_runtime_config(provider: ProviderConfig) -> RuntimeConfig:
    """The kernel runtime a provider with these settings runs: one worker per concurrent job."""
    from kernels.runtime import RuntimeConfig

    return RuntimeConfig(workers=provider.max_concurrent_jobs, device="cpu" if provider.device == "cpu" else "auto")


def start_provider_runtime(config: NodeConfig) -> KernelRuntime | None:
    """Spawn the provider's kernel workers now (returns at once); ``None`` for a node without the provider role.

    The caller owns the runtime: it hands it to the node, and closes it if
    the node never gets to run (closing twice is harmless).
    """
    if "provider" not in config.roles:
        return None
    from kernels.runtime import KernelRuntime

    runtime = KernelRuntime(provider_runtime_config(config.provider))
    runtime.start()
    return runtime
