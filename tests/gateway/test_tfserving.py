"""TF Serving REST codec: row and columnar requests, refusals with their messages, response and metadata shapes."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from p2pgpu.gateway import tfserving
from p2pgpu.gateway.errors import BadModelOutput, GatewayError, InvalidRequest, RequestTooLarge
from p2pgpu.gateway.signature import ModelSignature, TensorSpec, signature_from_registry
from tests.gateway.helpers import json_body, reference_values, same_bits

SIG = signature_from_registry("mnist", "1", "float32", (2, None), "float32", (3,))
ITEM = [[1, 2], [3, 4]]


def parse(body: bytes, sig: ModelSignature = SIG, *, max_batch: int = 4,
          max_body_bytes: int = 1 << 20) -> tfserving.PredictRequest:
    return tfserving.parse_predict_request(body, sig, max_batch=max_batch, max_body_bytes=max_body_bytes)


@pytest.mark.parametrize(("body", "fmt"), [
    ({"instances": [ITEM, ITEM]}, "row"),
    ({"instances": [{"x": ITEM}, {"x": ITEM}]}, "row"),
    ({"signature_name": "serving_default", "instances": [ITEM, ITEM]}, "row"),
    ({"inputs": [ITEM, ITEM]}, "columnar"),
    ({"inputs": {"x": [ITEM, ITEM]}}, "columnar"),
])
def test_every_accepted_form_gives_the_batch(body: dict[str, Any], fmt: str) -> None:
    request = parse(json_body(body))
    assert request.format == fmt and request.batch_size == 2
    assert same_bits(request.batch, np.array([ITEM, ITEM], dtype=np.float32))


BAD: list[tuple[str, bytes, type[GatewayError], str]] = [
    ("not json", b"instances", InvalidRequest, "not valid JSON"),
    ("not an object", b"[1]", InvalidRequest, "a JSON object with \"instances\" or \"inputs\""),
    ("both formats", json_body({"instances": [ITEM], "inputs": [ITEM]}), InvalidRequest, "exactly one of"),
    ("neither format", json_body({"signature_name": "serving_default"}), InvalidRequest, "exactly one of"),
    ("unknown field", json_body({"instances": [ITEM], "model": "m"}), InvalidRequest, "unknown field(s) ['model']"),
    ("other signature", json_body({"signature_name": "predict", "instances": [ITEM]}), InvalidRequest,
     "serving signature 'predict' not found; the only one is 'serving_default'"),
    ("b64 for numeric", json_body({"instances": [{"b64": base64.b64encode(b"abc").decode()}]}), InvalidRequest,
     "values are raw bytes (3 here), which need a DT_STRING input; this model's input 'x' is DT_FLOAT"),
    ("b64 named", json_body({"instances": [{"x": {"b64": "AAAA"}}]}), InvalidRequest, "need a DT_STRING input"),
    ("bad b64", json_body({"inputs": {"x": [{"b64": "%%%"}]}}), InvalidRequest, "bad base64"),
    ("other object", json_body({"instances": [[{"a": 1}, {"a": 2}], [{"a": 3}, {"a": 4}]]}), InvalidRequest,
     "a JSON object where a DT_FLOAT value belongs"),
    ("ragged instances", json_body({"instances": [ITEM, [[1, 2]]]}), InvalidRequest, "ragged nesting"),
    ("ragged item", json_body({"instances": [[[1, 2], [3]]]}), InvalidRequest, "ragged nesting"),
    ("empty instances", json_body({"instances": []}), InvalidRequest, "empty batch"),
    ("empty columnar", json_body({"inputs": []}), InvalidRequest, "empty batch"),
    ("instances not a list", json_body({"instances": {"y": 1}}), InvalidRequest, "must be a list"),
    ("batch above max", json_body({"instances": [ITEM] * 5}), InvalidRequest,
     "batch of 5 is above this model's limit of 4"),
    ("item shape", json_body({"instances": [[1, 2, 3]]}), InvalidRequest,
     "each item has shape [3], the model's 'x' wants [2, None]"),
    ("scalar columnar", json_body({"inputs": 3}), InvalidRequest, "a scalar where a batch"),
    ("unknown input name", json_body({"instances": [{"image": ITEM}]}), InvalidRequest,
     "unknown input(s) ['image']; model mnist's inputs: ['x']"),
    ("mixed named", json_body({"instances": [{"x": ITEM}, ITEM]}), InvalidRequest, "mix named"),
    ("string value", json_body({"instances": [[["1", 2], [3, 4]]]}), InvalidRequest, "got the string '1'"),
    ("overflow", json_body({"instances": [[[1e39, 2], [3, 4]]]}), InvalidRequest, "overflows DT_FLOAT"),
    ("bare NaN", b'{"instances": [[[NaN, 2], [3, 4]]]}', InvalidRequest, "bare NaN is not JSON"),
    ("bracket bomb", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", InvalidRequest,
     "nests 100001 levels of brackets, limit is 32"),
    ("too large", json_body({"instances": [ITEM] * 80_000}), RequestTooLarge, "limit is 1048576"),
]


@pytest.mark.parametrize(("case", "body", "exc", "message"), BAD, ids=[case[0] for case in BAD])
def test_bad_request_is_refused(case: str, body: bytes, exc: type[GatewayError], message: str) -> None:
    with pytest.raises(exc) as info:
        parse(body)
    assert message in info.value.message, info.value.message


TWO = ModelSignature("two", "1", (TensorSpec("x", "int32", (2,)), TensorSpec("z", "int32", ())),
                     (TensorSpec("y", "int32", ()),))


def test_two_inputs_named() -> None:
    request = parse(json_body({"instances": [{"x": [1, 2], "z": 3}, {"x": [4, 5], "z": 6}]}), TWO)
    assert same_bits(request.inputs["x"], np.array([[1, 2], [4, 5]], np.int32))
    assert same_bits(request.inputs["z"], np.array([3, 6], np.int32))
    with pytest.raises(InvalidRequest, match=r"missing input\(s\) \['z'\]"):
        parse(json_body({"instances": [{"x": [1, 2]}]}), TWO)
    with pytest.raises(InvalidRequest, match="name them"):
        parse(json_body({"inputs": [[1, 2]]}), TWO)
    with pytest.raises(InvalidRequest, match="disagree on the batch size"):
        parse(json_body({"inputs": {"x": [[1, 2]], "z": [1, 2]}}), TWO)
    with pytest.raises(InvalidRequest, match="out of range for DT_INT32"):
        parse(json_body({"inputs": {"x": [[1, 2**31]], "z": [1]}}), TWO)


def test_row_and_columnar_responses() -> None:
    y = np.array([[1, np.nan, 3], [np.inf, 5, -np.inf]], dtype=np.float32)
    row = parse(json_body({"instances": [ITEM, ITEM]}))
    body = tfserving.encode_predict_response(row, {"y": y})
    decoded = json.loads(body)  # valid JSON despite NaN/Inf
    assert list(decoded) == ["predictions"] and len(decoded["predictions"]) == 2
    assert same_bits(reference_values(sum(decoded["predictions"], []), "float32").reshape(2, 3), y)
    col = parse(json_body({"inputs": [ITEM, ITEM]}))
    decoded = json.loads(tfserving.encode_predict_response(col, {"y": y}))
    assert list(decoded) == ["outputs"]
    assert decoded["outputs"][0][1] == "NaN" and decoded["outputs"][1][2] == "-Infinity"


def test_multi_output_responses() -> None:
    sig = ModelSignature("m", "1", (TensorSpec("x", "int32", ()),),
                         (TensorSpec("a", "int32", ()), TensorSpec("b", "bool", (2,))))
    outs = {"a": np.array([1, 2], np.int32), "b": np.array([[True, False], [False, True]])}
    row = parse(json_body({"instances": [1, 2]}), sig)
    assert json.loads(tfserving.encode_predict_response(row, outs)) == {
        "predictions": [{"a": 1, "b": [True, False]}, {"a": 2, "b": [False, True]}]}
    col = parse(json_body({"inputs": [1, 2]}), sig)
    assert json.loads(tfserving.encode_predict_response(col, outs)) == {
        "outputs": {"a": [1, 2], "b": [[True, False], [False, True]]}}
    with pytest.raises(BadModelOutput, match="returned no output 'b'"):
        tfserving.encode_predict_response(col, {"a": outs["a"]})
    with pytest.raises(BadModelOutput, match="int64, the model declares int32"):
        tfserving.encode_predict_response(col, {**outs, "a": outs["a"].astype(np.int64)})


def test_model_status_and_metadata() -> None:
    assert tfserving.model_status("mnist", "1", "AVAILABLE") == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status = tfserving.model_status("mnist", "1", "UNAVAILABLE", "no provider serves mnist@1")
    assert status["model_version_status"][0]["status"] == {"error_code": "UNAVAILABLE",
                                                            "error_message": "no provider serves mnist@1"}
    meta = tfserving.model_metadata(signature_from_registry("m", "2", "float16", (None, 4), "uint8", ()))
    assert meta["model_spec"] == {"name": "m", "signature_name": "", "version": "2"}
    sd = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sd["method_name"] == "tensorflow/serving/predict"
    assert sd["inputs"]["x"]["dtype"] == "DT_HALF"
    assert [d["size"] for d in sd["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "-1", "4"]
    assert sd["outputs"]["y"] == {"dtype": "DT_UINT8", "tensor_shape": {"dim": [{"size": "-1", "name": ""}],
                                                                        "unknown_rank": False},
                                  "name": "serving_default_y:0"}
