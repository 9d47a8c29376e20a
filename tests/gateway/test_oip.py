"""Open Inference Protocol v2 codec: every bad request refused with its type and a message, round trips per dtype."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from p2pgpu.gateway import oip
from p2pgpu.gateway.errors import (
    BadModelOutput,
    GatewayError,
    InvalidRequest,
    RequestTooLarge,
    UnsupportedMediaType,
)
from p2pgpu.gateway.signature import ModelSignature, TensorSpec, signature_from_registry
from tests.gateway.helpers import (
    OIP_TYPES,
    binary_request,
    decode_oip_response,
    json_body,
    json_list,
    le_bytes,
    same_bits,
)

SIG = signature_from_registry("mnist", "1", "float32", (2, None), "float32", (3,))


def x(shape: list[int], data: Any, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"name": "x", "shape": shape, "datatype": datatype, "data": data, **extra}


def parse(body: bytes, *, header_length: int | str | None = None, content_type: str | None = "application/json",
          sig: ModelSignature = SIG, max_batch: int = 4, max_body_bytes: int = 1 << 20) -> oip.InferRequest:
    return oip.parse_infer_request(body, content_type=content_type, header_length=header_length, sig=sig,
                                   max_batch=max_batch, max_body_bytes=max_body_bytes)


# --- accepted forms -------------------------------------------------------------------------------------------

def test_flat_and_nested_data_give_the_same_batch() -> None:
    flat = parse(json_body({"inputs": [x([2, 2, 2], [1, 2, 3, 4, 5, 6, 7, 8])]}))
    nested = parse(json_body({"inputs": [x([2, 2, 2], [[[1, 2], [3, 4]], [[5, 6], [7, 8]]])]}))
    want = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2)
    assert same_bits(flat.batch, want) and same_bits(nested.batch, want)
    assert flat.id is None and flat.outputs == () and flat.binary_default is False and flat.batch_size == 2


def test_request_fields_are_carried() -> None:
    body = json_body({"id": "req-7", "parameters": {"binary_data_output": True, "priority": 3},
                      "inputs": [x([1, 2, 1], [0.5, 1.5])],
                      "outputs": [{"name": "y", "parameters": {"binary_data": False}}]})
    request = parse(body, content_type="application/json; charset=utf-8")
    assert request.id == "req-7" and request.binary_default is True
    assert request.outputs == (oip.RequestedOutput("y", False),)
    assert dict(request.parameters) == {"priority": 3}


def test_none_dims_take_any_size() -> None:
    for width in (1, 5):
        request = parse(json_body({"inputs": [x([1, 2, width], [0.0] * 2 * width)]}))
        assert request.batch.shape == (1, 2, width)


def test_proto3_non_finite_strings_are_floats() -> None:
    request = parse(json_body({"inputs": [x([1, 2, 2], [1, "NaN", "Infinity", "-Infinity"])]}))
    values = request.batch.reshape(-1)
    assert values[0] == 1 and np.isnan(values[1]) and values[2] == np.inf and values[3] == -np.inf


def test_binary_input_with_octet_stream() -> None:
    array = np.array([[[1, np.nan], [np.inf, -0.0]]], dtype=np.float32)
    body, length = binary_request({"inputs": [{"name": "x", "shape": [1, 2, 2], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 16}}]}, [le_bytes(array)])
    for header in (length, str(length)):
        request = parse(body, header_length=header, content_type="application/octet-stream")
        assert same_bits(request.batch, array)
        assert request.batch.flags.writeable  # a copy, not a view of the body


# --- refused requests --------------------------------------------------------------------------------------------

BINARY_X = {"name": "x", "shape": [1, 2, 1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
TWO_FLOATS = le_bytes(np.array([1, 2], dtype=np.float32))

BAD: list[tuple[str, dict[str, Any], type[GatewayError], str]] = [
    ("not json", {"body": b"{nope"}, InvalidRequest, "not valid JSON"),
    ("not utf8", {"body": b'{"inputs": "\xff"}'}, InvalidRequest, "not UTF-8"),
    ("not an object", {"body": b"[1]"}, InvalidRequest, "must be a JSON object"),
    ("unknown field", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])], "extra": 1})}, InvalidRequest,
     "unknown field(s) ['extra']"),
    ("duplicate key", {"body": b'{"inputs": [], "inputs": []}'}, InvalidRequest, "key 'inputs' twice"),
    ("bare NaN token", {"body": b'{"inputs": [{"name": "x", "shape": [1,2,1], "datatype": "FP32", "data": [1, NaN]}]}'},
     InvalidRequest, "bare NaN is not JSON"),
    ("bare Infinity token", {"body": b'{"inputs": [{"name": "x", "shape": [1,2,1], "datatype": "FP32", '
                                     b'"data": [1, -Infinity]}]}'}, InvalidRequest, "bare -Infinity"),
    ("bracket bomb", {"body": b'{"inputs": [{"name": "x", "shape": [1,2,1], "datatype": "FP32", "data": '
                              + b"[" * 200_000 + b"]" * 200_000 + b"}]}"}, InvalidRequest, "nests 200003 levels"),
    ("no inputs", {"body": json_body({"inputs": []})}, InvalidRequest, "non-empty list"),
    ("id not a string", {"body": json_body({"id": 5, "inputs": [x([1, 2, 1], [1, 2])]})}, InvalidRequest,
     "id must be a string"),
    ("binary_data_output not bool", {"body": json_body({"parameters": {"binary_data_output": 1},
                                                        "inputs": [x([1, 2, 1], [1, 2])]})}, InvalidRequest,
     "binary_data_output must be true or false"),
    ("unknown input", {"body": json_body({"inputs": [{**x([1, 2, 1], [1, 2]), "name": "image"}]})}, InvalidRequest,
     "input 'image' is not an input of model mnist; its inputs: ['x']"),
    ("duplicate input", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2]), x([1, 2, 1], [1, 2])]})},
     InvalidRequest, "input 'x' appears twice"),
    ("missing input", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])]}),
                       "sig": ModelSignature("two", "1", (TensorSpec("x", "float32", (2, None)),
                                                          TensorSpec("z", "float32", ())),
                                             (TensorSpec("y", "float32", (3,)),))}, InvalidRequest,
     "missing input(s) ['z']"),
    ("wrong datatype", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2], "FP64")]})}, InvalidRequest,
     "datatype FP64 does not match the model's FP32"),
    ("unknown datatype", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2], "FLOAT")]})}, InvalidRequest,
     "'FLOAT' is not an OIP datatype"),
    ("BYTES", {"body": json_body({"inputs": [x([1, 2, 1], ["a", "b"], "BYTES")]})}, InvalidRequest,
     "BYTES is not supported for tensor models; this input is FP32"),
    ("missing shape", {"body": json_body({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]})},
     InvalidRequest, "needs shape and datatype"),
    ("bad shape", {"body": json_body({"inputs": [x([1, -2, 1], [1, 2])]})}, InvalidRequest,
     "shape must be a list of non-negative integers"),
    ("rank without batch", {"body": json_body({"inputs": [x([2, 1], [1, 2])]})}, InvalidRequest,
     "has 2 dimensions; the model wants the batch size then [2, None]"),
    ("item shape", {"body": json_body({"inputs": [x([1, 3, 1], [1, 2, 3])]})}, InvalidRequest,
     "per-item shape [3, 1] does not match the model's 'x' shape [2, None]"),
    ("empty batch", {"body": json_body({"inputs": [x([0, 2, 1], [])]})}, InvalidRequest, "empty batch"),
    ("batch above max", {"body": json_body({"inputs": [x([5, 2, 1], [0] * 10)]})}, InvalidRequest,
     "batch of 5 is above this model's limit of 4"),
    ("too few elements", {"body": json_body({"inputs": [x([1, 2, 2], [1, 2, 3])]})}, InvalidRequest,
     "has 3 elements but shape [1, 2, 2] needs 4"),
    ("too many elements", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2, 3])]})}, InvalidRequest,
     "has 3 elements but shape [1, 2, 1] needs 2"),
    ("ragged nesting", {"body": json_body({"inputs": [x([1, 2, 2], [[[1, 2], [3]]])]})}, InvalidRequest,
     "ragged nesting"),
    ("lists beside scalars", {"body": json_body({"inputs": [x([1, 2, 2], [[1, 2], 3, 4])]})}, InvalidRequest,
     "lists and scalars side by side"),
    ("nesting unlike shape", {"body": json_body({"inputs": [x([1, 2, 2], [[1, 2, 3, 4]])]})}, InvalidRequest,
     "nested as [1, 4] but shape is [1, 2, 2]"),
    ("string in floats", {"body": json_body({"inputs": [x([1, 2, 1], [1, "2"])]})}, InvalidRequest,
     "got the string '2'"),
    ("bool in floats", {"body": json_body({"inputs": [x([1, 2, 1], [1, True])]})}, InvalidRequest,
     "takes JSON numbers only, got boolean"),
    ("float overflow", {"body": json_body({"inputs": [x([1, 2, 1], [1, 1e39])]})}, InvalidRequest,
     "1e+39 overflows FP32"),
    ("json number past float64", {"body": b'{"inputs": [{"name": "x", "shape": [1,2,1], "datatype": "FP32", '
                                          b'"data": [1, 1e400]}]}'}, InvalidRequest, "overflows FP32"),
    ("huge int into float", {"body": json_body({"inputs": [x([1, 2, 1], [1, 10**400])]})}, InvalidRequest,
     "integer too large for FP32"),
    ("data not a list", {"body": json_body({"inputs": [x([1, 2, 1], 3)]})}, InvalidRequest,
     "data must be a JSON array"),
    ("neither data nor binary", {"body": json_body({"inputs": [{"name": "x", "shape": [1, 2, 1],
                                                                "datatype": "FP32"}]})}, InvalidRequest,
     "neither data nor parameters.binary_data_size"),
    ("unknown output", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])], "outputs": [{"name": "logits"}]})},
     InvalidRequest, "requested output 'logits' is not an output of model mnist; its outputs: ['y']"),
    ("duplicate output", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])],
                                             "outputs": [{"name": "y"}, {"name": "y"}]})}, InvalidRequest,
     "output 'y' is requested twice"),
    ("binary_data not bool", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])],
                                                 "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]})},
     InvalidRequest, "binary_data must be true or false"),
    ("content type", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])]}), "content_type": "text/plain"},
     UnsupportedMediaType, "content type 'text/plain' is not accepted"),
    ("body too large", {"body": json_body({"inputs": [x([1, 2, 1], [1, 2])]}), "max_body_bytes": 10},
     RequestTooLarge, "limit is 10"),
    ("header length not a number", {"body": b"{}", "header_length": "12abc"}, InvalidRequest,
     "Inference-Header-Content-Length must be a non-negative integer, got '12abc'"),
    ("header length negative", {"body": b"{}", "header_length": -1}, InvalidRequest, "non-negative integer"),
    ("header length past body", {"body": b"{}", "header_length": 3}, InvalidRequest,
     "is 3 but the body has only 2 bytes"),
    ("binary runs past body", {"body": binary_request({"inputs": [BINARY_X]}, [TWO_FLOATS[:6]])[0],
                               "header_length": binary_request({"inputs": [BINARY_X]}, [])[1]}, InvalidRequest,
     "binary_data_size 8 runs past the body: 6 binary bytes left"),
    ("binary trailing bytes", {"body": binary_request({"inputs": [BINARY_X]}, [TWO_FLOATS + b"xx"])[0],
                               "header_length": binary_request({"inputs": [BINARY_X]}, [])[1]}, InvalidRequest,
     "binary sizes do not add up: inputs declare 8 bytes"),
    ("binary bytes with json input", {"body": binary_request({"inputs": [x([1, 2, 1], [1, 2])]}, [TWO_FLOATS])[0],
                                      "header_length": binary_request({"inputs": [x([1, 2, 1], [1, 2])]}, [])[1]},
     InvalidRequest, "inputs declare 0 bytes of binary data but the body has 8"),
    ("binary size unlike shape", {"body": binary_request({"inputs": [{**BINARY_X, "shape": [1, 2, 2]}]},
                                                         [TWO_FLOATS])[0],
                                  "header_length": binary_request({"inputs": [{**BINARY_X, "shape": [1, 2, 2]}]},
                                                                  [])[1]},
     InvalidRequest, "binary_data_size is 8 but FP32[1, 2, 2] is 16 bytes"),
    ("binary size not int", {"body": json_body({"inputs": [{**BINARY_X, "parameters": {"binary_data_size": "8"}}]})},
     InvalidRequest, "binary_data_size must be a non-negative integer"),
    ("binary and data", {"body": json_body({"inputs": [{**BINARY_X, "data": [1, 2]}]})}, InvalidRequest,
     "both data and binary_data_size"),
]


@pytest.mark.parametrize(("case", "kwargs", "exc", "message"), BAD, ids=[case[0] for case in BAD])
def test_bad_request_is_refused(case: str, kwargs: dict[str, Any], exc: type[GatewayError], message: str) -> None:
    with pytest.raises(exc) as info:
        parse(**kwargs)
    assert message in info.value.message, info.value.message
    assert info.value.status == exc.status


INT_SIG = signature_from_registry("ints", "1", "int8", (2,), "int8", (2,))
BOOL_SIG = signature_from_registry("bools", "1", "bool", (2,), "bool", (2,))


@pytest.mark.parametrize(("sig", "datatype", "data", "message"), [
    (INT_SIG, "INT8", [1, 128], "128 is out of range for INT8 (-128..127)"),
    (INT_SIG, "INT8", [-129, 0], "-129 is out of range for INT8"),
    (INT_SIG, "INT8", [1, 2.0], "takes JSON integers only, got number (e.g. 2.0)"),
    (INT_SIG, "INT8", [1, True], "takes JSON integers only, got boolean"),
    (INT_SIG, "INT8", [1, "NaN"], "takes JSON integers only, got string"),
    (INT_SIG, "INT8", [1, None], "takes JSON integers only, got null"),
    (BOOL_SIG, "BOOL", [True, 1], "takes true/false only, got integer"),
])
def test_values_that_do_not_fit_the_dtype(sig: ModelSignature, datatype: str, data: list[Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(json_body({"inputs": [x([1, 2], data, datatype)]}), sig=sig)
    assert message in info.value.message


def test_binary_bool_must_be_zero_or_one() -> None:
    header = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]}
    body, length = binary_request(header, [b"\x01\x02"])
    with pytest.raises(InvalidRequest, match="BOOL binary data must be bytes 0 or 1"):
        parse(body, header_length=length, sig=BOOL_SIG)


# --- responses ----------------------------------------------------------------------------------------------------

def request_for(sig: ModelSignature, batch: np.ndarray, outputs: list[dict[str, Any]] | None = None,
                **params: Any) -> oip.InferRequest:
    body: dict[str, Any] = {"id": "r1", "inputs": [x(list(batch.shape), json_list(batch), OIP_TYPES[batch.dtype.name])]}
    if outputs is not None:
        body["outputs"] = outputs
    if params:
        body["parameters"] = params
    return parse(json_body(body), sig=sig)


SAMPLES = {
    "bool": [True, False, True, True],
    "uint8": [0, 1, 200, 255], "uint16": [0, 65535, 7, 9], "uint32": [0, 2**32 - 1, 5, 6],
    "uint64": [0, 2**64 - 1, 2**63, 1], "int8": [-128, 127, 0, -1], "int16": [-32768, 32767, 1, 2],
    "int32": [-(2**31), 2**31 - 1, 3, 4], "int64": [-(2**63), 2**63 - 1, 0, 5],
    "float16": [0.5, -65504.0, float("nan"), float("inf")],
    "float32": [0.1, -3.4e38, float("-inf"), 1e-45], "float64": [0.1, 1e308, float("nan"), -0.0],
}


@pytest.mark.parametrize("dtype", sorted(SAMPLES))
@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_each_datatype(dtype: str, binary: bool) -> None:
    """Request in, response out, decoded by the reference decoder: the same bits for every datatype."""
    sig = signature_from_registry("m", "3", dtype, (2,), dtype, (2,))
    array = np.array(SAMPLES[dtype], dtype=dtype).reshape(2, 2)
    request = request_for(sig, array, binary_data_output=binary)
    assert same_bits(request.batch, array)
    body, headers = oip.encode_infer_response(sig, request, {"y": request.batch})
    head, outputs = decode_oip_response(body, headers)
    assert head["id"] == "r1" and head["model_name"] == "m" and head["model_version"] == "3"
    assert head["outputs"][0]["datatype"] == OIP_TYPES[dtype] and head["outputs"][0]["shape"] == [2, 2]
    assert same_bits(outputs["y"], array)
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert "data" not in head["outputs"][0]
    else:
        assert headers == {"Content-Type": "application/json"}
        json.loads(body)  # strictly valid JSON: no bare NaN


def test_mixed_json_and_binary_outputs() -> None:
    sig = ModelSignature("multi", "2", (TensorSpec("x", "float32", (2,)),),
                         (TensorSpec("y", "float32", (2,)), TensorSpec("p", "int64", ()),
                          TensorSpec("m", "bool", (1,))))
    batch = np.array([[1, 2], [3, 4]], dtype=np.float32)
    request = request_for(sig, batch, [{"name": "p", "parameters": {"binary_data": True}}, {"name": "y"},
                                       {"name": "m", "parameters": {"binary_data": False}}], binary_data_output=True)
    outs: dict[str, np.ndarray] = {"y": batch * 2, "p": np.array([7, -8], dtype=np.int64),
                                   "m": np.array([[True], [False]]), "extra": np.zeros(1)}
    body, headers = oip.encode_infer_response(sig, request, outs)
    head, decoded = decode_oip_response(body, headers)
    assert [o["name"] for o in head["outputs"]] == ["p", "y", "m"]  # the requested order
    assert "parameters" in head["outputs"][0] and "parameters" in head["outputs"][1]  # y follows binary_data_output
    assert head["outputs"][2]["data"] == [True, False]
    for name in ("y", "p", "m"):
        assert same_bits(decoded[name], outs[name])
    assert int(headers["Inference-Header-Content-Length"]) == len(body) - 16 - 16


def test_all_outputs_when_none_requested_and_no_id() -> None:
    request = parse(json_body({"inputs": [x([1, 2, 1], [1, 2])]}))
    body, headers = oip.encode_infer_response(SIG, request, {"y": np.ones((1, 3), np.float32)})
    head = json.loads(body)
    assert "id" not in head and head["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 3],
                                                     "data": [1.0, 1.0, 1.0]}]


@pytest.mark.parametrize(("outputs", "message"), [
    ({}, "returned no output 'y'"),
    ({"y": np.ones((1, 3), np.float64)}, "output 'y' is float64, the model declares float32"),
    ({"y": np.ones((2, 3), np.float32)}, "the request's batch is 1"),
    ({"y": np.ones((1, 4), np.float32)}, "has shape [1, 4]"),
    ({"y": [[1.0, 2.0, 3.0]]}, "is a list, not an array"),
])
def test_bad_model_output_is_a_502(outputs: dict[str, Any], message: str) -> None:
    request = parse(json_body({"inputs": [x([1, 2, 1], [1, 2])]}))
    with pytest.raises(BadModelOutput) as info:
        oip.encode_infer_response(SIG, request, outputs)
    assert message in info.value.message and info.value.status == 502


def test_metadata_bodies() -> None:
    assert oip.server_metadata("p2pgpu", "0.1", ["binary_tensor_data"]) == {
        "name": "p2pgpu", "version": "0.1", "extensions": ["binary_tensor_data"]}
    assert oip.model_metadata(SIG, ["1", "2"]) == {
        "name": "mnist", "versions": ["1", "2"], "platform": "tensorflow_keras",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert oip.datatype_of("float16") == "FP16" and oip.dtype_of("BYTES") is None


def test_a_json_body_sent_with_curls_default_form_content_type_is_read_as_json() -> None:
    import json as _json

    from p2pgpu.gateway import oip
    from p2pgpu.gateway.signature import signature_from_registry

    sig = signature_from_registry("m", "1", "float32", (2,), "float32", (1,))
    body = _json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}).encode()
    parsed = oip.parse_infer_request(body, content_type="application/x-www-form-urlencoded", header_length=None,
                                     sig=sig, max_batch=8)
    assert parsed.batch.tolist() == [[1.0, 2.0]]
