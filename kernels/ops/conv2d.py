"""``conv2d`` v1: 2-D convolution (cross-correlation), NHWC input, HWIO filter.

Same error model as ``matmul``: each output is a dot product of length
``kh * kw * c_in``, so the tolerance is ``k * eps`` against the convolution
of absolute values, computed in float64 NumPy without TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from kernels.errors import InvalidParams, ShapeMismatch
from kernels.jobspec import JobSpec
from kernels.kernel import Kernel, Param, Verdict, check_claimed, check_params, compare_outputs, require_dtype, require_inputs, require_ndim
from kernels.ops._tf import tf

NAME = "conv2d"
VERSION = 1
PARAMS: dict[str, Param] = {
    "stride": Param(int, default=1, lo=1, hi=8),
    "dilation": Param(int, default=1, lo=1, hi=8),
    "padding": Param(str, default="valid", choices=("valid", "same")),
}
DTYPES = ("float16", "float32", "float64")


def _out_dim(size: int, k: int, stride: int, dilation: int, padding: str) -> int:
    eff = (k - 1) * dilation + 1
    if padding == "same":
        return math.ceil(size / stride)
    return max(0, (size - eff) // stride + 1)


def output_shapes(spec: JobSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    p = check_params(spec, PARAMS)
    x, w = spec.input_dict()["x"], spec.input_dict()["w"]
    n, h, wd, _ = x.shape
    kh, kw, _, f = w.shape
    oh = _out_dim(h, kh, p["stride"], p["dilation"], p["padding"])
    ow = _out_dim(wd, kw, p["stride"], p["dilation"], p["padding"])
    return {"y": (x.dtype, (n, oh, ow, f))}


def validate(spec: JobSpec) -> None:
    p = check_params(spec, PARAMS)
    if p["stride"] > 1 and p["dilation"] > 1:
        raise InvalidParams("params 'stride' and 'dilation' cannot both exceed 1")
    refs = require_inputs(spec, {"x", "w"})
    for name in ("x", "w"):
        require_dtype(name, refs[name], DTYPES)
        require_ndim(name, refs[name], 4)
    x, w = refs["x"], refs["w"]
    if x.dtype != w.dtype:
        raise ShapeMismatch(f"inputs 'x' ({x.dtype}) and 'w' ({w.dtype}) must share a dtype")
    if x.shape[3] != w.shape[2]:
        raise ShapeMismatch(f"x has {x.shape[3]} channels but w expects {w.shape[2]} (x {tuple(x.shape)}, w {tuple(w.shape)})")
    if 0 in w.shape[:3]:
        raise ShapeMismatch(f"filter shape {tuple(w.shape)} has an empty dimension")
    _, (n, oh, ow, f) = output_shapes(spec)["y"]
    if p["padding"] == "valid" and (oh == 0 or ow == 0):
        raise ShapeMismatch(f"filter {tuple(w.shape)} (dilation {p['dilation']}) is larger than the input {tuple(x.shape)}")


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    return None


def run(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p = check_params(spec, PARAMS)
    t = tf()
    y = t.nn.conv2d(
        t.convert_to_tensor(inputs["x"]),
        t.convert_to_tensor(inputs["w"]),
        strides=p["stride"],
        padding=p["padding"].upper(),
        dilations=p["dilation"],
    )
    return {"y": y.numpy()}


def reference(x: np.ndarray, w: np.ndarray, stride: int = 1, dilation: int = 1, padding: str = "valid") -> np.ndarray:
    """Float64 NumPy convolution with TensorFlow's padding rule."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    if padding == "same":
        pads = []
        for size, k in ((h, kh), (wd, kw)):
            out = math.ceil(size / stride)
            total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = _out_dim(h, kh, stride, dilation, padding)
    ow = _out_dim(wd, kw, stride, dilation, padding)
    y = np.zeros((n, oh, ow, f), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dilation, i * dilation + (oh - 1) * stride + 1, stride)
            cols = slice(j * dilation, j * dilation + (ow - 1) * stride + 1, stride)
            y += np.tensordot(x[:, rows, cols, :], w[i, j], axes=([3], [0]))
    return y


def tolerance(spec: JobSpec) -> float:
    refs = spec.input_dict()
    kh, kw, c, _ = refs["w"].shape
    eps = float(np.finfo(refs["x"].dtype).eps)
    return 1.01 * kh * kw * c * eps + 2 * eps


def verify(spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray]) -> Verdict:
    tol = tolerance(spec)
    shapes = output_shapes(spec)
    bad = check_claimed(claimed, shapes, tol)
    if bad is not None:
        return bad
    p = check_params(spec, PARAMS)
    x, w = inputs["x"], inputs["w"]
    ref = reference(x, w, p["stride"], p["dilation"], p["padding"])
    bound = reference(np.abs(x), np.abs(w), p["stride"], p["dilation"], p["padding"])
    tiny = float(np.finfo(x.dtype).tiny)
    return compare_outputs(claimed, {"y": ref.astype(x.dtype)}, tol, scale=lambda _n, _r: np.maximum(bound, tiny))


KERNEL = Kernel(NAME, VERSION, validate, validate_inputs, run, verify, PARAMS, __doc__ or "")
