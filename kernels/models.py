"""Models as data: a Keras JSON config checked against an allowlist, plus weights.

A model never arrives as a pickle, a SavedModel or Python code. The config is
walked in the caller's process (plain ``json``, no TensorFlow) and every
object reference in it -- each dict with a ``class_name`` -- must name an
allowlisted layer, initializer, regularizer, constraint or dtype policy from a
``keras`` module; every activation must be a named built-in. That rules out
``Lambda`` layers, custom objects and serialized functions before Keras ever
sees the config; Keras' own ``safe_mode`` is a second fence in the worker.

Inputs of a model-carrying job: ``model`` (uint8 tensor of UTF-8 JSON) and
``weight_000``, ``weight_001``, ... in ``model.get_weights()`` order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.errors import DisallowedLayer, DtypeMismatch, InputMismatch, MalformedModelConfig, ModelWeightsMismatch, ShapeMismatch
from kernels.jobspec import BlobRef


__all__ = [
    "ALLOWED_ACTIVATIONS",
    "ALLOWED_LAYERS",
    "MAX_CONFIG_BYTES",
    "build_model",
    "check_model_config",
    "config_to_array",
    "model_inputs",
    "parse_config_json",
    "weight_names",
]

MAX_CONFIG_BYTES = 256 * 1024
MAX_LAYERS = 256
MAX_WEIGHTS = 512
WEIGHT_RE = re.compile(r"^weight_(\d{3})$")

MODEL_CLASSES = frozenset({"Sequential", "Functional"})
ALLOWED_LAYERS = frozenset({
    "InputLayer", "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "MaxPooling1D", "MaxPooling2D",
    "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Dropout", "BatchNormalization",
    "LayerNormalization", "Activation", "ReLU", "LeakyReLU", "Softmax", "Embedding", "Add", "Subtract",
    "Multiply", "Average", "Concatenate", "ZeroPadding2D", "Rescaling",
})
ALLOWED_AUX = frozenset({
    "DTypePolicy", "FloatDTypePolicy", "__keras_tensor__",
    # initializers
    "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform", "LecunNormal", "Zeros", "Ones",
    "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal", "Orthogonal", "VarianceScaling",
    # regularizers and constraints
    "L1", "L2", "L1L2", "MaxNorm", "NonNeg", "UnitNorm", "MinMaxNorm",
})
ALLOWED_MODULES = frozenset({
    "keras", "keras.layers", "keras.initializers", "keras.regularizers", "keras.constraints",
    "keras.models", "keras.src.models.functional", "keras.src.models.sequential",
})
ALLOWED_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "log_softmax", "tanh", "gelu", "elu",
    "selu", "softplus", "softsign", "swish", "silu", "exponential", "leaky_relu", "mish",
})
# Keys whose presence means code or external state, whatever the class says.
FORBIDDEN_KEYS = frozenset({"function", "function_type", "output_shape_type", "module_objects", "shared_object_id"})


def weight_names(count: int) -> list[str]:
    return [f"weight_{i:03d}" for i in range(count)]


def model_inputs(refs: Mapping[str, BlobRef]) -> list[str]:
    """Validate the declared ``model``/``weight_NNN`` inputs; return weight names in order."""
    if "model" not in refs:
        raise InputMismatch("a model-carrying job needs a 'model' input (uint8 UTF-8 Keras JSON)")
    ref = refs["model"]
    if ref.dtype != "uint8":
        raise DtypeMismatch(f"input 'model': dtype {ref.dtype}, expected uint8 (UTF-8 JSON)")
    if len(ref.shape) != 1:
        raise ShapeMismatch(f"input 'model': expected a 1-D byte tensor, got shape {tuple(ref.shape)}")
    if ref.shape[0] > MAX_CONFIG_BYTES:
        raise MalformedModelConfig(f"model config of {ref.shape[0]} bytes exceeds {MAX_CONFIG_BYTES}")
    indices = sorted(int(m.group(1)) for name in refs if (m := WEIGHT_RE.match(name)))
    if indices != list(range(len(indices))):
        raise InputMismatch(f"weight inputs must be weight_000..weight_{len(indices) - 1:03d} with no gaps")
    if len(indices) > MAX_WEIGHTS:
        raise InputMismatch(f"{len(indices)} weight tensors exceed the limit of {MAX_WEIGHTS}")
    for name in weight_names(len(indices)):
        if refs[name].dtype not in ("float16", "float32", "float64", "int64", "int32"):
            raise DtypeMismatch(f"input {name!r}: dtype {refs[name].dtype} is not a weight dtype")
    return weight_names(len(indices))


def config_to_array(config_json: str) -> np.ndarray:
    return np.frombuffer(config_json.encode("utf-8"), dtype=np.uint8).copy()


def _reject_constant(name: str) -> Any:
    raise MalformedModelConfig(f"model config contains {name}, which is not JSON")


MAX_NESTING = 64


def _check_nesting(text: str) -> None:
    """Refuse JSON nested deeper than any Keras config needs, before the recursive parser sees it.

    ``json.loads`` recurses in C once per level; with a raised recursion limit
    (some libraries raise it process-wide) a hostile document of a few hundred
    kilobytes of brackets overflows the stack and kills the provider.
    """
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise MalformedModelConfig(f"model config is nested deeper than {MAX_NESTING} levels")
        elif ch in "]}":
            depth -= 1


def parse_config_json(data: bytes, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse untrusted JSON text: bounded in size and nesting, no NaN or Infinity; nothing else checked."""
    if len(data) > max_bytes:
        raise MalformedModelConfig(f"model config of {len(data)} bytes exceeds {max_bytes}")
    try:
        text = data.decode("utf-8")
        _check_nesting(text)
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedModelConfig(f"model config is not valid UTF-8 JSON: {exc}") from exc


