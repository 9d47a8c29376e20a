"""Model bundles: one canonical, content-addressed form of a Keras model, made without Keras.

A model developer hands us a file written by stock Keras; providers need
today's ``model`` + ``weight_NNN`` job inputs (:mod:`kernels.models`). In
between sits the bundle, whose SHA-256 is the model's id, so the same model
is the same id however its archive was zipped or timestamped.

Three file formats are read, all as data (this module never imports
TensorFlow or Keras and runs none of the file's code):

* Keras 3 ``.keras``: a zip of ``config.json``, ``metadata.json`` and
  ``model.weights.h5`` (read through :mod:`kernels.safezip` and h5py);
* legacy Keras H5: the ``model_config`` attribute and ``model_weights`` group;
* ``.npz`` of today's inputs: ``np.savez(path, **model_to_inputs(model))``.

Bundle layout (``encode_bundle``: the ledger codec's canonical MessagePack,
one array in field order)::

    [format=1, config, [weight tensor, ...], input signature, output signature]

``config`` is the model's JSON config with sorted keys, compact separators
and ASCII escapes, the training-only ``compile_config`` dropped and Keras'
``shared_object_id`` markers removed from the auxiliary objects (dtype
policies, initializers) they may appear on, and the model's ``module``
filled in where a legacy H5 file leaves it out; it passes
:func:`kernels.models.check_model_config`. Weight tensors are the
:mod:`kernels.tensors` ext type, in ``model.get_weights()`` order. A
signature is ``[dtype, per-item shape]`` with nil for a dimension of any
size. Nothing else (Keras version, save date, file names) is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, cast

import h5py
import numpy as np

from kernels.errors import (
    ArchiveTooLarge,
    DisallowedDtype,
    KernelError,
    MalformedModelConfig,
    ModelWeightsMismatch,
    TooManyTensors,
    TruncatedArchive,
    TruncatedTensor,
    UnknownModelFormat,
    UnsafeArchiveMember,
)
from kernels.layershapes import Shape, output_shape, weight_shapes
from kernels.models import (
    ALLOWED_AUX,
    MAX_CONFIG_BYTES,
    MAX_WEIGHTS,
    MODEL_CLASSES,
    check_model_config,
    config_to_array,
    parse_config_json,
    weight_names,
)
from kernels.safezip import ZipLimits, is_zip, member_names, read_zip_members
from kernels.tensors import DTYPES, MAX_NDIM, Tensor, canonical_array, check_dtype, check_shape
from ledger.codec import U16, DecodeError, EncodeError, Int, ListOf, Maybe, Record, Text, decode, encode, record

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_LIMITS",
    "BundleLimits",
    "ModelBundle",
    "TensorSignature",
    "bundle_to_inputs",
    "canonical_config",
    "decode_bundle",
    "encode_bundle",
    "load_model_file",
    "model_id",
    "parameter_count",
]

BUNDLE_FORMAT = 1
WEIGHT_DTYPES = ("float16", "float32", "float64", "int32", "int64")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MODEL_MODULES = {"Sequential": "keras", "Functional": "keras.src.models.functional"}  # as Keras 3 writes them
KERAS_MEMBERS = frozenset({"config.json", "metadata.json", "model.weights.h5"})
MAX_METADATA_BYTES = 64 * 1024
MAX_BUNDLE_BYTES = (1 << 30) + (1 << 20)
# Root entries of a .keras weights file besides the model's layers; the optimizer's slots are not part of the model.
KERAS_ROOT_EXTRAS = frozenset({"vars", "optimizer"})


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """Largest model we accept; one place, so tests can shrink them to build bombs cheaply."""

    file_bytes: int = 1 << 30  # the model file as given
    config_bytes: int = MAX_CONFIG_BYTES  # the JSON config
    weight_bytes: int = 1 << 30  # all weight tensors together
    tensors: int = MAX_WEIGHTS  # weight tensors (and HDF5 datasets read)

    def zip_limits(self, members: int) -> ZipLimits:
        whole = self.weight_bytes + self.config_bytes + MAX_METADATA_BYTES + (1 << 20)  # + 1 MiB of HDF5 structure
        return ZipLimits(members=members, member_bytes=whole, total_bytes=whole)


DEFAULT_LIMITS = BundleLimits()


@record
class TensorSignature(Record):
    """One model input or output: dtype and per-item shape (no batch dimension; None = any size)."""

    dtype: Annotated[str, Text(16, min_len=1)]
    shape: Annotated[tuple[int | None, ...], ListOf(Maybe(Int(0, 2**32 - 1)), MAX_NDIM)]


@record
class ModelBundle(Record):
    """A model as the network stores it; ``model_id`` is the SHA-256 of its encoding.

    Compare bundles by ``encode_bundle`` bytes, not ``==`` (the weights are arrays).
    """

    MAX_BYTES: ClassVar[int] = MAX_BUNDLE_BYTES

    format: U16
    config: Annotated[str, Text(MAX_CONFIG_BYTES, min_len=2)]
    weights: Annotated[tuple[np.ndarray, ...], ListOf(Tensor(), MAX_WEIGHTS)]
    input: TensorSignature
    output: TensorSignature


# --- the model's plan, read from its config --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """What one layer of the config expects of a weights file."""

    name: str
    class_name: str
    store_key: str  # its group under ``layers/`` in a .keras weights file
    weight_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class ModelPlan:
    layers: tuple[LayerPlan, ...]
    input: TensorSignature
    output: TensorSignature

    @property
    def weight_shapes(self) -> list[tuple[int, ...]]:
        return [shape for layer in self.layers for shape in layer.weight_shapes]


def _snake_case(name: str) -> str:
    """Keras' ``naming.to_snake_case``: how ``saving_lib`` names a layer's group (``Conv2D`` -> ``conv2d``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _shape_of(value: Any, what: str) -> Shape | tuple[Shape, ...]:
    """A JSON shape (list of sizes and nulls), or a list of them for a merge layer."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return tuple(cast(Shape, _shape_of(v, what)) for v in value)
    if isinstance(value, list) and len(value) <= MAX_NDIM + 1 and all(
            d is None or (type(d) is int and 0 <= d < 2**32) for d in value):
        return tuple(value)
    raise MalformedModelConfig(f"{what}: bad shape {value!r}")


def _inbound_shape(layer: Mapping[str, Any], what: str) -> Shape | tuple[Shape, ...] | None:
    """The input shape a Functional layer was called on, from its first inbound node's tensors."""
    nodes = layer.get("inbound_nodes")
    if not isinstance(nodes, list) or not nodes or not isinstance(nodes[0], dict):
        return None
    args = nodes[0].get("args")
    if not isinstance(args, list) or not args:
        return None
    first = args[0]

    def tensor_shape(t: Any) -> Shape | None:
        if isinstance(t, dict) and t.get("class_name") == "__keras_tensor__" and isinstance(t.get("config"), dict):
            shape = _shape_of(t["config"].get("shape"), what)
            return shape if shape and not isinstance(shape[0], tuple) else None
        return None

    if isinstance(first, list):
        shapes = [tensor_shape(t) for t in first]
        return None if any(s is None for s in shapes) else tuple(s for s in shapes if s is not None)
    return tensor_shape(first)


def _layer_input_shape(layer: Mapping[str, Any], fallback: Shape | None, what: str) -> Any:
    build = layer.get("build_config")
    if isinstance(build, dict) and "input_shape" in build:
        return _shape_of(build["input_shape"], what)
    inbound = _inbound_shape(layer, what)
    if inbound is not None:
        return inbound
    if fallback is None:
        raise MalformedModelConfig(f"{what}: the config does not say this layer's input shape")
    return fallback


def _compute_dtype(layer: Mapping[str, Any], what: str) -> str:
    cfg = layer.get("config")
    policy = cfg.get("dtype") if isinstance(cfg, dict) else None
    name = policy if isinstance(policy, str) else (
        policy["config"].get("name") if isinstance(policy, dict) and isinstance(policy.get("config"), dict) else None)
    if name is None:
        return "float32"  # Keras' floatx
    if not isinstance(name, str):
        raise MalformedModelConfig(f"{what}: bad dtype policy {policy!r}")
    name = name.removeprefix("mixed_")
    if name not in DTYPES:
        raise DisallowedDtype(f"{what}: compute dtype {name!r} is not allowed (allowed: {', '.join(DTYPES)})")
    return name


def _io_names(value: Any, what: str) -> list[str]:
    """Layer names from ``input_layers``/``output_layers``: ``[name, 0, 0]`` or a list of those."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        return [value[0]]
    if isinstance(value, list) and all(isinstance(v, list) and v and isinstance(v[0], str) for v in value):
        return [v[0] for v in value]
    raise MalformedModelConfig(f"model config has bad {what} {value!r}")


def plan_model(cfg: Mapping[str, Any]) -> ModelPlan:
    """Weight shapes per layer and the input/output signature of a checked config, from JSON alone."""
    inner = cfg["config"]
    layers: list[dict[str, Any]] = inner["layers"]
    sequential = cfg["class_name"] == "Sequential"
    outputs: list[str] = []
    if sequential:
        body = layers[1:] if layers[0].get("class_name") == "InputLayer" else layers
        in_layer = layers[0]
        first_cfg = in_layer.get("config", {})
        declared = first_cfg.get("batch_shape", first_cfg.get("batch_input_shape"))
        if declared is None and isinstance(cfg.get("build_config"), dict):
            declared = cfg["build_config"].get("input_shape")
        if declared is None:
            raise MalformedModelConfig("the config does not say the model's input shape")
        in_shape = _shape_of(declared, "model input")
        input_dtype = _compute_dtype(in_layer, "model input") if in_layer.get("class_name") == "InputLayer" else "float32"
    else:
        body = layers
        inputs = _io_names(inner.get("input_layers"), "input_layers")
        outputs = _io_names(inner.get("output_layers"), "output_layers")
        if len(inputs) != 1 or len(outputs) != 1:
            raise MalformedModelConfig(f"only single-input, single-output models are supported "
                                       f"(got {len(inputs)} in, {len(outputs)} out)")
        by_name = {layer.get("name", layer.get("config", {}).get("name")): layer for layer in layers}
        if inputs[0] not in by_name or outputs[0] not in by_name:
            raise MalformedModelConfig(f"input or output layer {inputs[0]!r}/{outputs[0]!r} is not in the config")
        in_layer = by_name[inputs[0]]
        in_cfg = in_layer.get("config", {})
        in_shape = _shape_of(in_cfg.get("batch_shape", in_cfg.get("batch_input_shape")), f"input layer {inputs[0]}")
        input_dtype = _compute_dtype(in_layer, "model input")
    if not in_shape or isinstance(in_shape[0], tuple):
        raise MalformedModelConfig(f"model input shape {in_shape!r} is not one tensor's shape")
    plans: list[LayerPlan] = []
    used: dict[str, int] = {}
    shape: Any = in_shape
    out_shape: Shape | None = None
    out_dtype = input_dtype
    for i, layer in enumerate(body):
        cls = layer["class_name"]
        lcfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        name = layer.get("name", lcfg.get("name"))  # type: ignore[union-attr]
        what = f"layer {name or i} ({cls})"
        base = _snake_case(cls)
        key = base if base not in used else f"{base}_{used[base] + 1}"
        used[base] = used.get(base, -1) + 1
        if cls == "InputLayer":
            layer_in = _shape_of(lcfg.get("batch_shape", lcfg.get("batch_input_shape")), what)  # type: ignore[union-attr]
        else:
            layer_in = _layer_input_shape(layer, shape if sequential else None, what)
        shapes = tuple(weight_shapes(cls, lcfg, layer_in, what)) if cls != "InputLayer" else ()  # type: ignore[arg-type]
        plans.append(LayerPlan(str(name), cls, key, shapes))
        if sequential or name == outputs[0]:
            shape = output_shape(cls, lcfg, layer_in, what)  # type: ignore[arg-type]
            out_shape, out_dtype = shape, _compute_dtype(layer, what)
    if out_shape is None:
        raise MalformedModelConfig("the config does not say the model's output shape")
    return ModelPlan(
        tuple(plans),
        TensorSignature(input_dtype, tuple(in_shape[1:])),
        TensorSignature(out_dtype, tuple(out_shape[1:])),
    )


# --- canonical config ------------------------------------------------------------------------------------


def _strip_sharing(node: Any) -> Any:
    """Drop Keras' ``shared_object_id`` from auxiliary objects (dtype policies, initializers).

    ``saving_lib`` marks objects it met twice so loading can share one
    instance; for these immutable helpers sharing changes nothing, and
    ``model.to_json()`` never writes the key. Anywhere else it stays, and
    :func:`check_model_config` refuses it.
    """
    if isinstance(node, dict):
        drop = node.get("class_name") in ALLOWED_AUX
        return {k: _strip_sharing(v) for k, v in node.items() if not (drop and k == "shared_object_id")}
    if isinstance(node, list):
        return [_strip_sharing(v) for v in node]
    return node


def canonical_config(data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> tuple[str, dict[str, Any]]:
    """The canonical JSON text of a model config, and the checked config itself."""
    parsed = parse_config_json(data, limits.config_bytes)
    if not isinstance(parsed, dict) or parsed.get("class_name") not in MODEL_CLASSES:
        got = parsed.get("class_name") if isinstance(parsed, dict) else type(parsed).__name__
        raise MalformedModelConfig(f"model config must be a Sequential or Functional model, got {got!r}")
    parsed.pop("compile_config", None)  # training setup (optimizer, loss): not part of the model we run
    # Legacy H5 files omit the model's module; Keras 3's model_from_json cannot find the class without it.
    parsed.setdefault("module", MODEL_MODULES[parsed["class_name"]])
    text = json.dumps(_strip_sharing(parsed), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text, check_model_config(text)


# --- weights files ---------------------------------------------------------------------------------------


def _child(group: h5py.Group, name: str, path: str) -> Any:
    """A group member reached through a hard link only: soft and external links could point anywhere."""
    link = group.get(name, getlink=True)
    if link is None:
        raise ModelWeightsMismatch(f"weights file has no {path}")
    if not isinstance(link, h5py.HardLink):
        raise UnsafeArchiveMember(f"weights file entry {path} is a {type(link).__name__}; only plain entries are read")
    return group[name]


def _group(group: h5py.Group, name: str, path: str) -> h5py.Group:
    node = _child(group, name, path)
    if not isinstance(node, h5py.Group):
        raise ModelWeightsMismatch(f"weights file entry {path} is not a group")
    return node


class _WeightBudget:
    """Counts tensors and bytes read from a weights file against the limits, before each read."""

    def __init__(self, limits: BundleLimits) -> None:
        self.limits = limits
        self.tensors = 0
        self.bytes = 0

    def read(self, node: Any, path: str) -> np.ndarray:
        if not isinstance(node, h5py.Dataset):
            raise ModelWeightsMismatch(f"weights file entry {path} is not a tensor")
        if node.is_virtual or node.external:
            raise UnsafeArchiveMember(f"weights file tensor {path} keeps its data outside the file")
        self.tensors += 1
        if self.tensors > self.limits.tensors:
            raise TooManyTensors(f"weights file holds more than {self.limits.tensors} tensors")
        dtype = node.dtype
        if dtype.names is not None or dtype.subdtype is not None or dtype.name not in WEIGHT_DTYPES:
            raise DisallowedDtype(f"weights file tensor {path}: dtype {dtype} is not one of {WEIGHT_DTYPES}")
        count = check_shape(tuple(int(d) for d in node.shape))
        self.bytes += count * dtype.itemsize
        if self.bytes > self.limits.weight_bytes:
            raise ArchiveTooLarge(f"weight tensors exceed {self.limits.weight_bytes} bytes in total")
        return canonical_array(np.asarray(node[()]))


def _open_h5(data: bytes) -> h5py.File:
    try:
        return h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError) as exc:
        raise TruncatedArchive(f"not a readable HDF5 file (truncated or corrupt): {exc}") from exc


def _h5_errors(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Map h5py's errors on a corrupt file (OSError, KeyError, ...) to TruncatedArchive, keeping ours."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KernelError:
                raise
            except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise TruncatedArchive(f"{what}: corrupt HDF5 data: {type(exc).__name__}: {exc}") from exc
        return run

    return wrap


def _check_shapes(plan: ModelPlan, weights: Sequence[np.ndarray], source: str) -> None:
    want = plan.weight_shapes
    got = [tuple(w.shape) for w in weights]
    if len(got) != len(want):
        kind = "missing" if len(got) < len(want) else "extra"
        raise ModelWeightsMismatch(f"{source}: {kind} weight tensors: the config needs {len(want)}, the file has {len(got)}")
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            raise ModelWeightsMismatch(f"{source}: weight tensor {i} has shape {g}, the config needs {w}")


@_h5_errors("model.weights.h5")
def _keras_weights(data: bytes, plan: ModelPlan, limits: BundleLimits) -> list[np.ndarray]:
    """Weights from a Keras 3 weights file: ``layers/<snake_case class>[_n]/vars/<i>`` per layer."""
    budget = _WeightBudget(limits)
    with _open_h5(data) as h5:
        root_extra = sorted(set(h5.keys()) - {"layers"} - KERAS_ROOT_EXTRAS)
        if root_extra:
            raise ModelWeightsMismatch(f"model.weights.h5: unexpected entries {root_extra}")
        if "vars" in h5 and len(_group(h5, "vars", "vars")):
            raise ModelWeightsMismatch("model.weights.h5: model-level variables (vars) are not supported")
        layers = _group(h5, "layers", "layers")
        if len(layers) > len(plan.layers):
            extra = sorted(set(layers.keys()) - {p.store_key for p in plan.layers})
            raise ModelWeightsMismatch(f"model.weights.h5: weights for layers the config does not have: {extra[:8]}")
        known = {p.store_key for p in plan.layers}
        unknown = sorted(set(layers.keys()) - known)
        if unknown:
            raise ModelWeightsMismatch(f"model.weights.h5: weights for layers the config does not have: {unknown[:8]}")
        out: list[np.ndarray] = []
        for layer in plan.layers:
            path = f"layers/{layer.store_key}"
            if layer.store_key not in layers:
                if layer.weight_shapes:
                    raise ModelWeightsMismatch(f"model.weights.h5: missing weights for {layer.name} ({path})")
                continue
            group = _group(layers, layer.store_key, path)
            if set(group.keys()) - {"vars"}:
                raise ModelWeightsMismatch(f"model.weights.h5: unexpected entries in {path}: {sorted(group.keys())[:8]}")
            tensors = _group(group, "vars", f"{path}/vars") if "vars" in group else None
            count = 0 if tensors is None else len(tensors)
            if count != len(layer.weight_shapes):
                kind = "missing" if count < len(layer.weight_shapes) else "extra"
                raise ModelWeightsMismatch(f"model.weights.h5: {kind} weight tensors for {layer.name}: "
                                           f"the config needs {len(layer.weight_shapes)}, {path}/vars has {count}")
            if tensors is not None and set(tensors.keys()) != {str(i) for i in range(count)}:
                raise ModelWeightsMismatch(f"model.weights.h5: {path}/vars is not numbered 0..{count - 1}")
            for i in range(count):
                out.append(budget.read(_child(tensors, str(i), f"{path}/vars/{i}"), f"{path}/vars/{i}"))
    _check_shapes(plan, out, "model.weights.h5")
    return out


def _attr_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _attr_names(group: h5py.Group, key: str, path: str, limit: int) -> list[str]:
    raw = group.attrs.get(key)
    if raw is None:
        raise ModelWeightsMismatch(f"legacy H5: {path} has no {key} attribute")
    names = np.asarray(raw).reshape(-1)
    if names.size > limit:
        raise TooManyTensors(f"legacy H5: {path}.{key} lists {names.size} entries, limit is {limit}")
    if names.size and names.dtype.kind not in "SUO":
        raise ModelWeightsMismatch(f"legacy H5: {path}.{key} is not a list of names")
    return [_attr_text(n) for n in names]


@_h5_errors("legacy H5")
def _legacy_h5(data: bytes, limits: BundleLimits) -> tuple[bytes, Callable[[ModelPlan], list[np.ndarray]]]:
    """The config of a legacy H5 file now, its weights once the config is planned (Keras' positional match)."""
    with _open_h5(data) as h5:
        raw = h5.attrs.get("model_config")
    if raw is None:
        raise MalformedModelConfig("legacy H5 file has no model_config attribute (a weights-only file?)")
    if isinstance(raw, np.ndarray) or not isinstance(raw, (bytes, str)):
        raise MalformedModelConfig("legacy H5 model_config is not a JSON string")
    config = raw.encode("utf-8") if isinstance(raw, str) else raw

    @_h5_errors("legacy H5")
    def weights(plan: ModelPlan) -> list[np.ndarray]:
        budget = _WeightBudget(limits)
        out: list[np.ndarray] = []
        with _open_h5(data) as h5:
            root = _group(h5, "model_weights", "model_weights")
            names = _attr_names(root, "layer_names", "model_weights", MAX_WEIGHTS + 256)
            with_weights = []
            for name in names:
                group = _group(root, name, f"model_weights/{name}")
                tensor_names = _attr_names(group, "weight_names", f"model_weights/{name}", limits.tensors)
                if tensor_names:
                    with_weights.append((name, group, tensor_names))
            wanted = [layer for layer in plan.layers if layer.weight_shapes]
            if len(with_weights) != len(wanted):
                raise ModelWeightsMismatch(f"legacy H5: the file has weights for {len(with_weights)} layers, "
                                           f"the config for {len(wanted)}")
            for layer, (name, group, tensor_names) in zip(wanted, with_weights):
                if name != layer.name:
                    raise ModelWeightsMismatch(f"legacy H5: weights of layer {name!r} stand where the config has "
                                               f"{layer.name!r}")
                for tensor in tensor_names:
                    node: Any = group
                    path = f"model_weights/{name}"
                    for part in tensor.split("/"):
                        path = f"{path}/{part}"
                        node = _child(node, part, path)
                    out.append(budget.read(node, path))
        _check_shapes(plan, out, "legacy H5")
        return out

    return config, weights


def _read_npy(name: str, data: bytes) -> np.ndarray:
    """One ``.npy`` member: header checked before the data is touched; no pickles; exact length."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, SyntaxError) as exc:
        raise TruncatedArchive(f"{name}: not a readable .npy header: {exc}") from exc
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise DisallowedDtype(f"{name}: dtype {dtype} is not allowed")
    check_dtype(dtype.name)
    count = check_shape(tuple(shape))
    body = memoryview(data)[stream.tell():]
    if len(body) != count * dtype.itemsize:
        raise TruncatedTensor(f"{name}: {dtype.name}{list(shape)} needs {count * dtype.itemsize} bytes, "
                              f"the file holds {len(body)}")
    array = np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
    return canonical_array(array)


# --- loading a file --------------------------------------------------------------------------------------


def _bundle(config_bytes: bytes, weights_for: Callable[[ModelPlan], list[np.ndarray]],
            limits: BundleLimits) -> ModelBundle:
    text, cfg = canonical_config(config_bytes, limits)
    plan = plan_model(cfg)
    weights = weights_for(plan)
    return ModelBundle(BUNDLE_FORMAT, text, tuple(weights), plan.input, plan.output)


def _load_keras(data: bytes, limits: BundleLimits) -> ModelBundle:
    members = read_zip_members(data, KERAS_MEMBERS, limits.zip_limits(len(KERAS_MEMBERS)))
    missing = sorted(KERAS_MEMBERS - {"metadata.json"} - set(members))
    if missing:
        raise MalformedModelConfig(f".keras archive lacks {missing}")
    if len(members.get("metadata.json", b"")) > MAX_METADATA_BYTES:
        raise ArchiveTooLarge(f"metadata.json is over {MAX_METADATA_BYTES} bytes")
    return _bundle(members["config.json"], lambda plan: _keras_weights(members["model.weights.h5"], plan, limits), limits)


def _load_npz(data: bytes, names: list[str], limits: BundleLimits) -> ModelBundle:
    allowed = {"model.npy", *(f"{n}.npy" for n in weight_names(limits.tensors))}
    if len(names) - 1 > limits.tensors:
        raise TooManyTensors(f".npz holds {len(names) - 1} weight tensors, limit is {limits.tensors}")
    members = read_zip_members(data, allowed, limits.zip_limits(limits.tensors + 1))
    config = _read_npy("model.npy", members.pop("model.npy"))
    if config.dtype != np.uint8 or config.ndim != 1:
        raise MalformedModelConfig("model.npy must be a 1-D uint8 array of UTF-8 JSON")
    order = weight_names(len(members))
    if sorted(members) != [f"{n}.npy" for n in order]:
        raise ModelWeightsMismatch(f".npz weight members must be weight_000.npy.. with no gaps, got {sorted(members)[:8]}")
    weights = [_read_npy(f"{n}.npy", members[f"{n}.npy"]) for n in order]
    if sum(w.nbytes for w in weights) > limits.weight_bytes:
        raise ArchiveTooLarge(f"weight tensors exceed {limits.weight_bytes} bytes in total")
    for name, w in zip(order, weights):
        if w.dtype.name not in WEIGHT_DTYPES:
            raise DisallowedDtype(f"{name}: dtype {w.dtype.name} is not one of {WEIGHT_DTYPES}")

    def matched(plan: ModelPlan) -> list[np.ndarray]:
        _check_shapes(plan, weights, ".npz")
        return weights

    return _bundle(config.tobytes(), matched, limits)


def _read_file(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArchiveTooLarge(f"{path.name} is over the {limit}-byte limit")
    return data


def load_model_file(path: str | Path, limits: BundleLimits = DEFAULT_LIMITS) -> ModelBundle:
    """Validate a model file (``.keras``, legacy H5, or ``.npz`` of today's inputs) and bundle it.

    Raises a :class:`kernels.errors.ModelError` (or :class:`TensorError`)
    naming the problem; ``OSError`` if the file cannot be read at all.
    """
    data = _read_file(Path(path), limits.file_bytes)
    if data.startswith(HDF5_MAGIC):
        config, weights_for = _legacy_h5(data, limits)
        return _bundle(config, weights_for, limits)
    if is_zip(data):
        names = member_names(data)
        if "config.json" in names:
            return _load_keras(data, limits)
        if "model.npy" in names:
            return _load_npz(data, names, limits)
        raise UnknownModelFormat(f"zip archive holds neither config.json (.keras) nor model.npy (.npz): {names[:8]}")
    raise UnknownModelFormat("not a .keras archive, a legacy Keras H5 file or an .npz of model inputs")


# --- bundle bytes, id and job inputs ---------------------------------------------------------------------


def encode_bundle(bundle: ModelBundle) -> bytes:
    try:
        return encode(bundle)
    except EncodeError as exc:
        raise MalformedModelConfig(f"bundle does not encode: {exc}") from exc


def model_id(bundle: ModelBundle) -> bytes:
    """The model's id: SHA-256 of its canonical bundle bytes."""
    return hashlib.sha256(encode_bundle(bundle)).digest()


def check_bundle(bundle: ModelBundle) -> None:
    """Everything a freshly loaded bundle satisfies: canonical checked config, matching weights and signature."""
    if bundle.format != BUNDLE_FORMAT:
        raise MalformedModelConfig(f"bundle format {bundle.format} is not {BUNDLE_FORMAT}")
    text, cfg = canonical_config(bundle.config.encode("utf-8"))
    if text != bundle.config:
        raise MalformedModelConfig("bundle config is not in canonical form")
    plan = plan_model(cfg)
    for i, w in enumerate(bundle.weights):
        if w.dtype.name not in WEIGHT_DTYPES:
            raise DisallowedDtype(f"bundle weight {i}: dtype {w.dtype.name} is not one of {WEIGHT_DTYPES}")
    _check_shapes(plan, bundle.weights, "bundle")
    if encode(plan.input) != encode(bundle.input) or encode(plan.output) != encode(bundle.output):
        raise MalformedModelConfig("bundle signature does not match its config")


def decode_bundle(data: bytes) -> ModelBundle:
    """A bundle from its canonical bytes, checked as strictly as a freshly loaded file."""
    try:
        bundle = decode(ModelBundle, data)
    except DecodeError as exc:
        raise MalformedModelConfig(f"not a model bundle: {exc}") from exc
    check_bundle(bundle)
    return bundle


def bundle_to_inputs(bundle: ModelBundle) -> dict[str, np.ndarray]:
    """Today's ``model`` + ``weight_NNN`` job inputs, as :func:`kernels.models.model_to_inputs` makes them."""
    out = {"model": config_to_array(bundle.config)}
    out.update(zip(weight_names(len(bundle.weights)), (np.asarray(w) for w in bundle.weights)))
    return out


def parameter_count(bundle: ModelBundle) -> int:
    return sum(math.prod(w.shape) for w in bundle.weights)


def layer_summary(bundle: ModelBundle) -> Iterator[tuple[str, str, int]]:
    """(name, class, parameters) per layer of a checked bundle, in model order."""
    plan = plan_model(json.loads(bundle.config))
    for layer in plan.layers:
        yield layer.name, layer.class_name, sum(math.prod(s) for s in layer.weight_shapes)
