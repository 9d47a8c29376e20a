"""What a served model takes and gives: its tensors' names, dtypes and per-item shapes.

The ledger's registry records one input and one output per model, each a
dtype and a per-item shape with ``None`` for a dimension of any size
(``ledger.transactions.TensorSignature``, served as ``ModelOut.input`` and
``.output``). The gateway names them ``x`` and ``y``, the kernels' names, so
``signature_from_registry`` is the one place that turns a registry entry
into what the codecs check a request against. Shapes never include the batch
dimension: the codecs add it (``-1`` in v2 metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pgpu.gateway.errors import InvalidRequest

__all__ = [
    "INPUT_NAME",
    "MAX_ITEM_NDIM",
    "OUTPUT_NAME",
    "SUPPORTED_DTYPES",
    "ModelSignature",
    "TensorSpec",
    "shape_text",
    "signature_from_registry",
]

INPUT_NAME = "x"
OUTPUT_NAME = "y"
MAX_ITEM_NDIM = 8  # the kernels' tensor limit (kernels.tensors.MAX_NDIM), per item

# numpy dtype names the gateway can carry: the kernels' tensor dtypes plus uint64 (both protocols have it).
SUPPORTED_DTYPES: tuple[str, ...] = (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64",
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a model, for ONE item: ``shape`` has no batch dimension, ``None`` = any size."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(SUPPORTED_DTYPES)}")
        if len(self.shape) > MAX_ITEM_NDIM:
            raise ValueError(f"tensor {self.name!r}: {len(self.shape)} dimensions, limit is {MAX_ITEM_NDIM}")
        for dim in self.shape:
            if dim is not None and (type(dim) is not int or dim < 0):
                raise ValueError(f"tensor {self.name!r}: bad dimension {dim!r} in shape {self.shape}")

    @property
    def np_dtype(self) -> np.dtype[np.generic]:
        return np.dtype(self.dtype)

    def matches(self, item_shape: Sequence[int]) -> bool:
        """Whether a concrete per-item shape fits this spec (``None`` dimensions take any size)."""
        return len(item_shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, item_shape, strict=True))

    def check_item_shape(self, item_shape: Sequence[int], what: str) -> None:
        """Raise ``InvalidRequest`` naming ``what`` unless ``item_shape`` fits."""
        if not self.matches(item_shape):
            raise InvalidRequest(
                f"{what}: per-item shape {list(item_shape)} does not match the model's {self.name!r} shape "
                f"{shape_text(self.shape)} (batch dimension first, then these; None = any size)")


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """A model as the gateway serves it: ``name@version`` and its input and output tensors."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            if not specs:
                raise ValueError(f"model {self.name}@{self.version}: no {kind}s")
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"model {self.name}@{self.version}: duplicate {kind} names {names}")

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("None" if dim is None else str(dim) for dim in shape) + "]"


def signature_from_registry(
    name: str,
    version: str,
    input_dtype: str,
    input_shape: Sequence[int | None],
    output_dtype: str,
    output_shape: Sequence[int | None],
) -> ModelSignature:
    """The signature of a registered model: its one input named ``x``, its one output named ``y``.

    Raises ``ValueError`` for a dtype the gateway cannot carry (the registry
    accepts any short string; the bundle check accepts only kernel dtypes).
    """
    return ModelSignature(
        name=name,
        version=version,
        inputs=(TensorSpec(INPUT_NAME, input_dtype, tuple(input_shape)),),
        outputs=(TensorSpec(OUTPUT_NAME, output_dtype, tuple(output_shape)),),
    )
