"""Capability probe: what a provider has, advertises and prices from.

``measure_capabilities`` runs inside a worker (it needs TensorFlow); the
caller gets a :class:`Capabilities` record, which has a canonical encoding
so it can go on the wire (``RegisterProvider``, bids) as is.

The caller side also needs to know, before any worker exists, how many GPUs
there are (one pinned worker per GPU) and how many jobs to run at once.
:func:`detect_gpus` and :func:`default_slots` answer that without
TensorFlow: importing it costs seconds and would initialise CUDA in the
provider's own process, which must stay out of the GPUs its workers own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from ledger.codec import U64, Float, Record, Text, record

__all__ = [
    "CORES_PER_CPU_SLOT",
    "NVIDIA_PROC_GPUS",
    "SLOT_MEMORY_BYTES",
    "Capabilities",
    "count_nvidia_smi_gpus",
    "default_slots",
    "describe_device",
    "detect_gpus",
    "driver_gpu_count",
    "matmul_gflops",
    "measure_capabilities",
    "system_memory",
    "visible_gpus",
]

GiB = 1 << 30
NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"  # one directory per GPU (named by PCI address) while the driver is loaded
CORES_PER_CPU_SLOT = 4
SLOT_MEMORY_BYTES = 2 * GiB


@record
class Capabilities(Record):
    device_kind: Annotated[str, Text(8, min_len=1)]  # "cpu" | "gpu"
    device_name: Annotated[str, Text(128)]
    memory_bytes: U64
    tf_version: Annotated[str, Text(32)]
    matmul_gflops: Annotated[float, Float(0.0)]


def visible_gpus(cuda_visible_devices: str | None, driver_count: int) -> tuple[str, ...]:
    """The GPUs a process may use, as ``CUDA_VISIBLE_DEVICES`` tokens, in CUDA's order.

    ``cuda_visible_devices`` is that variable's value (None: unset, so every
    GPU the driver has is visible, as "0".."n-1"); ``driver_count`` is how many
    GPUs the driver exposes. The rules are CUDA's own, so a worker pinned to
    a token sees exactly the GPU this function promised: the list is read up
    to the first invalid entry (an index out of range, a negative index, an
    empty or unknown token, a repeat) and ignores everything after it, which
    is why "-1" and "" hide every GPU. UUID tokens ("GPU-...", "MIG-...") are
    kept as they are; they cannot be checked without the driver's help.

    Tokens, not indices, are returned because a worker's pin must name the
    same physical GPU as the parent's list: with ``CUDA_VISIBLE_DEVICES=2,3``
    the first worker gets "2", not "0".
    """
    if driver_count <= 0:
        return ()
    if cuda_visible_devices is None:
        return tuple(str(i) for i in range(driver_count))
    tokens: list[str] = []
    for raw in cuda_visible_devices.split(","):
        token = raw.strip()
        if token.isdigit():
            if int(token) >= driver_count:
                break
            token = str(int(token))
        elif not token.startswith(("GPU-", "MIG-")):
            break  # "", "-1" or anything CUDA cannot parse ends the list
        if token in tokens:
            break
        tokens.append(token)
    return tuple(tokens)


def count_nvidia_smi_gpus(listing: str) -> int:
    """GPUs in ``nvidia-smi -L`` output: one ``GPU <i>: <name> (UUID: ...)`` line each.

    MIG instances are listed on indented lines under their GPU and are not
    counted: they are not separate devices to the driver's GPU count.
    """
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _run_nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def driver_gpu_count(proc_dir: str = NVIDIA_PROC_GPUS,
                     nvidia_smi: Callable[[], str | None] = _run_nvidia_smi) -> int:
    """How many NVIDIA GPUs the driver exposes; 0 when there is no driver to ask.

    The loaded kernel driver lists each GPU under ``/proc/driver/nvidia/gpus``
    (inside a container, only the GPUs given to it), which costs no process
    and needs no tool installed. Where that directory does not exist but GPUs
    do (WSL2), ``nvidia-smi -L`` is asked instead. Without either, CUDA could
    not run here either, so 0 is the honest answer.
    """
    try:
        return len(os.listdir(proc_dir))
    except OSError:
        pass
    listing = nvidia_smi()
    return count_nvidia_smi_gpus(listing) if listing else 0


def detect_gpus(environ: Mapping[str, str] | None = None, driver_count: int | None = None) -> tuple[str, ...]:
    """This machine's usable GPUs as ``CUDA_VISIBLE_DEVICES`` tokens, found without TensorFlow.

    ``environ`` defaults to this process's environment and ``driver_count``
    to :func:`driver_gpu_count`; both are parameters so the rules can be
    tested with fakes. An empty tuple means no GPU: the runtime then starts
    CPU workers exactly as it did before GPUs were counted.
    """
    env = os.environ if environ is None else environ
    count = driver_gpu_count() if driver_count is None else driver_count
    return visible_gpus(env.get("CUDA_VISIBLE_DEVICES"), count)


def default_slots(device_kind: str, gpu_count: int, cpu_count: int, memory_bytes: int) -> int:
    """How many jobs a provider should run at once unless its operator says otherwise.

    * GPU machine (``device_kind == "gpu"``): one per GPU. Each worker is
      pinned to its own GPU, so a slot is a device; two jobs on one GPU
      would fight over its memory, and a job wanting several GPUs borrows
      several slots (see ``kernels.runtime``).
    * CPU only: ``max(1, min(cpu_count // CORES_PER_CPU_SLOT,
      memory_bytes // SLOT_MEMORY_BYTES))``. One TensorFlow job already
      spreads over every core through its thread pools, so a second worker
      mostly competes with the first, and both compete with the node's own
      event loop (consensus timeouts, gossip). One slot per 4 cores keeps a
      2-core devnet node responsive (1 slot) and still lets a 16-core server
      run 4. Each slot also needs memory: a warm worker's TensorFlow (about
      0.5 GiB) plus a job's budget (1 GiB by default), so 2 GiB per slot.

    Always at least 1: a provider that runs nothing has no reason to exist.
    """
    if device_kind not in ("cpu", "gpu"):
        raise ValueError(f"device_kind must be 'cpu' or 'gpu', got {device_kind!r}")
    if device_kind == "gpu":
        return max(1, gpu_count)
    by_cores = cpu_count // CORES_PER_CPU_SLOT
    by_memory = memory_bytes // SLOT_MEMORY_BYTES
    return max(1, min(by_cores, by_memory))


def system_memory() -> int:
    """This machine's physical memory in bytes, without TensorFlow (0 if the OS will not say)."""
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
        return {"device_kind": "gpu", "device_name": name[:128], "memory_bytes": memory or system_memory(),
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
            "memory_bytes": system_memory(), "tf_version": tf.__version__}


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
