"""Shared pieces of the model-carrying kernels (keras_infer, keras_train, stream_infer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.errors import DtypeMismatch, MalformedModelConfig, ShapeMismatch
from kernels.jobspec import BlobRef, JobSpec
from kernels.kernel import require_dtype, require_inputs
from kernels.models import MAX_WEIGHTS, build_model, check_model_config, model_inputs, weight_names

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


def _dtype_name(value: Any) -> str | None:
    """A layer's dtype as Keras writes it: a name, or (Keras 3) a DTypePolicy object holding one."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("config"), dict):
        name = value["config"].get("name")
        return name if isinstance(name, str) else None
    return None


def _shape(value: Any) -> tuple[int | None, ...] | None:
    """A declared batch shape without its batch dimension (None where it is not a list of sizes)."""
    if not isinstance(value, list) or not value:
        return None
    dims = value[1:]
    if not all(d is None or (type(d) is int and d >= 0) for d in dims):
        return None
    return tuple(dims)


def _input_layer(layers: list[Any], cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The layer that takes the model's input: the first one of a Sequential, the named one of a Functional."""
    if cfg.get("class_name") == "Sequential":
        return layers[0] if isinstance(layers[0], dict) else None
    names = cfg["config"].get("input_layers")
    if isinstance(names, list) and names and isinstance(names[0], list):
        names = names[0] if len(names) == 1 else None  # several inputs: not a streaming model
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        return None
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        lc = layer.get("config")
        if isinstance(lc, dict) and (lc.get("name") == names[0] or layer.get("name") == names[0]):
            return layer
    return None


def input_signature(config: Mapping[str, Any]) -> tuple[str | None, tuple[int | None, ...] | None]:
    """(dtype, per-item shape) of a checked model config's single input, read from the JSON (no Keras).

    Keras 3 writes ``InputLayer.config.batch_shape``, Keras 2
    ``batch_input_shape`` (on the InputLayer or the first layer), and a
    built Sequential ``build_config.input_shape``; either part is None when
    the config does not say.
    """
    cfg = dict(config)
    layers = cfg["config"]["layers"]
    first = _input_layer(layers, cfg)
    lc = first.get("config") if isinstance(first, dict) else None
    dtype = shape = None
    if isinstance(lc, dict) and (first.get("class_name") == "InputLayer"  # type: ignore[union-attr]
                                 or "batch_shape" in lc or "batch_input_shape" in lc):
        # Only an input declaration fixes the input dtype; a first Dense's dtype policy just casts to it.
        shape = _shape(lc.get("batch_shape", lc.get("batch_input_shape")))
        dtype = _dtype_name(lc.get("dtype"))
    if shape is None and isinstance(cfg.get("build_config"), dict):
        shape = _shape(cfg["build_config"].get("input_shape"))
    return dtype, shape


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
