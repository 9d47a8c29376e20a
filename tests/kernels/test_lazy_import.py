"""Nodes without the provider role must not pay for TensorFlow: check it in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import numpy as np
import kernels
from kernels import make_spec, spec_hash, validate_spec, validate_inputs, KernelRuntime, RuntimeConfig
from kernels.ops import matmul
from tests.kernels.helpers import dense_model

inputs, _ = dense_model(4, [(3, "relu")])
data = {**inputs, "x": np.zeros((2, 4), np.float32)}
spec = make_spec("keras_infer", 1, {"batch_size": 2}, data)
validate_spec(spec)
validate_inputs(spec, data)
spec_hash(spec)
a = np.ones((2, 3), np.float32); b = np.ones((3, 2), np.float32)
mspec = make_spec("matmul", 1, {}, {"a": a, "b": b})
assert matmul.verify(mspec, {"a": a, "b": b}, {"c": a @ b}).ok
KernelRuntime(RuntimeConfig())  # constructing a runtime spawns nothing
KernelRuntime(RuntimeConfig()).gpus  # GPUs are counted without TensorFlow
from kernels import default_slots, detect_gpus
default_slots("gpu", len(detect_gpus()), 2, 1 << 30)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print("LOADED", loaded)
"""


def test_kernels_api_does_not_import_tensorflow() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout
