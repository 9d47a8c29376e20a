"""Property tests: any array of any supported dtype and shape goes through each request form and comes out the same.

Binary forms are bit for bit (NaN payloads included); JSON has one NaN, so
the JSON forms are bit for bit after NaNs are made the dtype's standard NaN.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pgpu.gateway import oip, tfserving
from p2pgpu.gateway.signature import SUPPORTED_DTYPES, ModelSignature, signature_from_registry
from p2pgpu.gateway.tensorjson import json_depth
from tests.gateway.helpers import OIP_TYPES, binary_request, decode_oip_response, json_list, le_bytes, same_bits

PROPERTY = settings(max_examples=150, deadline=None)


@st.composite
def batches(draw: st.DrawFn) -> tuple[ModelSignature, npt.NDArray[Any]]:
    """A signature whose per-item shape fits the array (some dims None) and a ``[n, *item]`` array for it."""
    dtype = np.dtype(draw(st.sampled_from(SUPPORTED_DTYPES)))
    item = draw(st.lists(st.integers(0, 3), max_size=3))
    n = draw(st.integers(1, 4))
    array = draw(hnp.arrays(dtype, (n, *item)))
    spec_shape = tuple(None if draw(st.booleans()) else dim for dim in item)
    sig = signature_from_registry("p", "1", dtype.name, spec_shape, dtype.name, spec_shape)
    return sig, array


def standard_nan(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if array.dtype.kind != "f":
        return array
    out = array.copy()
    out[np.isnan(out)] = np.nan
    return out


def nested(array: npt.NDArray[Any]) -> Any:
    return np.array(json_list(array), dtype=object).reshape(array.shape).tolist()


def parse_oip(sig: ModelSignature, body: bytes, header_length: int | None = None) -> oip.InferRequest:
    return oip.parse_infer_request(body, content_type=None, header_length=header_length, sig=sig, max_batch=4)


@PROPERTY
@given(batches(), st.booleans())
def test_oip_json_flat_and_nested(case: tuple[ModelSignature, npt.NDArray[Any]], flat: bool) -> None:
    sig, array = case
    data = json_list(array) if flat else nested(array)
    body = json.dumps({"inputs": [{"name": "x", "shape": list(array.shape), "datatype": OIP_TYPES[array.dtype.name],
                                   "data": data}]}).encode()
    assert same_bits(parse_oip(sig, body).batch, standard_nan(array))


@PROPERTY
@given(batches())
def test_oip_binary_is_bit_for_bit(case: tuple[ModelSignature, npt.NDArray[Any]]) -> None:
    sig, array = case
    raw = le_bytes(array)
    header = {"inputs": [{"name": "x", "shape": list(array.shape), "datatype": OIP_TYPES[array.dtype.name],
                          "parameters": {"binary_data_size": len(raw)}}]}
    body, length = binary_request(header, [raw])
    assert same_bits(parse_oip(sig, body, length).batch, array)


@PROPERTY
@given(batches(), st.booleans())
def test_oip_response_round_trip(case: tuple[ModelSignature, npt.NDArray[Any]], binary: bool) -> None:
    sig, array = case
    body = json.dumps({"inputs": [{"name": "x", "shape": list(array.shape), "datatype": OIP_TYPES[array.dtype.name],
                                   "data": json_list(array)}], "parameters": {"binary_data_output": binary}}).encode()
    request = parse_oip(sig, body)
    out, headers = oip.encode_infer_response(sig, request, {"y": array})
    _, decoded = decode_oip_response(out, headers)
    assert same_bits(decoded["y"], array if binary else standard_nan(array))


@PROPERTY
@given(batches(), st.sampled_from(["rows", "rows-named", "columns", "columns-named"]))
def test_tfserving_forms(case: tuple[ModelSignature, npt.NDArray[Any]], form: str) -> None:
    sig, array = case
    values = nested(array)
    request_body: dict[str, Any] = {
        "rows": {"instances": values},
        "rows-named": {"instances": [{"x": item} for item in values]},
        "columns": {"inputs": values},
        "columns-named": {"inputs": {"x": values}},
    }[form]
    request = tfserving.parse_predict_request(json.dumps(request_body).encode(), sig, max_batch=4)
    if array.size == 0:
        # Nested JSON stops at the first zero-size dimension; the model's dims (0 for None) fill the rest.
        cut = array.shape.index(0) + 1
        spec = sig.inputs[0].shape
        assert request.batch.shape == (*array.shape[:cut], *(0 if d is None else d for d in spec[cut - 1:]))
        assert request.batch.dtype == array.dtype
        return
    assert same_bits(request.batch, standard_nan(array))
    response = json.loads(tfserving.encode_predict_response(request, {"y": request.batch}))
    got = response["predictions"] if form.startswith("rows") else response["outputs"]
    assert got == values


@PROPERTY
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet="[]{}\"\\ab"),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text("[]{}\"\\x"), inner, max_size=3),
                    max_leaves=30))
def test_json_depth_matches_the_parse(value: Any) -> None:
    """The linear depth scan agrees with the nesting of the parsed value, brackets inside strings ignored."""
    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max((depth(i) for i in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(i) for i in v.values()), default=0)
        return 0
    assert json_depth(json.dumps(value).encode()) == depth(value)
