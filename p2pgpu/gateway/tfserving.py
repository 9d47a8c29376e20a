"""TF Serving's REST API: predict request parsing, response encoding, model status and metadata bodies.

Sans-I/O, like ``oip``. Decisions:

- **Two request formats.** Row (``instances``: a list, one entry per item)
  and columnar (``inputs``: the whole batch). Either carries the single
  input unnamed, or named as ``{"x": ...}`` (per instance in row format);
  named instances must all be named. ``signature_name``, if given, must be
  ``serving_default``, the only signature our models have.
- **Values** follow ``tensorjson`` (strict ints, lossless conversion,
  ``"NaN"``/``"Infinity"``/``"-Infinity"`` strings for non-finite floats:
  TF Serving itself writes bare NaN tokens, which are not JSON; we do not).
  ``{"b64": "..."}`` is TF Serving's way to send raw bytes, and only a
  DT_STRING input takes it; our models' inputs are numeric, so it is
  refused with a message that says so.
- **Responses** use TF Serving's single-output forms: row requests get
  ``{"predictions": [item, ...]}``, columnar ones ``{"outputs": batch}``;
  with several outputs, a list of ``{name: item}`` objects and a
  ``{name: batch}`` object respectively.
- **Versions** are our registry's version strings, not TF Serving's
  integers: ``model_status`` and ``model_metadata`` report them as given.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from p2pgpu.gateway.errors import BadModelOutput, InvalidRequest
from p2pgpu.gateway.oip import checked_output
from p2pgpu.gateway.signature import MAX_ITEM_NDIM, ModelSignature, TensorSpec, shape_text
from p2pgpu.gateway.tensorjson import (
    DEFAULT_MAX_BODY_BYTES,
    array_from_values,
    dumps,
    flatten_nested,
    loads_bounded,
    to_json_values,
)

__all__ = [
    "DEFAULT_SIGNATURE",
    "TF_DTYPES",
    "PredictRequest",
    "decode_b64",
    "encode_predict_response",
    "model_metadata",
    "model_status",
    "parse_predict_request",
]

DEFAULT_SIGNATURE = "serving_default"
TF_DTYPES: Mapping[str, str] = MappingProxyType({
    "bool": "DT_BOOL",
    "uint8": "DT_UINT8", "uint16": "DT_UINT16", "uint32": "DT_UINT32", "uint64": "DT_UINT64",
    "int8": "DT_INT8", "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64",
    "float16": "DT_HALF", "float32": "DT_FLOAT", "float64": "DT_DOUBLE",
})
_REQUEST_KEYS = frozenset({"signature_name", "instances", "inputs"})
ModelState = Literal["AVAILABLE", "LOADING", "UNAVAILABLE"]


@dataclass(frozen=True, slots=True)
class PredictRequest:
    """A parsed, checked predict request.

    ``format`` is ``"row"`` (``instances``) or ``"columnar"`` (``inputs``);
    ``inputs`` maps every model input to its ``[n, *item]`` array;
    ``signature`` is what it was checked against (the encoder checks the
    outputs against it too).
    """

    format: Literal["row", "columnar"]
    inputs: Mapping[str, npt.NDArray[Any]]
    signature: ModelSignature

    @property
    def batch(self) -> npt.NDArray[Any]:
        return next(iter(self.inputs.values()))

    @property
    def batch_size(self) -> int:
        return int(self.batch.shape[0])


def decode_b64(value: Any, what: str) -> bytes:
    """The bytes of a ``{"b64": "..."}`` value (standard alphabet, padding required); ``InvalidRequest`` if bad."""
    if type(value) is not dict or set(value) != {"b64"} or type(value["b64"]) is not str:
        raise InvalidRequest(f"{what}: a b64 value is {{\"b64\": \"<base64 string>\"}}")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{what}: bad base64: {exc}") from None


def _is_b64(value: Any) -> bool:
    return type(value) is dict and set(value) == {"b64"}


def _tensor(value: Any, spec: TensorSpec, what: str, max_batch: int) -> npt.NDArray[Any]:
    """A batched ``[n, *item]`` array from a nested JSON value, checked against ``spec``."""
    shape, values = flatten_nested(value, what=what, max_ndim=1 + MAX_ITEM_NDIM)
    if dict in set(map(type, values)):
        b64 = next((v for v in values if type(v) is dict and "b64" in v), None)
        if b64 is None:
            raise InvalidRequest(f"{what}: a JSON object where a {TF_DTYPES[spec.dtype]} value belongs")
        raw = decode_b64(b64, what)  # a malformed b64 value is reported as such
        raise InvalidRequest(f"{what}: {{\"b64\": ...}} values are raw bytes ({len(raw)} here), which need a "
                             f"DT_STRING input; this model's input {spec.name!r} is {TF_DTYPES[spec.dtype]}: "
                             "send numbers")
    if not shape:
        raise InvalidRequest(f"{what}: a scalar where a batch (a list, one entry per item) belongs")
    n = shape[0]
    if n < 1:
        raise InvalidRequest(f"{what}: empty batch (send at least one item)")
    if n > max_batch:
        raise InvalidRequest(f"{what}: batch of {n} is above this model's limit of {max_batch}; split the request")
    if shape[-1] == 0 and len(shape) < 1 + len(spec.shape):
        # Nested JSON cannot show the dimensions after a zero-size one ([[]] is [1, 0] whatever follows); the
        # array is empty either way, so the model's own dimensions (0 where any size goes) complete the shape.
        shape = (*shape, *(0 if dim is None else dim for dim in spec.shape[len(shape) - 1:]))
    if len(shape) != 1 + len(spec.shape) or not spec.matches(shape[1:]):
        raise InvalidRequest(f"{what}: each item has shape {list(shape[1:])}, the model's {spec.name!r} wants "
                             f"{shape_text(spec.shape)} (None = any size)")
    array = array_from_values(values, spec.np_dtype, what=what, wire_name=TF_DTYPES[spec.dtype])
    return array.reshape(shape)


def _named(value: Any) -> bool:
    """Whether a columnar value or an instance names its inputs (an object that is not a b64 value)."""
    return type(value) is dict and not _is_b64(value)


def _check_names(keys: Any, sig: ModelSignature, what: str) -> None:
    expected = {spec.name for spec in sig.inputs}
    unknown = set(keys) - expected
    if unknown:
        raise InvalidRequest(f"{what}: unknown input(s) {sorted(unknown)}; model {sig.name}'s inputs: "
                             f"{sorted(expected)}")
    missing = expected - set(keys)
    if missing:
        raise InvalidRequest(f"{what}: missing input(s) {sorted(missing)} of model {sig.name}")


def parse_predict_request(
    body: bytes,
    sig: ModelSignature,
    *,
    max_batch: int,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> PredictRequest:
    """Parse and check ``POST /v1/models/<name>[/versions/<v>]:predict`` against ``sig``.

    Raises ``RequestTooLarge`` over ``max_body_bytes``, ``InvalidRequest`` otherwise.
    """
    request = loads_bounded(body, what="predict request", max_bytes=max_body_bytes)
    if type(request) is not dict:
        raise InvalidRequest("a predict request is a JSON object with \"instances\" or \"inputs\"")
    unknown = set(request) - _REQUEST_KEYS
    if unknown:
        raise InvalidRequest(f"predict request has unknown field(s) {sorted(unknown)}; allowed: "
                             f"{sorted(_REQUEST_KEYS)}")
    signature_name = request.get("signature_name", DEFAULT_SIGNATURE)
    if signature_name != DEFAULT_SIGNATURE:
        raise InvalidRequest(f"serving signature {signature_name!r} not found; the only one is {DEFAULT_SIGNATURE!r}")
    has_rows, has_columns = "instances" in request, "inputs" in request
    if has_rows == has_columns:
        raise InvalidRequest("a predict request has exactly one of \"instances\" (row format) and \"inputs\" "
                             "(columnar format)")
    single = len(sig.inputs) == 1
    arrays: dict[str, npt.NDArray[Any]] = {}
    if has_rows:
        instances = request["instances"]
        if type(instances) is not list:
            raise InvalidRequest("\"instances\" must be a list, one entry per item")
        if not instances:
            raise InvalidRequest("\"instances\" is an empty batch (send at least one item)")
        named = {_named(instance) for instance in instances}
        if named == {True, False}:
            raise InvalidRequest("instances mix named ({\"x\": ...}) and unnamed entries; use one form")
        if named == {True}:
            for index, instance in enumerate(instances):
                _check_names(instance, sig, f"instances[{index}]")
            for spec in sig.inputs:
                arrays[spec.name] = _tensor([instance[spec.name] for instance in instances], spec,
                                            f"instances (input {spec.name!r})", max_batch)
        else:
            if not single:
                raise InvalidRequest(f"model {sig.name} has {len(sig.inputs)} inputs: name them in each instance")
            spec = sig.inputs[0]
            arrays[spec.name] = _tensor(instances, spec, "instances", max_batch)
        fmt: Literal["row", "columnar"] = "row"
    else:
        columns = request["inputs"]
        if _named(columns):
            _check_names(columns, sig, "inputs")
            for spec in sig.inputs:
                arrays[spec.name] = _tensor(columns[spec.name], spec, f"inputs (input {spec.name!r})", max_batch)
        else:
            if not single:
                raise InvalidRequest(f"model {sig.name} has {len(sig.inputs)} inputs: name them in \"inputs\"")
            spec = sig.inputs[0]
            arrays[spec.name] = _tensor(columns, spec, "inputs", max_batch)
        fmt = "columnar"
    sizes = {name: int(array.shape[0]) for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidRequest(f"inputs disagree on the batch size: {sizes}")
    return PredictRequest(fmt, MappingProxyType(arrays), sig)


def encode_predict_response(request: PredictRequest, outputs: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """The predict response body: ``{"predictions": ...}`` for row requests, ``{"outputs": ...}`` for columnar.

    Raises ``BadModelOutput`` (502) when an output is missing or does not fit the signature.
    """
    sig = request.signature
    arrays: dict[str, npt.NDArray[Any]] = {}
    for spec in sig.outputs:
        if spec.name not in outputs:
            raise BadModelOutput(f"the model returned no output {spec.name!r}")
        arrays[spec.name] = checked_output(spec, outputs[spec.name], request.batch_size)
    values = {name: to_json_values(array, flat=False) for name, array in arrays.items()}
    if request.format == "row":
        if len(values) == 1:
            return dumps({"predictions": next(iter(values.values()))})
        rows = zip(*values.values(), strict=True)
        return dumps({"predictions": [dict(zip(values, row, strict=True)) for row in rows]})
    if len(values) == 1:
        return dumps({"outputs": next(iter(values.values()))})
    return dumps({"outputs": values})


def model_status(name: str, version: str, state: ModelState, detail: str = "") -> dict[str, Any]:
    """The body of ``GET /v1/models/<name>[/versions/<v>]`` (``model_version_status``).

    ``name`` is not part of TF Serving's answer (the URL carries it); it is
    taken so a caller need not special-case this protocol. ``detail`` is the
    error message: why a model is LOADING or UNAVAILABLE.
    """
    del name
    if state not in ("AVAILABLE", "LOADING", "UNAVAILABLE"):
        raise ValueError(f"unknown model state {state!r}")
    code = "UNAVAILABLE" if state == "UNAVAILABLE" else "OK"
    return {"model_version_status": [
        {"version": version, "state": state, "status": {"error_code": code, "error_message": detail}},
    ]}


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    dims = [{"size": "-1", "name": ""}]
    dims += [{"size": str(-1 if dim is None else dim), "name": ""} for dim in spec.shape]
    return {
        "dtype": TF_DTYPES[spec.dtype],
        "tensor_shape": {"dim": dims, "unknown_rank": False},
        "name": f"{DEFAULT_SIGNATURE}_{spec.name}:0",
    }


def model_metadata(sig: ModelSignature) -> dict[str, Any]:
    """The body of ``GET /v1/models/<name>[/versions/<v>]/metadata`` (``metadata.signature_def``).

    Sizes are strings, as TF Serving's proto3 JSON writes int64; the batch dimension is ``-1``.
    """
    return {
        "model_spec": {"name": sig.name, "signature_name": "", "version": sig.version},
        "metadata": {"signature_def": {"signature_def": {DEFAULT_SIGNATURE: {
            "inputs": {spec.name: _tensor_info(spec) for spec in sig.inputs},
            "outputs": {spec.name: _tensor_info(spec) for spec in sig.outputs},
            "method_name": "tensorflow/serving/predict",
        }}}},
    }
