"""Shared pieces of the model-carrying kernels (keras_infer, keras_train, stream_infer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.errors import DtypeMismatch, MalformedModelConfig, ShapeMismatch
from kernels.kernel import require_dtype, require_inputs
from kernels.models import MAX_WEIGHTS, build_model, check_model_config, model_inputs, weight_names
from kernels.spec import BlobRef, JobSpec

FLOAT_DTYPES = ("float16", "float32", "float64")
# Relative tolerances for re-executed forward passes, by output dtype.
INFER_TOLERANCE = {"float16": 2e-2, "float32": 1e-4, "float64": 1e-9}


def model_refs(spec: JobSpec, data: set[str], optional: set[str] = frozenset()) -> tuple[dict[str, BlobRef], list[str]]:  # type: ignore[assignment]
    refs = spec.input_dict()
    weights = model_inputs(refs)
    require_inputs(spec, {"model", *weights, *data}, optional)
    if len(weights) > MAX_WEIGHTS:
        raise ShapeMismatch(f"{len(weights)} weight tensors exceed {MAX_WEIGHTS}")
    return refs, weights


def check_batch_input(name: str, ref: BlobRef) -> None:
    require_dtype(name, ref, FLOAT_DTYPES)
    if len(ref.shape) < 2:
        raise ShapeMismatch(f"input {name!r}: expected a batch (at least 2 dimensions), got shape {tuple(ref.shape)}")


def check_config_input(inputs: Mapping[str, np.ndarray]) -> None:
    check_model_config(inputs["model"])


def load(inputs: Mapping[str, np.ndarray]) -> Any:
    count = sum(1 for n in inputs if n.startswith("weight_"))
    model = build_model(inputs["model"], [inputs[n] for n in weight_names(count)])
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise MalformedModelConfig(
            f"only single-input, single-output models are supported (got {len(model.inputs)} in, {len(model.outputs)} out)"
        )
    want = tuple(model.inputs[0].shape[1:])
    return model, want


def check_item_shape(want: tuple[Any, ...], got: tuple[int, ...], what: str) -> None:
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        raise ShapeMismatch(f"{what}: shape {got} does not fit the model's input shape {want}")


def forward_fn(model: Any) -> Any:
    """A traced forward pass: one graph per input shape, reused across calls."""
    import tensorflow as tf

    return tf.function(lambda t: model(t, training=False), reduce_retracing=True, jit_compile=False)


def predict(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    import tensorflow as tf

    fn = forward_fn(model)
    outs = []
    for start in range(0, x.shape[0], batch_size):
        outs.append(np.asarray(fn(tf.convert_to_tensor(x[start:start + batch_size]))))
    if not outs:
        raise ShapeMismatch("input 'x' has no rows")
    return np.concatenate(outs, axis=0)


def require_float(name: str, arr: np.ndarray) -> None:
    if arr.dtype.name not in FLOAT_DTYPES:
        raise DtypeMismatch(f"{name}: dtype {arr.dtype.name}, expected one of {FLOAT_DTYPES}")
