"""matmul and conv2d verification: NumPy float64 references, no TensorFlow needed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels import make_spec
from kernels.ops import conv2d, matmul


def naive_conv(x: np.ndarray, w: np.ndarray, stride: int, dilation: int, padding: str) -> np.ndarray:
    """An independent loop-by-loop reference for the vectorised one."""
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    if padding == "same":
        oh, ow = -(-h // stride), -(-wd // stride)
        ph = max((oh - 1) * stride + (kh - 1) * dilation + 1 - h, 0)
        pw = max((ow - 1) * stride + (kw - 1) * dilation + 1 - wd, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh = (h - (kh - 1) * dilation - 1) // stride + 1
        ow = (wd - (kw - 1) * dilation - 1) // stride + 1
    y = np.zeros((n, oh, ow, f))
    for b, i, j, o in itertools.product(range(n), range(oh), range(ow), range(f)):
        for di, dj in itertools.product(range(kh), range(kw)):
            y[b, i, j, o] += x[b, i * stride + di * dilation, j * stride + dj * dilation, :] @ w[di, dj, :, o]
    return y


@pytest.mark.parametrize(("stride", "dilation", "padding"), [(1, 1, "valid"), (2, 1, "same"), (1, 2, "same"), (3, 1, "valid")])
def test_conv_reference_matches_naive_loops(stride: int, dilation: int, padding: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, 3))
    w = rng.standard_normal((3, 2, 3, 4))
    np.testing.assert_allclose(conv2d.reference(x, w, stride, dilation, padding), naive_conv(x, w, stride, dilation, padding), atol=1e-12)


def matmul_case(k: int = 64) -> tuple[object, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    inputs = {"a": rng.standard_normal((16, k)).astype(np.float32), "b": rng.standard_normal((k, 8)).astype(np.float32)}
    spec = make_spec("matmul", 1, {}, inputs)
    c = (inputs["a"].astype(np.float64) @ inputs["b"].astype(np.float64)).astype(np.float32)
    return spec, inputs, {"c": c}


def test_matmul_verify_accepts_tolerance_level_noise() -> None:
    spec, inputs, claimed = matmul_case()
    assert matmul.verify(spec, inputs, claimed).ok
    c = claimed["c"]
    # a few ulps of noise per element: what a different summation order or device produces
    noisy = c + (np.random.default_rng(3).uniform(-4, 4, c.shape) * np.spacing(np.abs(c))).astype(np.float32)
    v = matmul.verify(spec, inputs, {"c": noisy})
    assert v.ok and v.max_error is not None and 0 < v.max_error <= v.tolerance


def test_matmul_verify_rejects_perturbed_results() -> None:
    spec, inputs, claimed = matmul_case()
    c = claimed["c"]
    one = c.copy()
    one[3, 5] += 0.01
    v = matmul.verify(spec, inputs, {"c": one})
    assert not v.ok and v.max_error is not None and v.max_error > v.tolerance
    assert not matmul.verify(spec, inputs, {"c": c * np.float32(1.001)}).ok
    v = matmul.verify(spec, inputs, {"c": c[:, :7]})
    assert not v.ok and v.max_error is None and "shape" in v.reason
    v = matmul.verify(spec, inputs, {"c": c.astype(np.float64)})
    assert not v.ok and "dtype" in v.reason
    v = matmul.verify(spec, inputs, {"y": c})
    assert not v.ok and "differ from expected" in v.reason
    nan = c.copy()
    nan[0, 0] = np.nan
    assert not matmul.verify(spec, inputs, {"c": nan}).ok


def test_conv2d_verify() -> None:
    rng = np.random.default_rng(4)
    inputs = {"x": rng.standard_normal((2, 8, 8, 3)).astype(np.float32), "w": rng.standard_normal((3, 3, 3, 5)).astype(np.float32)}
    spec = make_spec("conv2d", 1, {"padding": "same", "stride": 2}, inputs)
    y = conv2d.reference(inputs["x"], inputs["w"], 2, 1, "same").astype(np.float32)
    assert conv2d.verify(spec, inputs, {"y": y}).ok
    bad = y.copy()
    bad[1, 2, 3, 4] += 0.01
    assert not conv2d.verify(spec, inputs, {"y": bad}).ok
    assert not conv2d.verify(spec, inputs, {"y": y * np.float32(0.999)}).ok
    assert not conv2d.verify(spec, inputs, {"y": y[:, :3]}).ok
