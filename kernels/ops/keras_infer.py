"""``keras_infer`` v1: batch inference with an allowlisted Keras model.

Inputs: ``model`` (uint8 JSON), ``weight_NNN``, ``x`` (a float batch).
Output: ``y``. Verification re-runs the forward pass on the CPU and accepts
a relative error (against the largest output magnitude) of 1e-4 for float32:
GPU kernels reorder sums and fuse ops, so bitwise equality is not expected,
while a tampered or scaled output is far outside that band.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kernels.jobspec import JobSpec
from kernels.kernel import Kernel, Param, Verdict, check_params, compare_outputs
from kernels.ops import _keras
from kernels.ops._tf import cpu_device

NAME = "keras_infer"
VERSION = 1
PARAMS: dict[str, Param] = {"batch_size": Param(int, default=256, lo=1, hi=65536)}


def validate(spec: JobSpec) -> None:
    check_params(spec, PARAMS)
    refs, _ = _keras.model_refs(spec, {"x"})
    _keras.check_batch_input("x", refs["x"])


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    _keras.check_config_input(inputs)


def run(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p = check_params(spec, PARAMS)
    model, want = _keras.load(inputs)
    _keras.check_item_shape(want, tuple(inputs["x"].shape[1:]), "input 'x' rows")
    return {"y": _keras.predict(model, inputs["x"], p["batch_size"])}


def verify(spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray]) -> Verdict:
    with cpu_device():
        ref = run(spec, inputs)
    tol = _keras.INFER_TOLERANCE.get(ref["y"].dtype.name, 1e-4)
    return compare_outputs(claimed, ref, tol)


KERNEL = Kernel(NAME, VERSION, validate, validate_inputs, run, verify, PARAMS, __doc__ or "")
