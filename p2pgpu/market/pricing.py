"""Provider-side pricing: from a job spec and a measured device to a bid, or a reasoned refusal.

Work is estimated in floating-point operations from the spec alone (shapes
and weight counts; no TensorFlow, no inputs):

=============  =========================================================
kernel         FLOPs
=============  =========================================================
matmul         2·m·k·n
conv2d         2·N·OH·OW·F·KH·KW·C_in
keras_infer    2·P·rows            (P = weight elements: one multiply-add each per row)
stream_infer   2·P per item        (2·P·rows per item with param ``rows``; 2·P per row of ``x`` as a batch job)
keras_train    6·P·batch·steps     (forward + backward ≈ 3 forward passes)
=============  =========================================================

For convolutional Keras models P under-counts (weights are reused across
positions), which ``PricingPolicy.model_factor`` can correct for.

Time = ``overhead_seconds`` (input transfer, worker warm-up) + FLOPs /
measured GFLOP/s. Price per unit = max(floor, ⌈seconds × cost_per_second ×
(1 + margin)⌉). For a stream task a unit is one item, and the overhead is
spread over the task's units. The provider is local policy, not consensus,
so floats are fine here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kernels.errors import KernelError, UnknownKernel
from kernels.probe import Capabilities
from kernels.spec import JobSpec, validate_spec
from ledger.params import BPS
from ledger.transactions import TaskKind

from .messages import DeclineReason

__all__ = ["Decline", "PricingPolicy", "Quote", "advert_unit_price", "assess_task", "estimate_flops"]


@dataclass(frozen=True, slots=True)
class PricingPolicy:
    cost_per_second: float = 100.0
    """Price (smallest units) of one second of this device's time, before the margin."""
    margin_bps: int = 2_000
    """Markup over cost in basis points (2,000 = 20 %)."""
    floor: int = 1
    """Lowest unit price ever bid."""
    overhead_seconds: float = 1.0
    """Fixed time per job: fetching inputs, loading the kernel, delivering the result."""
    slot_overhead_seconds: float = 0.05
    """Of that, what a batch job holds its slot (a warm worker) for beyond its FLOPs: handing the inputs
    over and reading the outputs back. Fetching and delivering happen outside the slot, so a queue of
    small jobs moves at this pace, not at ``overhead_seconds`` a job."""
    model_factor: float = 1.0
    """Multiplier on Keras FLOP estimates (weights reused across positions in conv layers)."""
    block_seconds: float = 1.0
    """Expected seconds per ledger block, to turn windows in blocks into time."""
    deadline_safety: float = 2.0
    """Only bid when the execution window is at least this many times the estimate."""

    def __post_init__(self) -> None:
        if self.cost_per_second < 0 or self.margin_bps < 0 or self.floor < 1:
            raise ValueError("pricing: cost_per_second and margin_bps must be >= 0, floor >= 1")
        if self.block_seconds <= 0 or self.deadline_safety < 1 or self.overhead_seconds < 0 \
                or self.slot_overhead_seconds < 0:
            raise ValueError("pricing: block_seconds > 0, deadline_safety >= 1, overhead_seconds >= 0, "
                             "slot_overhead_seconds >= 0 required")


@dataclass(frozen=True, slots=True)
class Quote:
    unit_price: int
    est_seconds: float  # the whole task (all units)
    flops: float  # the whole task
    slot_seconds: float = 0.0
    """How long the task holds a slot: its compute plus the slot overhead (a stream holds it throughout)."""


@dataclass(frozen=True, slots=True)
class Decline:
    reason: DeclineReason
    detail: str


def _weight_elements(spec: JobSpec) -> int:
    return sum(math.prod(ref.shape) for name, ref in spec.inputs if name.startswith("weight_"))


def _devices_of(spec: JobSpec) -> int:
    """Devices one run of the job uses at once (a keras_train job's ``replicas``); 1 for most kernels."""
    from kernels.registry import lookup

    try:
        kernel = lookup(spec.kernel, spec.version)
    except UnknownKernel:
        return 1
    return kernel.devices(spec) if kernel.devices is not None else 1


def bundle_weight_elements(bundle_size: int) -> int:
    """Weight elements of a registered model, sized from its bundle (weights dominate it; float32 is the rule).

    A task by model carries no weights to count, so a provider sizes it by
    the registry's ``bundle_size`` before it has fetched the bundle.
    """
    return bundle_size // 4


def estimate_flops(spec: JobSpec, units: int = 1, *, weight_elements: int | None = None) -> float:
    """FLOPs of the whole job (all ``units`` for a stream); raises UnknownKernel for kernels it cannot size.

    ``weight_elements``: the model's size when the spec names a registered model instead of carrying it."""
    refs = spec.input_dict()
    params = spec.param_dict()
    if spec.kernel == "matmul":
        (m, k), (_, n) = refs["a"].shape, refs["b"].shape
        return 2.0 * m * k * n
    if spec.kernel == "conv2d":
        from kernels.ops.conv2d import output_shapes

        _, (n, oh, ow, f) = output_shapes(spec)["y"]
        kh, kw, cin, _ = refs["w"].shape
        return 2.0 * n * oh * ow * f * kh * kw * cin
    p = _weight_elements(spec) if weight_elements is None else weight_elements
    if spec.kernel == "keras_infer":
        return 2.0 * p * refs["x"].shape[0]
    if spec.kernel == "stream_infer":  # an item is one sample, or (param ``rows``) a batch of up to ``rows``
        rows = refs["x"].shape[0] if "x" in refs else units * max(1, int(params.get("rows", 0)))
        return 2.0 * p * rows
    if spec.kernel == "keras_train":
        return 6.0 * p * int(params.get("batch_size", 32)) * int(params["steps"])
    raise UnknownKernel(f"no FLOP model for kernel {spec.kernel!r}")


