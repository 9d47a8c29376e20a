"""Job specs: build one, and check it (and its inputs) against its kernel.

The records themselves and their canonical encoding live in
:mod:`kernels.jobspec`, below ``kernels/ops/`` and the registry; this
module sits above them, so checking a spec against its kernel needs no
import inside a function and the package's import graph has no cycle. The
record names are re-exported here because callers build, hash and check
specs through this one module.

Validation here runs in the caller's process and never imports TensorFlow:
a node without the provider role can build, hash and check specs cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.errors import (
    BlobHashMismatch,
    DtypeMismatch,
    InputMismatch,
    MalformedSpec,
    ShapeMismatch,
    TensorTooLarge,
)
from kernels.jobspec import (
    DEVICE_KINDS,
    BlobRef,
    JobSpec,
    Limits,
    Requirements,
    blob_ref,
    decode_blob,
    decode_spec,
    encode_spec,
    spec_hash,
)
from kernels.registry import lookup
from kernels.tensors import array_hash, blob_hash, canonical_array, check_dtype, check_shape

__all__ = [
    "DEVICE_KINDS",
    "BlobRef",
    "JobSpec",
    "Limits",
    "Requirements",
    "blob_hash",
    "blob_ref",
    "decode_blob",
    "decode_spec",
    "encode_spec",
    "make_spec",
    "spec_hash",
    "validate_inputs",
    "validate_spec",
    "validate_stream_items",
]


def _sorted_pairs(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(mapping.items()))


def make_spec(
    kernel: str,
    version: int,
    params: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    *,
    device: str = "any",
    memory_bytes: int = 1 << 30,
    seconds: float = 60.0,
    output_bytes: int = 1 << 30,
) -> JobSpec:
    """Build a spec from arrays (hashing them) and validate it."""
    spec = JobSpec(
        kernel=kernel,
        version=version,
        params=_sorted_pairs(params),
        inputs=_sorted_pairs({name: blob_ref(arr) for name, arr in inputs.items()}),
        requirements=Requirements(device=device, memory_bytes=memory_bytes),
        limits=Limits(seconds=float(seconds), output_bytes=output_bytes),
    )
    validate_spec(spec)
    return spec


def validate_spec(spec: JobSpec) -> None:
    """Check a spec completely without touching TensorFlow.

    The record must encode canonically; the kernel must exist; its params and
    declared inputs must satisfy the kernel's own rules.
    """
    if not isinstance(spec, JobSpec):
        raise MalformedSpec(f"expected a JobSpec, got {type(spec).__name__}")
    encode_spec(spec)
    if spec.requirements.device not in DEVICE_KINDS:
        raise MalformedSpec(f"requirements.device {spec.requirements.device!r} is not one of {DEVICE_KINDS}")
    for name, ref in spec.inputs:
        check_dtype(ref.dtype)
        check_shape(ref.shape)
    lookup(spec.kernel, spec.version).validate(spec)


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray], *, check_hashes: bool = True) -> dict[str, np.ndarray]:
    """Match arrays to the spec's blob refs and run the kernel's content checks.

    Returns canonical (little-endian, C-contiguous) arrays. ``check_hashes``
    may be turned off only by a caller that already checked each blob's hash
    when it fetched it (``decode_blob``).
    """
    refs = spec.input_dict()
    missing = sorted(set(refs) - set(inputs))
    extra = sorted(set(inputs) - set(refs))
    if missing or extra:
        raise InputMismatch(f"inputs do not match the spec: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for name, ref in refs.items():
        arr = inputs[name]
        if not isinstance(arr, np.ndarray):
            raise InputMismatch(f"input {name!r}: expected a numpy array, got {type(arr).__name__}")
        if arr.dtype.name != ref.dtype:
            raise DtypeMismatch(f"input {name!r}: dtype {arr.dtype.name} but the spec says {ref.dtype}")
        if tuple(arr.shape) != tuple(ref.shape):
            raise ShapeMismatch(f"input {name!r}: shape {tuple(arr.shape)} but the spec says {tuple(ref.shape)}")
        arr = canonical_array(arr)
        if check_hashes and array_hash(arr) != ref.hash:
            raise BlobHashMismatch(f"input {name!r}: bytes do not hash to the spec's {ref.hash.hex()[:16]}...")
        out[name] = arr
    lookup(spec.kernel, spec.version).validate_inputs(spec, out)
    return out


def validate_stream_items(spec: JobSpec, inputs: Mapping[str, np.ndarray], items: Any, *,
                          max_items: int | None = None, max_item_elements: int | None = None) -> np.ndarray:
    """Check the items of a streaming session (one per row) against the kernel's per-item input signature.

    ``inputs`` are the spec's (already validated) inputs, which is where a
    model-carrying kernel reads its signature. Items are refused before any
    escrow is locked: a wrong dtype or shape, an item over
    ``max_item_elements``, more rows than ``max_items`` (the task's unit cap),
    or a non-finite value (its output could never be verified, so an honest
    provider could be judged wrong over it). Errors name the first bad item.
    Returns the items as one canonical array.
    """
    kernel = lookup(spec.kernel, spec.version)
    if kernel.item_signature is None:
        raise InputMismatch(f"kernel {spec.kernel} v{spec.version} cannot serve a streaming session")
    if not isinstance(items, np.ndarray):
        raise InputMismatch(f"items: expected a numpy array (one item per row), got {type(items).__name__}")
    if items.ndim < 1 or items.shape[0] == 0:
        raise InputMismatch(f"items: expected one item per row, got shape {tuple(items.shape)} (no items)")
    count = items.shape[0]
    if max_items is not None and count > max_items:
        raise InputMismatch(f"items: {count} items but the task's cap is {max_items} units (item {max_items} "
                            f"is the first over it)")
    sig = kernel.item_signature(spec, inputs)
    item_shape = tuple(items.shape[1:])
    # Every row shares the array's dtype and shape, so item 0 is the first bad one when they are wrong.
    if items.dtype.name not in sig.dtypes:
        raise DtypeMismatch(f"item 0 (and every item): dtype {items.dtype.name}, but the model takes "
                            f"{sig.describe()}")
    if not sig.fits_shape(item_shape):
        raise ShapeMismatch(f"item 0 (and every item): shape {item_shape}, but the model takes {sig.describe()}")
    per_item = math.prod(item_shape)
    if max_item_elements is not None and per_item > max_item_elements:
        raise TensorTooLarge(f"item 0 (and every item): {per_item} elements, over the stream limit of "
                             f"{max_item_elements}")
    finite = np.isfinite(items.reshape(count, -1)).all(axis=1) if per_item else np.ones(count, dtype=bool)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InputMismatch(f"item {bad} holds NaN or infinite values (its output could not be verified)")
    return canonical_array(items)
