"""What every kernel provides, and the pieces kernels share.

A kernel is a small module under ``kernels/ops`` exposing ``validate(spec)``
(declared inputs and params; no TensorFlow), ``validate_inputs(spec, inputs)``
(content checks such as the model allowlist; no TensorFlow),
``run(spec, inputs) -> dict[str, np.ndarray]`` (TensorFlow, imported lazily)
and ``verify(spec, inputs, claimed) -> Verdict``. Verification tolerances are
the kernel's own business because they follow from its arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np

from kernels.errors import DtypeMismatch, InputMismatch, InvalidParams, ShapeMismatch
from kernels.jobspec import BlobRef, JobSpec
from ledger.codec import Float, Maybe, Record, Text, record


__all__ = ["ItemSignature", "Kernel", "Param", "Verdict", "check_params", "compare_outputs", "require_inputs",
           "seed_everything"]


@record
class Verdict(Record):
    """A verifier's finding: pass/fail, the worst error seen, and the tolerance used.

    ``max_error`` is None when outputs could not be compared (wrong names,
    dtype or shape, or non-finite values).
    """

    ok: bool
    max_error: Annotated[float | None, Maybe(Float(0.0))]
    tolerance: Annotated[float, Float(0.0)]
    reason: Annotated[str, Text(512)]


@dataclass(frozen=True, slots=True)
class Param:
    """One scalar param: its type, bounds or choices, and default (None = required)."""

    kind: type[Any]
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Any, ...] = ()
    lo_open: bool = False

    def check(self, name: str, value: Any) -> Any:
        if self.kind is float and type(value) is int:
            value = float(value)
        if type(value) is not self.kind:
            raise InvalidParams(f"param {name!r}: expected {self.kind.__name__}, got {type(value).__name__}")
        if self.choices and value not in self.choices:
            raise InvalidParams(f"param {name!r}: {value!r} is not one of {self.choices}")
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise InvalidParams(f"param {name!r}: {value!r} is below the minimum {self.lo}")
        if self.hi is not None and value > self.hi:
            raise InvalidParams(f"param {name!r}: {value!r} is above the maximum {self.hi}")
        return value


def check_params(spec: JobSpec, schema: Mapping[str, Param]) -> dict[str, Any]:
    """The spec's params with defaults filled in, or InvalidParams naming the culprit."""
    given = spec.param_dict()
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise InvalidParams(f"unknown param(s) {unknown} for kernel {spec.kernel} v{spec.version}")
    out: dict[str, Any] = {}
    for name, p in schema.items():
        if name not in given:
            if p.default is None:
                raise InvalidParams(f"param {name!r} is required")
            out[name] = p.default
        else:
            out[name] = p.check(name, given[name])
    return out


def require_inputs(spec: JobSpec, required: set[str], optional: set[str] = frozenset()) -> dict[str, BlobRef]:  # type: ignore[assignment]
    refs = spec.input_dict()
    missing = sorted(required - set(refs))
    extra = sorted(set(refs) - required - optional)
    if missing or extra:
        raise InputMismatch(
            f"kernel {spec.kernel} v{spec.version}: missing input(s) {missing}, unexpected input(s) {extra}"
        )
    return refs


def require_dtype(name: str, ref: BlobRef, allowed: tuple[str, ...]) -> None:
    if ref.dtype not in allowed:
        raise DtypeMismatch(f"input {name!r}: dtype {ref.dtype} not accepted here (want one of {allowed})")


def require_ndim(name: str, ref: BlobRef, ndim: int) -> None:
    if len(ref.shape) != ndim:
        raise ShapeMismatch(f"input {name!r}: expected {ndim} dimensions, got shape {tuple(ref.shape)}")