def check_model_config(data: bytes | np.ndarray | str) -> dict[str, Any]:
    """Parse and allowlist-check a Keras JSON model config; return the parsed dict."""
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    if isinstance(data, str):
        data = data.encode("utf-8")
    cfg = parse_config_json(data)
    if not isinstance(cfg, dict) or cfg.get("class_name") not in MODEL_CLASSES:
        got = cfg.get("class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise MalformedModelConfig(f"model config must be a Sequential or Functional model, got {got!r}")
    inner = cfg.get("config")
    if not isinstance(inner, dict) or not isinstance(inner.get("layers"), list):
        raise MalformedModelConfig("model config has no 'config.layers' list")
    layers = inner["layers"]
    if not layers or len(layers) > MAX_LAYERS:
        raise MalformedModelConfig(f"model has {len(layers)} layers; need 1..{MAX_LAYERS}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
            raise MalformedModelConfig(f"layer {i} is not a {{class_name, config}} object")
        if layer["class_name"] not in ALLOWED_LAYERS:
            raise DisallowedLayer(f"layer {i} ({layer['class_name']}) is not on the layer allowlist")
    _walk(cfg, "model", depth=0)
    return cfg


def _walk(node: Any, path: str, depth: int) -> None:
    if depth > 32:
        raise MalformedModelConfig(f"{path}: nesting deeper than 32 levels")
    if isinstance(node, dict):
        for key in node:
            if key in FORBIDDEN_KEYS:
                raise DisallowedLayer(f"{path}: key {key!r} (code or shared state) is not allowed")
        if "class_name" in node:
            cls = node["class_name"]
            if not isinstance(cls, str):
                raise MalformedModelConfig(f"{path}: class_name is not a string")
            top = depth == 0 and cls in MODEL_CLASSES
            if not top and cls not in ALLOWED_LAYERS and cls not in ALLOWED_AUX:
                raise DisallowedLayer(f"{path}: object {cls!r} is not on the allowlist")
            module = node.get("module")
            if module is not None and module not in ALLOWED_MODULES:
                raise DisallowedLayer(f"{path}: module {module!r} of {cls} is not allowed")
            reg = node.get("registered_name")
            if reg is not None and reg != cls:
                raise DisallowedLayer(f"{path}: registered_name {reg!r} (a custom object) is not allowed")
            path = f"{path}/{cls}"
        if "activation" in node:
            act = node["activation"]
            if not (act is None or (isinstance(act, str) and act in ALLOWED_ACTIVATIONS)):
                raise DisallowedLayer(f"{path}: activation {act!r} is not on the activation allowlist")
        for key, value in node.items():
            _walk(value, f"{path}.{key}", depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", depth + 1)


def build_model(config: np.ndarray, weights: list[np.ndarray]) -> Any:
    """Instantiate a checked config and load its weights (imports Keras)."""
    check_model_config(config)
    import keras

    try:
        model = keras.models.model_from_json(config.tobytes().decode("utf-8"))
    except Exception as exc:  # Keras raises many types for bad configs; name it once here
        raise MalformedModelConfig(f"Keras refused the model config: {type(exc).__name__}: {exc}") from exc
    expected = [tuple(w.shape) for w in model.weights]
    got = [tuple(w.shape) for w in weights]
    if expected != got:
        raise ModelWeightsMismatch(f"model expects weight shapes {expected}, got {got}")
    model.set_weights([np.asarray(w) for w in weights])
    return model


def model_to_inputs(model: Any) -> dict[str, np.ndarray]:
    """Inputs for a model-carrying job from a Keras model (client-side helper)."""
    out = {"model": config_to_array(model.to_json())}
    for name, w in zip(weight_names(len(model.get_weights())), model.get_weights()):
        out[name] = np.ascontiguousarray(w)
    return out
