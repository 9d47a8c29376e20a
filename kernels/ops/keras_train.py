"""``keras_train`` v1: seeded training for N steps; returns weights and loss history.

Inputs: ``model``, initial ``weight_NNN``, ``x``, ``y``. Batches are taken in
order, cycling through the rows (step s uses rows ``(s*b .. s*b+b-1) mod n``),
so the only randomness is what the model itself draws (dropout), and that is
seeded by ``seed``. With op determinism on, a CPU re-run reproduces a CPU run
bit for bit; a GPU run drifts a little per step, so verification compares the
loss history and every weight tensor with a relative tolerance (1e-3 for
float32) after re-running on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kernels.errors import ShapeMismatch
from kernels.kernel import Kernel, Param, Verdict, check_params, compare_outputs, require_dtype, seed_everything
from kernels.models import weight_names
from kernels.ops import _keras
from kernels.spec import JobSpec

NAME = "keras_train"
VERSION = 1
PARAMS: dict[str, Param] = {
    "steps": Param(int, lo=1, hi=100_000),
    "batch_size": Param(int, default=32, lo=1, hi=65536),
    "learning_rate": Param(float, default=0.01, lo=0.0, hi=10.0, lo_open=True),
    "optimizer": Param(str, default="sgd", choices=("sgd", "adam")),
    "loss": Param(str, default="mse", choices=(
        "mse", "mae", "binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy")),
    "seed": Param(int, default=0, lo=0, hi=2**31 - 1),
}
TRAIN_TOLERANCE = {"float16": 5e-2, "float32": 1e-3, "float64": 1e-8}


def validate(spec: JobSpec) -> None:
    check_params(spec, PARAMS)
    refs, _ = _keras.model_refs(spec, {"x", "y"})
    _keras.check_batch_input("x", refs["x"])
    require_dtype("y", refs["y"], ("float16", "float32", "float64", "int32", "int64"))
    if not refs["y"].shape or refs["y"].shape[0] != refs["x"].shape[0]:
        raise ShapeMismatch(f"'x' has {refs['x'].shape[0]} rows but 'y' has shape {tuple(refs['y'].shape)}")
    if refs["x"].shape[0] == 0:
        raise ShapeMismatch("input 'x' has no rows")


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    _keras.check_config_input(inputs)


def run(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import keras

    p = check_params(spec, PARAMS)
    seed_everything(p["seed"])
    model, want = _keras.load(inputs)
    x, y = inputs["x"], inputs["y"]
    _keras.check_item_shape(want, tuple(x.shape[1:]), "input 'x' rows")
    opt = keras.optimizers.SGD(p["learning_rate"]) if p["optimizer"] == "sgd" else keras.optimizers.Adam(p["learning_rate"])
    model.compile(optimizer=opt, loss=p["loss"], jit_compile=False)
    n, b = x.shape[0], p["batch_size"]
    losses = np.empty(p["steps"], dtype=np.float32)
    for step in range(p["steps"]):
        rows = (step * b + np.arange(b)) % n
        losses[step] = float(model.train_on_batch(x[rows], y[rows]))
    out = {name: np.ascontiguousarray(w) for name, w in zip(weight_names(len(model.weights)), model.get_weights())}
    out["loss"] = losses
    return out


def verify(spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray]) -> Verdict:
    from kernels.ops._tf import cpu_device

    with cpu_device():
        ref = run(spec, inputs)
    tol = TRAIN_TOLERANCE.get(ref["loss"].dtype.name, 1e-3)
    return compare_outputs(claimed, ref, tol)


KERNEL = Kernel(NAME, VERSION, validate, validate_inputs, run, verify, PARAMS, __doc__ or "")