def check_claimed(
    claimed: Mapping[str, np.ndarray], expected: Mapping[str, tuple[str, tuple[int, ...]]], tolerance: float
) -> Verdict | None:
    """A failing Verdict when claimed outputs differ in names, dtype or shape, else None."""
    if not isinstance(claimed, Mapping) or set(claimed) != set(expected):
        names = sorted(claimed) if isinstance(claimed, Mapping) else type(claimed).__name__
        return Verdict(ok=False, max_error=None, tolerance=tolerance,
                       reason=f"outputs {names} differ from expected {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        arr = claimed[name]
        if not isinstance(arr, np.ndarray):
            return Verdict(ok=False, max_error=None, tolerance=tolerance, reason=f"output {name!r} is not an array")
        if arr.dtype.name != dtype:
            return Verdict(ok=False, max_error=None, tolerance=tolerance,
                           reason=f"output {name!r}: dtype {arr.dtype.name}, expected {dtype}")
        if tuple(arr.shape) != tuple(shape):
            return Verdict(ok=False, max_error=None, tolerance=tolerance,
                           reason=f"output {name!r}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    return None


def compare_outputs(
    claimed: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    tolerance: float,
    scale: Callable[[str, np.ndarray], np.ndarray | float] | None = None,
) -> Verdict:
    """Compare claimed to reference outputs: error = max |c - r| / scale.

    ``scale`` gives, per output, the magnitude errors are measured against
    (a float or an array broadcastable to the output); by default the
    largest reference magnitude, floored at 1e-3, so the error is relative.
    """
    expected = {n: (r.dtype.name, tuple(r.shape)) for n, r in reference.items()}
    bad = check_claimed(claimed, expected, tolerance)
    if bad is not None:
        return bad
    worst = 0.0
    worst_name = ""
    for name, ref in reference.items():
        c = np.asarray(claimed[name], dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        if not np.all(np.isfinite(c)):
            return Verdict(ok=False, max_error=None, tolerance=tolerance, reason=f"output {name!r} has non-finite values")
        if c.size == 0:
            continue
        s = scale(name, r) if scale is not None else max(float(np.max(np.abs(r))), 1e-3)
        err = float(np.max(np.abs(c - r) / np.maximum(s, 1e-30)))
        if not math.isfinite(err):
            return Verdict(ok=False, max_error=None, tolerance=tolerance, reason=f"output {name!r}: error not finite")
        if err > worst:
            worst, worst_name = err, name
    if worst > tolerance:
        return Verdict(ok=False, max_error=worst, tolerance=tolerance,
                       reason=f"output {worst_name!r}: error {worst:.3g} exceeds tolerance {tolerance:.3g}")
    return Verdict(ok=True, max_error=worst, tolerance=tolerance, reason="within tolerance")


def seed_everything(seed: int) -> None:
    """Fix Python, NumPy and TensorFlow seeds (TensorFlow must be importable)."""
    import keras

    keras.utils.set_random_seed(seed)


@dataclass(frozen=True, slots=True)
class ItemSignature:
    """What one item of a streaming session must look like: allowed dtypes and a shape (None = any size).

    ``shape`` is None when the model does not declare its input shape in a
    form readable without TensorFlow; then only the dtype is checked before
    the provider's model sees the item.
    """

    dtypes: tuple[str, ...]
    shape: tuple[int | None, ...] | None
    max_rows: int = 0
    """0: an item is one sample of ``shape``; else an item is a batch ``[n, *shape]`` with ``1 <= n <= max_rows``."""

    def describe(self) -> str:
        dims = "any shape" if self.shape is None else "shape (" + ", ".join(
            "?" if d is None else str(d) for d in self.shape) + ("," if len(self.shape) == 1 else "") + ")"
        if self.max_rows > 0:
            return f"batches of 1 to {self.max_rows} {' or '.join(self.dtypes)} rows of {dims}"
        return f"{' or '.join(self.dtypes)} items of {dims}"

    def fits_shape(self, shape: tuple[int, ...]) -> bool:
        if self.max_rows > 0:
            if len(shape) < 1 or not 1 <= shape[0] <= self.max_rows:
                return False
            shape = shape[1:]
        return self.shape is None or (len(shape) == len(self.shape)
                                      and all(w is None or w == g for w, g in zip(self.shape, shape)))


@dataclass(frozen=True, slots=True)
class Kernel:
    """A registered kernel: the module functions under one (name, version)."""

    name: str
    version: int
    validate: Callable[[JobSpec], None]
    validate_inputs: Callable[[JobSpec, Mapping[str, np.ndarray]], None]
    run: Callable[[JobSpec, Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    verify: Callable[[JobSpec, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Verdict]
    params: Mapping[str, Param] = field(default_factory=dict)
    doc: str = ""
    item_signature: Callable[[JobSpec, Mapping[str, np.ndarray]], ItemSignature] | None = None
    """Streaming kernels: the per-item input signature read from the job's inputs (no TensorFlow).
    None: the kernel cannot serve a streaming session."""
    devices: Callable[[JobSpec], int] | None = None
    """How many devices one run of a job uses at once, read from its params (no TensorFlow), so the
    runtime can hand the job a worker that sees that many. None: one device."""
