"""JSON <-> numpy for both protocols: bounded decoding, strict value conversion, valid JSON out.

Why this is its own module: both protocols carry tensors as JSON arrays
(flat or nested) of numbers or booleans, and both must refuse the same bad
input the same way.

- **Bounded decoding.** ``loads_bounded`` refuses a body over its size limit
  before reading it, and measures the bracket nesting depth (strings
  skipped) with one linear pass before ``json.loads`` recurses, so a
  nested-bracket bomb is a 400, not a ``RecursionError``. Bare ``NaN`` /
  ``Infinity`` tokens (which Python's ``json`` accepts, and JSON does not)
  and duplicate object keys are refused.
- **Strict values.** Integer dtypes take JSON integers only (``3.0`` is
  refused, as is ``true``), within the dtype's range; ``BOOL`` takes
  ``true``/``false`` only; float dtypes take JSON numbers, and a finite
  number that overflows the dtype (``1e39`` for FP32, ``1e400`` anywhere) is
  refused. Decimal numbers round to the nearest float, as any JSON reader's.
- **Non-finite floats.** JSON has no NaN or infinity. We follow the proto3
  JSON mapping (which TF Serving's protos use): a non-finite float is the
  string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``. Float inputs accept
  exactly those strings; outputs emit them, so every body we write is valid
  JSON (``allow_nan=False``) and round-trips bit for bit except for NaN
  payloads.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pgpu.gateway.errors import InvalidRequest, RequestTooLarge

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "array_from_values",
    "dumps",
    "flatten_nested",
    "json_depth",
    "loads_bounded",
    "to_json_values",
]

DEFAULT_MAX_BODY_BYTES = 64 << 20
# A request wraps a tensor in at most ~4 levels (body, inputs, input, instance) around at most 1 + 8 tensor
# dimensions; 32 leaves room and stays far from the interpreter's recursion limit.
MAX_JSON_DEPTH = 32

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NON_FINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_depth(body: bytes) -> int:
    """The deepest bracket nesting in ``body``, brackets inside strings ignored: linear, no recursion."""
    brackets = _STRING.sub(b'""', body).translate(None, delete=_NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _refuse_constant(token: str) -> Any:
    raise InvalidRequest(
        f"bare {token} is not JSON; write a non-finite float as the string \"NaN\", \"Infinity\" or \"-Infinity\"")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidRequest(f"JSON object has the key {key!r} twice")
        obj[key] = value
    return obj


def loads_bounded(body: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``body`` as JSON within ``max_bytes`` and ``max_depth``, or raise a ``GatewayError`` naming ``what``."""
    if len(body) > max_bytes:
        raise RequestTooLarge(f"{what} is {len(body)} bytes, limit is {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not UTF-8: {exc}") from None
    depth = json_depth(body)
    if depth > max_depth:
        raise InvalidRequest(f"{what} nests {depth} levels of brackets, limit is {max_depth}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # defence in depth: the depth check above should make this unreachable
        raise InvalidRequest(f"{what} nests too deeply") from None


def flatten_nested(value: Any, *, what: str, max_ndim: int) -> tuple[tuple[int, ...], list[Any]]:
    """The shape of a regular nested list and its elements in row-major order; ragged nesting is refused.

    Works level by level (no recursion). A non-list ``value`` is a scalar of shape ``()``.
    """
    shape: list[int] = []
    level: list[Any] = [value]
    while True:
        kinds = set(map(type, level))
        if list not in kinds:
            return tuple(shape), level
        if kinds != {list}:
            raise InvalidRequest(f"{what}: ragged nesting (lists and scalars side by side at depth {len(shape) + 1})")
        lengths = set(map(len, level))
        if len(lengths) != 1:
            raise InvalidRequest(
                f"{what}: ragged nesting (lists of lengths {sorted(lengths)[:5]} at depth {len(shape) + 1})")
        (size,) = lengths
        shape.append(size)
        if len(shape) > max_ndim:
            raise InvalidRequest(f"{what}: nested more than {max_ndim} levels deep")
        if size == 0:
            return tuple(shape), []
        level = list(itertools.chain.from_iterable(level))


def _kind_text(kinds: set[type]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object", type(None): "null"}
    return ", ".join(sorted(names.get(kind, kind.__name__) for kind in kinds))


def array_from_values(values: Sequence[Any], dtype: np.dtype[Any], *, what: str, wire_name: str) -> npt.NDArray[Any]:
    """A 1-D array of ``dtype`` from JSON scalars, converting only where lossless; else ``InvalidRequest``.

    ``wire_name`` is the protocol's name of the dtype (``FP32``, ``DT_FLOAT``), for messages.
    """
    kinds = set(map(type, values))
    if dict in kinds:
        if any(type(v) is dict and set(v) == {"b64"} for v in values):
            raise InvalidRequest(
                f"{what}: {{\"b64\": ...}} values are raw bytes, which need a string (DT_STRING/BYTES) input; "
                f"this model's input is {wire_name}: send numbers")
        raise InvalidRequest(f"{what}: a JSON object where a {wire_name} value belongs")
    if dtype.kind == "b":
        if kinds - {bool}:
            raise InvalidRequest(f"{what}: {wire_name} takes true/false only, got {_kind_text(kinds - {bool})}")
        return np.array(values, dtype=dtype)
    if dtype.kind in "iu":
        if kinds - {int}:
            raise InvalidRequest(
                f"{what}: {wire_name} takes JSON integers only, got {_kind_text(kinds - {int})} "
                f"(e.g. {next(v for v in values if type(v) is not int)!r})")
        if values:
            info = np.iinfo(dtype)
            low, high = min(values), max(values)
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise InvalidRequest(f"{what}: {bad} is out of range for {wire_name} ({info.min}..{info.max})")
        return np.array(values, dtype=dtype)
    # float
    if kinds - {int, float, str}:
        others = _kind_text(kinds - {int, float, str})
        raise InvalidRequest(f"{what}: {wire_name} takes JSON numbers only, got {others}")
    special: npt.NDArray[np.bool_] | None = None
    numbers: Sequence[Any] = values
    if str in kinds:
        bad = next((v for v in values if type(v) is str and v not in _NON_FINITE_IN), None)
        if bad is not None:
            raise InvalidRequest(
                f"{what}: {wire_name} takes numbers (or \"NaN\", \"Infinity\", \"-Infinity\"), got the string {bad!r}")
        special = np.fromiter((type(v) is str for v in values), dtype=bool, count=len(values))
        numbers = [_NON_FINITE_IN[v] if type(v) is str else v for v in values]
    try:
        wide = np.array(numbers, dtype=np.float64)
    except OverflowError:
        raise InvalidRequest(f"{what}: an integer too large for {wire_name}") from None
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    overflow = ~np.isfinite(narrow)
    if special is not None:
        overflow &= ~special
    if overflow.any():
        index = int(np.argmax(overflow))
        raise InvalidRequest(f"{what}: {values[index]!r} overflows {wire_name}")
    return narrow


def to_json_values(array: npt.NDArray[Any], *, flat: bool) -> Any:
    """``array`` as JSON-ready Python values: flat row-major or nested; non-finite floats as proto3 strings."""
    values = array.reshape(-1) if flat else array
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        shape = array.shape
        items: list[Any] = [_non_finite_out(v) for v in array.reshape(-1).tolist()]
        if flat:
            return items
        return np.array(items, dtype=object).reshape(shape).tolist()
    return values.tolist()


def _non_finite_out(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def dumps(obj: Any) -> bytes:
    """Compact, strictly valid JSON (``allow_nan=False``: a stray NaN is a bug, not an output)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
