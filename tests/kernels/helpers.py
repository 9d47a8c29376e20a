"""Tiny models written as Keras JSON by hand, and NumPy references for them.

Building configs by hand keeps TensorFlow out of the test process: only the
runtime's workers import it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kernels.models import config_to_array, weight_names


def _dtype_policy() -> dict[str, Any]:
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}


def dense_layer(name: str, units: int, activation: str, in_dim: int) -> dict[str, Any]:
    return {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {
            "name": name, "trainable": True, "dtype": _dtype_policy(), "units": units, "activation": activation,
            "use_bias": True,
            "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform",
                                   "config": {"seed": None}, "registered_name": None},
            "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                                 "registered_name": None},
            "kernel_regularizer": None, "bias_regularizer": None, "kernel_constraint": None, "bias_constraint": None,
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, in_dim]},
    }


def sequential_config(in_dim: int, layers: list[tuple[int, str]], extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Keras 3 Sequential config: InputLayer then Dense layers (units, activation)."""
    body: list[dict[str, Any]] = [{
        "module": "keras.layers", "class_name": "InputLayer",
        "config": {"batch_shape": [None, in_dim], "dtype": "float32", "sparse": False, "name": "input_layer"},
        "registered_name": None,
    }]
    dim = in_dim
    for i, (units, act) in enumerate(layers):
        body.append(dense_layer(f"dense_{i}", units, act, dim))
        dim = units
    body.extend(extra or [])
    return {
        "module": "keras", "class_name": "Sequential",
        "config": {"name": "sequential", "trainable": True, "dtype": _dtype_policy(), "layers": body},
        "registered_name": None,
        "build_config": {"input_shape": [None, in_dim]},
    }


def dense_model(in_dim: int, layers: list[tuple[int, str]], seed: int = 0) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Job inputs (``model`` + ``weight_NNN``) for a Dense stack, and its weights."""
    rng = np.random.default_rng(seed)
    weights: list[np.ndarray] = []
    dim = in_dim
    for units, _ in layers:
        weights.append((rng.standard_normal((dim, units)) / np.sqrt(dim)).astype(np.float32))
        weights.append((0.1 * rng.standard_normal(units)).astype(np.float32))
        dim = units
    inputs = {"model": config_to_array(json.dumps(sequential_config(in_dim, layers)))}
    inputs.update(zip(weight_names(len(weights)), weights))
    return inputs, weights


def _act(name: str, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0)
    if name == "tanh":
        return np.tanh(z)
    if name == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "linear":
        return z
    raise ValueError(name)


def dense_forward(x: np.ndarray, layers: list[tuple[int, str]], weights: list[np.ndarray]) -> np.ndarray:
    h = x.astype(np.float64)
    for i, (_, act) in enumerate(layers):
        h = _act(act, h @ weights[2 * i].astype(np.float64) + weights[2 * i + 1].astype(np.float64))
    return h