def assess_task(
    spec: JobSpec,
    *,
    kind: int,
    units: int,
    max_unit_price: int,
    exec_blocks: int,
    capabilities: Capabilities,
    policy: PricingPolicy,
    supported_kernels: frozenset[str] | None = None,
    max_output_bytes: int | None = None,
    max_devices: int = 1,
    model_weight_elements: int | None = None,
) -> Quote | Decline:
    """A bid quote for this task on this device, or the first reason not to bid.

    ``model_weight_elements`` sizes a task by model (:func:`bundle_weight_elements`).

    Checks run from the most permanent reason to the most negotiable, so a
    client reading declines learns first what no price would fix.
    """
    try:
        validate_spec(spec)
    except UnknownKernel as exc:
        return Decline(DeclineReason.UNSUPPORTED_KERNEL, str(exc)[:200])
    except KernelError as exc:
        return Decline(DeclineReason.INVALID_SPEC, str(exc)[:200])
    if supported_kernels is not None and spec.kernel not in supported_kernels:
        return Decline(DeclineReason.UNSUPPORTED_KERNEL, f"kernel {spec.kernel!r} is not offered here")
    req = spec.requirements
    devices = _devices_of(spec)
    if devices > 1 and (capabilities.device_kind != "gpu" or devices > max_devices):
        have = f"{max_devices} GPU(s)" if capabilities.device_kind == "gpu" else f"a {capabilities.device_kind}"
        return Decline(DeclineReason.REQUIRES_GPU, f"task runs on {devices} GPUs at once; this provider has {have}")
    if req.device == "gpu" and capabilities.device_kind != "gpu":
        return Decline(DeclineReason.REQUIRES_GPU, f"task requires a gpu; this provider has a {capabilities.device_kind}")
    if req.memory_bytes > capabilities.memory_bytes:
        return Decline(DeclineReason.INSUFFICIENT_MEMORY,
                       f"task needs {req.memory_bytes} bytes of memory; device has {capabilities.memory_bytes}")
    if max_output_bytes is not None and spec.limits.output_bytes > max_output_bytes:
        return Decline(DeclineReason.OUTPUT_TOO_LARGE,
                       f"task allows {spec.limits.output_bytes} output bytes; this provider keeps at most {max_output_bytes}")
    try:
        flops = estimate_flops(spec, units, weight_elements=model_weight_elements)
    except (UnknownKernel, KeyError) as exc:
        return Decline(DeclineReason.UNSUPPORTED_KERNEL, f"cannot size kernel {spec.kernel!r}: {exc}"[:200])
    if spec.kernel.startswith("keras") or spec.kernel == "stream_infer":
        flops *= policy.model_factor
    compute_seconds = flops / (capabilities.matmul_gflops * 1e9)
    total_seconds = policy.overhead_seconds + compute_seconds
    per_job_seconds = total_seconds if kind == TaskKind.BATCH else policy.overhead_seconds + compute_seconds / units
    if per_job_seconds > spec.limits.seconds:
        return Decline(DeclineReason.EXCEEDS_TIME_LIMIT,
                       f"estimated {per_job_seconds:.3g} s exceeds the task's limit of {spec.limits.seconds:.3g} s")
    window = exec_blocks * policy.block_seconds
    if total_seconds * policy.deadline_safety > window:
        return Decline(DeclineReason.DEADLINE_TOO_SHORT,
                       f"estimated {total_seconds:.3g} s (x{policy.deadline_safety} safety) does not fit "
                       f"{exec_blocks} blocks (~{window:.3g} s)")
    unit_seconds = total_seconds / units
    raw = unit_seconds * policy.cost_per_second * (BPS + policy.margin_bps) / BPS
    unit_price = max(policy.floor, math.ceil(round(raw, 6)))  # round: 1.0 x 100 x 1.2 must be 120, not 121
    if unit_price > max_unit_price:
        return Decline(DeclineReason.PRICE_BELOW_COST,
                       f"cost {unit_price} per unit is above the offered {max_unit_price}")
    slot_seconds = total_seconds if kind == TaskKind.STREAM else compute_seconds + policy.slot_overhead_seconds
    return Quote(unit_price=unit_price, est_seconds=total_seconds, flops=flops, slot_seconds=slot_seconds)


def advert_unit_price(policy: PricingPolicy, capabilities: Capabilities, bundle_size: int) -> int:
    """The price per unit an advert names for a registered model: one item through the model, in a long stream.

    The same formula :func:`assess_task` bids with (2·P FLOPs per item, P
    sized from the bundle, the policy's ``model_factor``, cost and margin),
    with the per-job overhead spread to nothing: an advert is what a unit
    costs here at best, and a bid for a short task adds its overhead on top.
    """
    if bundle_size < 0:
        raise ValueError(f"bundle_size must be >= 0, got {bundle_size}")
    if capabilities.matmul_gflops <= 0:
        raise ValueError("capabilities.matmul_gflops must be measured (> 0) to price work")
    flops = 2.0 * bundle_weight_elements(bundle_size) * policy.model_factor
    raw = flops / (capabilities.matmul_gflops * 1e9) * policy.cost_per_second * (BPS + policy.margin_bps) / BPS
    return max(policy.floor, math.ceil(round(raw, 6)))
