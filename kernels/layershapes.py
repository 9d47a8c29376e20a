"""Weight and output shapes of allowlisted Keras layers, computed from their JSON config alone.

A model file's weights are checked against its config before Keras (or the
network) ever sees them, and a model's output signature is published on the
ledger; both need what Keras' ``build`` and ``compute_output_shape`` would
say, without importing Keras. Only the layers on
:data:`kernels.models.ALLOWED_LAYERS` are covered, and only the options that
change a shape are read. Shapes include the batch dimension (``None`` where
any size fits); weight shapes are in the order ``layer.weights`` lists them
(trainable first, then non-trainable, in creation order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kernels.errors import MalformedModelConfig

__all__ = ["Shape", "output_shape", "weight_shapes"]

Shape = tuple[int | None, ...]


def _ints(value: Any, count: int, what: str) -> tuple[int, ...]:
    items = [value] * count if type(value) is int else value
    if not isinstance(items, (list, tuple)) or len(items) != count or not all(type(v) is int and v >= 0 for v in items):
        raise MalformedModelConfig(f"{what}: expected {count} non-negative integers, got {value!r}")
    return tuple(items)


def _known(dim: int | None, what: str) -> int:
    if dim is None:
        raise MalformedModelConfig(f"{what}: the input dimension that sizes this layer's weights is not fixed")
    return dim


def _channels_axis(cfg: Mapping[str, Any]) -> int:
    return 1 if cfg.get("data_format") == "channels_first" else -1


def _axes(cfg: Mapping[str, Any], rank: int, default: int, what: str) -> list[int]:
    axis = cfg.get("axis", default)
    items = [axis] if type(axis) is int else axis
    if not isinstance(items, list) or not items or not all(type(a) is int and -rank <= a < rank for a in items):
        raise MalformedModelConfig(f"{what}: bad axis {axis!r} for rank {rank}")
    return [a % rank for a in items]


def weight_shapes(class_name: str, cfg: Mapping[str, Any], in_shape: Shape, what: str) -> list[tuple[int, ...]]:
    """The shapes of a layer's weights given its input shape (with the batch dimension)."""
    if class_name == "Dense":
        units = _ints(cfg.get("units"), 1, f"{what}.units")[0]
        kernel = (_known(in_shape[-1], what), units)
        return [kernel, (units,)] if cfg.get("use_bias", True) else [kernel]
    if class_name in ("Conv1D", "Conv2D", "DepthwiseConv2D"):
        rank = 1 if class_name == "Conv1D" else 2
        ksize = _ints(cfg.get("kernel_size"), rank, f"{what}.kernel_size")
        channels = _known(in_shape[_channels_axis(cfg)], what)
        if class_name == "DepthwiseConv2D":
            mult = _ints(cfg.get("depth_multiplier", 1), 1, f"{what}.depth_multiplier")[0]
            shapes = [(*ksize, channels, mult)]
            out = channels * mult
        else:
            groups = _ints(cfg.get("groups", 1), 1, f"{what}.groups")[0]
            out = _ints(cfg.get("filters"), 1, f"{what}.filters")[0]
            if groups < 1 or channels % groups:
                raise MalformedModelConfig(f"{what}: {channels} input channels do not split into {groups} groups")
            shapes = [(*ksize, channels // groups, out)]
        return shapes + [(out,)] if cfg.get("use_bias", True) else shapes
    if class_name in ("BatchNormalization", "LayerNormalization"):
        default = -1
        axes = _axes(cfg, len(in_shape), default, what)
        param = tuple(_known(in_shape[a], what) for a in axes)
        shapes = []
        if cfg.get("scale", True):
            shapes.append(param)
        if cfg.get("center", True):
            shapes.append(param)
        if class_name == "BatchNormalization":
            shapes += [param, param]  # moving_mean, moving_variance
        return shapes
    if class_name == "Embedding":
        return [(_ints(cfg.get("input_dim"), 1, f"{what}.input_dim")[0],
                 _ints(cfg.get("output_dim"), 1, f"{what}.output_dim")[0])]
    return []


def _window(size: int | None, kernel: int, stride: int, dilation: int, padding: Any, what: str) -> int | None:
    if size is None:
        return None
    if padding == "same":
        return math.ceil(size / stride)
    if padding == "valid":
        span = dilation * (kernel - 1) + 1
        return max(0, (size - span) // stride + 1)
    raise MalformedModelConfig(f"{what}: padding {padding!r} is not 'valid' or 'same'")


def _spatial(cfg: Mapping[str, Any], in_shape: Shape, rank: int, channels: int | None, pooling: bool, what: str) -> Shape:
    if len(in_shape) != rank + 2:
        raise MalformedModelConfig(f"{what}: expected a rank-{rank + 2} input, got {in_shape}")
    ksize = _ints(cfg.get("pool_size" if pooling else "kernel_size"), rank, f"{what}.kernel_size")
    strides_value = cfg.get("strides") if not pooling or cfg.get("strides") is not None else ksize
    strides = _ints(strides_value if strides_value is not None else 1, rank, f"{what}.strides")
    dilation = _ints(cfg.get("dilation_rate", 1), rank, f"{what}.dilation_rate")
    first = cfg.get("data_format") == "channels_first"
    dims = in_shape[2:] if first else in_shape[1:-1]
    out = tuple(_window(d, k, s, r, cfg.get("padding", "valid"), what) for d, k, s, r in zip(dims, ksize, strides, dilation))
    return (in_shape[0], channels, *out) if first else (in_shape[0], *out, channels)


def _reshape(target: Any, in_shape: Shape, what: str) -> Shape:
    if not isinstance(target, list) or not all(type(d) is int and d >= -1 for d in target) or target.count(-1) > 1:
        raise MalformedModelConfig(f"{what}: bad target_shape {target!r}")
    if -1 in target:
        size = math.prod(d for d in in_shape[1:] if d is not None) if None not in in_shape[1:] else None
        rest = math.prod(d for d in target if d != -1)
        fill = size // rest if size is not None and rest else None
        return (in_shape[0], *(fill if d == -1 else d for d in target))
    return (in_shape[0], *target)


def output_shape(class_name: str, cfg: Mapping[str, Any], in_shape: Shape | Sequence[Shape], what: str) -> Shape:
    """The layer's output shape for an input of ``in_shape`` (a list of shapes for merge layers)."""
    if class_name in ("Add", "Subtract", "Multiply", "Average", "Concatenate"):
        shapes = list(in_shape)
        if not shapes or not all(isinstance(s, tuple) for s in shapes):
            raise MalformedModelConfig(f"{what}: a merge layer needs a list of input shapes, got {in_shape!r}")
        first: Shape = shapes[0]  # type: ignore[assignment]
        if class_name != "Concatenate":
            return first
        axis = _axes(cfg, len(first), -1, what)[0]
        dims = [s[axis] for s in shapes]  # type: ignore[index]
        total = None if any(d is None for d in dims) else sum(d for d in dims if d is not None)
        return (*first[:axis], total, *first[axis + 1:])
    shape: Shape = in_shape  # type: ignore[assignment]
    if not isinstance(shape, tuple) or not shape:
        raise MalformedModelConfig(f"{what}: bad input shape {in_shape!r}")
    if class_name in ("Activation", "ReLU", "LeakyReLU", "Softmax", "Dropout", "BatchNormalization",
                      "LayerNormalization", "Rescaling", "InputLayer"):
        return shape
    if class_name == "Dense":
        return (*shape[:-1], _ints(cfg.get("units"), 1, f"{what}.units")[0])
    if class_name == "Embedding":
        return (*shape, _ints(cfg.get("output_dim"), 1, f"{what}.output_dim")[0])
    if class_name == "Flatten":
        rest = shape[1:]
        return (shape[0], None if None in rest else math.prod(d for d in rest if d is not None))
    if class_name == "Reshape":
        return _reshape(cfg.get("target_shape"), shape, what)
    if class_name in ("Conv1D", "Conv2D"):
        rank = 1 if class_name == "Conv1D" else 2
        return _spatial(cfg, shape, rank, _ints(cfg.get("filters"), 1, f"{what}.filters")[0], False, what)
    if class_name == "DepthwiseConv2D":
        channels = shape[_channels_axis(cfg)]
        mult = _ints(cfg.get("depth_multiplier", 1), 1, f"{what}.depth_multiplier")[0]
        return _spatial(cfg, shape, 2, None if channels is None else channels * mult, False, what)
    if class_name in ("MaxPooling1D", "AveragePooling1D", "MaxPooling2D", "AveragePooling2D"):
        rank = 1 if class_name.endswith("1D") else 2
        return _spatial(cfg, shape, rank, shape[_channels_axis(cfg)], True, what)
    if class_name.startswith("Global"):
        channels = shape[_channels_axis(cfg)]
        if cfg.get("keepdims"):
            first_axis = cfg.get("data_format") == "channels_first"
            ones = (1,) * (len(shape) - 2)
            return (shape[0], channels, *ones) if first_axis else (shape[0], *ones, channels)
        return (shape[0], channels)
    if class_name == "ZeroPadding2D":
        pad = cfg.get("padding", 1)
        if type(pad) is int:
            pads = ((pad, pad), (pad, pad))
        elif isinstance(pad, list) and len(pad) == 2:
            pads = tuple((p, p) if type(p) is int else tuple(_ints(p, 2, f"{what}.padding")) for p in pad)  # type: ignore[assignment]
        else:
            raise MalformedModelConfig(f"{what}: bad padding {pad!r}")
        first_axis = cfg.get("data_format") == "channels_first"
        spatial = shape[2:] if first_axis else shape[1:-1]
        grown = tuple(None if d is None else d + a + b for d, (a, b) in zip(spatial, pads))
        return (shape[0], shape[1], *grown) if first_axis else (shape[0], *grown, shape[-1])
    raise MalformedModelConfig(f"{what}: no output shape rule for layer class {class_name!r}")
