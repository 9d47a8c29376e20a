"""Errors carry their protocol status and answer as {"error": ...}; signatures refuse what the codecs cannot carry."""

from __future__ import annotations

import json

import pytest

from p2pgpu.gateway.errors import (
    BadModelOutput,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    RequestTooLarge,
    UnsupportedMediaType,
    error_body,
)
from p2pgpu.gateway.signature import ModelSignature, TensorSpec, signature_from_registry
from p2pgpu.gateway.tensorjson import json_depth, loads_bounded


@pytest.mark.parametrize(("exc", "status"), [
    (InvalidRequest, 400), (ModelNotFound, 404), (ModelNotReady, 503), (RequestTooLarge, 413),
    (UnsupportedMediaType, 415), (BadModelOutput, 502),
])
def test_statuses_and_body(exc: type[GatewayError], status: int) -> None:
    error = exc("no provider serves \"m@1\" now: all 3 are busy")
    assert isinstance(error, GatewayError) and error.status == status
    assert json.loads(error_body(error)) == {"error": "no provider serves \"m@1\" now: all 3 are busy"}


def test_signature_from_registry_names_x_and_y() -> None:
    sig = signature_from_registry("m", "1.0", "float32", [28, None], "int64", [])
    assert sig.inputs == (TensorSpec("x", "float32", (28, None)),)
    assert sig.outputs == (TensorSpec("y", "int64", ()),)
    assert sig.inputs[0].matches((28, 5)) and not sig.inputs[0].matches((27, 5)) and not sig.inputs[0].matches((28,))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_dtype": "string"}, "dtype 'string' is not one of"),
    ({"input_shape": [-1]}, "bad dimension -1"),
    ({"output_shape": [1] * 9}, "9 dimensions, limit is 8"),
])
def test_signature_refuses_what_the_codecs_cannot_carry(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "m", "version": "1", "input_dtype": "float32", "input_shape": [2],
                               "output_dtype": "float32", "output_shape": [2], **kwargs}
    with pytest.raises(ValueError, match=message):
        signature_from_registry(**args)  # type: ignore[arg-type]


def test_duplicate_tensor_names_refused() -> None:
    spec = TensorSpec("x", "float32", ())
    with pytest.raises(ValueError, match="duplicate input names"):
        ModelSignature("m", "1", (spec, spec), (TensorSpec("y", "float32", ()),))


def test_brackets_inside_strings_do_not_count() -> None:
    bomb_in_string = json.dumps({"id": "[" * 10_000 + "\\\"[[", "v": [[1]]}).encode()
    assert json_depth(bomb_in_string) == 3
    assert loads_bounded(bomb_in_string, what="body", max_bytes=1 << 20)["v"] == [[1]]


def test_depth_limit_is_checked_before_parsing() -> None:
    with pytest.raises(InvalidRequest, match="nests 33 levels of brackets, limit is 32"):
        loads_bounded(b"[" * 33 + b"]" * 33, what="body", max_bytes=1 << 20)
    assert loads_bounded(b"[" * 32 + b"]" * 32, what="body", max_bytes=1 << 20) is not None
