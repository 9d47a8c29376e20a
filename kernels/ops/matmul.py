"""``matmul`` v1: C = A @ B for float matrices.

Verification recomputes in float64 NumPy (no TensorFlow) and bounds each
element's error by the classic dot-product bound |c - c*| <= k u (|A||B|)_ij
(Higham, ch. 3), so the tolerance is ``k * eps(dtype)`` measured against
``|A| @ |B|``: loose enough for any summation order or device, tight enough
to catch a changed element or a scaled result. TF32 is disabled in workers,
so float32 really is float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kernels.errors import ShapeMismatch
from kernels.jobspec import JobSpec
from kernels.kernel import Kernel, Param, Verdict, check_claimed, check_params, compare_outputs, require_dtype, require_inputs, require_ndim
from kernels.ops._tf import tf

NAME = "matmul"
VERSION = 1
PARAMS: dict[str, Param] = {}
DTYPES = ("float16", "float32", "float64")


def output_shapes(spec: JobSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    refs = spec.input_dict()
    return {"c": (refs["a"].dtype, (refs["a"].shape[0], refs["b"].shape[1]))}


def validate(spec: JobSpec) -> None:
    check_params(spec, PARAMS)
    refs = require_inputs(spec, {"a", "b"})
    for name in ("a", "b"):
        require_dtype(name, refs[name], DTYPES)
        require_ndim(name, refs[name], 2)
    if refs["a"].dtype != refs["b"].dtype:
        raise ShapeMismatch(f"inputs 'a' ({refs['a'].dtype}) and 'b' ({refs['b'].dtype}) must share a dtype")
    if refs["a"].shape[1] != refs["b"].shape[0]:
        raise ShapeMismatch(f"inner dimensions differ: a is {tuple(refs['a'].shape)}, b is {tuple(refs['b'].shape)}")


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    return None


def run(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = tf()
    c = t.linalg.matmul(t.convert_to_tensor(inputs["a"]), t.convert_to_tensor(inputs["b"]))
    return {"c": c.numpy()}


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) @ b.astype(np.float64)


def tolerance(spec: JobSpec) -> float:
    refs = spec.input_dict()
    k = max(refs["a"].shape[1], 1)
    return 1.01 * k * float(np.finfo(refs["a"].dtype).eps) + 2 * float(np.finfo(refs["a"].dtype).eps)


def verify(spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray]) -> Verdict:
    tol = tolerance(spec)
    bad = check_claimed(claimed, output_shapes(spec), tol)
    if bad is not None:
        return bad
    a, b = inputs["a"], inputs["b"]
    ref = reference(a, b)
    bound = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    tiny = float(np.finfo(a.dtype).tiny)
    return compare_outputs(claimed, {"c": ref.astype(a.dtype)}, tol,
                           scale=lambda _n, _r: np.maximum(bound, tiny))


KERNEL = Kernel(NAME, VERSION, validate, validate_inputs, run, verify, PARAMS, __doc__ or "")
