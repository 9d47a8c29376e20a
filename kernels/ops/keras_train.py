"""``keras_train`` v1: seeded training for N steps; returns weights and loss history.

Inputs: ``model``, initial ``weight_NNN``, ``x``, ``y``. Batches are taken in
order, cycling through the rows (step s uses rows ``(s*b .. s*b+b-1) mod n``),
so the only randomness is what the model itself draws (dropout), and that is
seeded by ``seed``. With op determinism on, a CPU re-run reproduces a CPU run
bit for bit; a GPU run drifts a little per step, so verification compares the
loss history and every weight tensor with a relative tolerance (1e-3 for
float32) after re-running on the CPU.

``replicas`` > 1 trains data-parallel under ``tf.distribute.MirroredStrategy``
over that many devices (GPUs; logical CPUs in tests): each step's batch is
split evenly across the replicas and their gradients are summed, which is
the one-device step up to rounding. That is what keeps such a job
verifiable by anyone: the verifier re-runs it on one CPU device and
compares at the same tolerance. Hence two refusals, both before any
TensorFlow work: a batch that does not split evenly (unequal shares weight
rows differently), and layers whose training step depends on how the batch
is split (``Dropout`` draws one mask per replica, ``BatchNormalization``
takes per-replica batch statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.errors import InvalidParams, ShapeMismatch
from kernels.jobspec import JobSpec
from kernels.kernel import Kernel, Param, Verdict, check_params, compare_outputs, require_dtype, seed_everything
from kernels.models import check_model_config, weight_names
from kernels.ops import _keras, _tf

NAME = "keras_train"
VERSION = 1
MAX_REPLICAS = 64
PARAMS: dict[str, Param] = {
    "steps": Param(int, lo=1, hi=100_000),
    "batch_size": Param(int, default=32, lo=1, hi=65536),
    "learning_rate": Param(float, default=0.01, lo=0.0, hi=10.0, lo_open=True),
    "optimizer": Param(str, default="sgd", choices=("sgd", "adam")),
    "loss": Param(str, default="mse", choices=(
        "mse", "mae", "binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy")),
    "seed": Param(int, default=0, lo=0, hi=2**31 - 1),
    "replicas": Param(int, default=1, lo=1, hi=MAX_REPLICAS),  # devices trained on at once (MirroredStrategy)
}
TRAIN_TOLERANCE = {"float16": 5e-2, "float32": 1e-3, "float64": 1e-8}
# Layers whose training step changes when the batch is split across replicas.
SPLIT_SENSITIVE_LAYERS = frozenset({"Dropout", "BatchNormalization"})


def validate(spec: JobSpec) -> None:
    p = check_params(spec, PARAMS)
    if p["batch_size"] % p["replicas"]:
        raise InvalidParams(f"param 'batch_size': {p['batch_size']} does not split evenly over {p['replicas']} "
                            f"replicas (unequal shares would make the step differ from a one-device step)")
    refs, _ = _keras.model_refs(spec, {"x", "y"})
    _keras.check_batch_input("x", refs["x"])
    require_dtype("y", refs["y"], ("float16", "float32", "float64", "int32", "int64"))
    if not refs["y"].shape or refs["y"].shape[0] != refs["x"].shape[0]:
        raise ShapeMismatch(f"'x' has {refs['x'].shape[0]} rows but 'y' has shape {tuple(refs['y'].shape)}")
    if refs["x"].shape[0] == 0:
        raise ShapeMismatch("input 'x' has no rows")


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    config = check_model_config(inputs["model"])
    replicas = check_params(spec, PARAMS)["replicas"]
    if replicas > 1:
        for i, layer in enumerate(config["config"]["layers"]):
            if layer["class_name"] in SPLIT_SENSITIVE_LAYERS:
                raise InvalidParams(
                    f"param 'replicas': {replicas} replicas cannot train a model with {layer['class_name']} "
                    f"(layer {i}): its step depends on how the batch is split, so no one-device re-run could "
                    f"verify it"
                )


def devices(spec: JobSpec) -> int:
    return int(check_params(spec, PARAMS)["replicas"])


def run(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    p = check_params(spec, PARAMS)
    return _train(p, inputs, p["replicas"])


def _train(p: Mapping[str, Any], inputs: Mapping[str, np.ndarray], replicas: int) -> dict[str, np.ndarray]:
    import keras

    seed_everything(p["seed"])
    strategy = None
    if replicas > 1:
        strategy = _tf.tf().distribute.MirroredStrategy(devices=_tf.replica_devices(replicas))
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model, want = _keras.load(inputs)
        opt = keras.optimizers.SGD(p["learning_rate"]) if p["optimizer"] == "sgd" else keras.optimizers.Adam(p["learning_rate"])
        model.compile(optimizer=opt, loss=p["loss"], jit_compile=False)
    x, y = inputs["x"], inputs["y"]
    _keras.check_item_shape(want, tuple(x.shape[1:]), "input 'x' rows")
    if strategy is None:
        losses = _train_steps(model, x, y, p["steps"], p["batch_size"])
    else:
        losses = _train_steps_mirrored(model, x, y, p["steps"], p["batch_size"])
    out = {name: np.ascontiguousarray(w) for name, w in zip(weight_names(len(model.weights)), model.get_weights())}
    out["loss"] = losses
    return out


def _train_steps(model: Any, x: np.ndarray, y: np.ndarray, steps: int, b: int) -> np.ndarray:
    n = x.shape[0]
    losses = np.empty(steps, dtype=np.float32)
    for step in range(steps):
        rows = (step * b + np.arange(b)) % n
        losses[step] = float(model.train_on_batch(x[rows], y[rows]))
    return losses


def _train_steps_mirrored(model: Any, x: np.ndarray, y: np.ndarray, steps: int, b: int) -> np.ndarray:
    """The same batches as :func:`_train_steps`, split across the strategy's replicas by Keras itself.

    ``train_on_batch`` would hand every replica the whole batch (no data
    parallelism at all); ``fit`` on a dataset distributes each batch. The
    rows cycle in order (``repeat().batch``), which is exactly the
    ``(s*b + j) mod n`` rule. One epoch per step, because Keras resets its
    loss metric each epoch: the history then holds each step's own loss,
    not a running mean.
    """
    tf = _tf.tf()
    batches = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(b, drop_remainder=True)
    history = model.fit(batches, epochs=steps, steps_per_epoch=1, shuffle=False, verbose=0)
    return np.asarray(history.history["loss"], dtype=np.float32)


def verify(spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray]) -> Verdict:
    """Re-run on one CPU device, whatever ``replicas`` the job ran with (a verifier need not own several)."""
    p = check_params(spec, PARAMS)
    with _tf.cpu_device():
        ref = _train(p, inputs, replicas=1)
    tol = TRAIN_TOLERANCE.get(ref["loss"].dtype.name, 1e-3)
    return compare_outputs(claimed, ref, tol)


KERNEL = Kernel(NAME, VERSION, validate, validate_inputs, run, verify, PARAMS, __doc__ or "", devices=devices)
