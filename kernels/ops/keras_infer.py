"""``keras_infer`` v1: batch inference with an allowlisted Keras model.

Inputs: ``model`` (uint8 JSON), ``weight_NNN``, ``x`` (a float batch).
Output: ``y``.

By model: a spec whose ``model_id`` param names a registered model (64 hex
digits, the hash of its bundle) carries only ``x``; the provider fetches the
bundle and runs the spec :func:`kernels.bymodel.expand_model_spec` makes of
the two, so the spec a client posts never holds the weights. Verification re-runs the forward pass on the CPU and accepts
a relative error (against the largest output magnitude) of 1e-4 for float32:
GPU kernels reorder sums and fuse ops, so bitwise equality is not expected,
while a tampered or scaled output is far outside that band.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kernels.jobspec import JobSpec
from kernels.errors import InvalidParams
from kernels.kernel import Kernel, Param, Verdict, check_params, compare_outputs, require_inputs
from kernels.ops import _keras
from kernels.ops._tf import cpu_device

NAME = "keras_infer"
VERSION = 1
PARAMS: dict[str, Param] = {"batch_size": Param(int, default=256, lo=1, hi=65536),
                             "model_id": Param(str, default="")}
MODEL_ID_HEX_LEN = 64


def validate(spec: JobSpec) -> None:
    p = check_params(spec, PARAMS)
    if p["model_id"]:
        check_model_id_param(p["model_id"])
        refs = require_inputs(spec, {"x"})
    else:
        refs, _ = _keras.model_refs(spec, {"x"})
    _keras.check_batch_input("x", refs["x"])


def check_model_id_param(value: str) -> None:
    """A ``model_id`` param is a model's hash in lower-case hex, nothing else (one spelling, one spec hash)."""
    if len(value) != MODEL_ID_HEX_LEN or any(c not in "0123456789abcdef" for c in value):
        raise InvalidParams(f"param 'model_id': expected {MODEL_ID_HEX_LEN} lower-case hex digits, got {value!r}")


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    if "model" in inputs:  # a by-model spec's model is checked when its bundle is decoded
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
