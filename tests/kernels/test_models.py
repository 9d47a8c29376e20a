"""The model allowlist, checked in the caller's process without TensorFlow."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from kernels import DisallowedLayer, MalformedModelConfig, check_model_config, make_spec, validate_inputs
from kernels.models import config_to_array
from tests.kernels.helpers import dense_model, sequential_config


def cfg() -> dict:
    return sequential_config(4, [(3, "relu"), (2, "softmax")])


def test_allowlisted_config_passes() -> None:
    parsed = check_model_config(json.dumps(cfg()))
    assert parsed["class_name"] == "Sequential"


def test_lambda_layer_rejected() -> None:
    bad = cfg()
    bad["config"]["layers"].append({"module": "keras.layers", "class_name": "Lambda",
                                    "config": {"function": {"class_name": "__lambda__", "config": {"code": "x"}}},
                                    "registered_name": None})
    with pytest.raises(DisallowedLayer, match=r"layer 3 \(Lambda\) is not on the layer allowlist"):
        check_model_config(json.dumps(bad))


def test_custom_object_rejected() -> None:
    bad = cfg()
    bad["config"]["layers"][1]["registered_name"] = "Custom>MyDense"
    with pytest.raises(DisallowedLayer, match="registered_name 'Custom>MyDense'"):
        check_model_config(json.dumps(bad))
    bad = cfg()
    bad["config"]["layers"][1]["config"]["kernel_initializer"]["class_name"] = "MyInit"
    with pytest.raises(DisallowedLayer, match="object 'MyInit' is not on the allowlist"):
        check_model_config(json.dumps(bad))
    bad = cfg()
    bad["config"]["layers"][1]["module"] = "evil.layers"
    with pytest.raises(DisallowedLayer, match="module 'evil.layers'"):
        check_model_config(json.dumps(bad))


def test_serialized_function_activation_rejected() -> None:
    bad = cfg()
    bad["config"]["layers"][1]["config"]["activation"] = {
        "module": "builtins", "class_name": "function", "config": "my_act", "registered_name": "function"}
    with pytest.raises(DisallowedLayer, match="activation"):
        check_model_config(json.dumps(bad))
    bad = cfg()
    bad["config"]["layers"][2]["config"]["activation"] = "my_custom_act"
    with pytest.raises(DisallowedLayer, match="activation 'my_custom_act'"):
        check_model_config(json.dumps(bad))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a Sequential or Functional model"),
        (json.dumps({"class_name": "Sequential", "config": {}}).encode(), "no 'config.layers' list"),
        (json.dumps({"class_name": "Sequential", "config": {"layers": []}}).encode(), "has 0 layers"),
        (json.dumps({"class_name": "Sequential", "config": {"layers": [3]}}).encode(), "layer 0 is not"),
        (b'{"class_name": "Sequential", "config": {"layers": [], "x": NaN}}', "NaN"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64"),
        (b'{"class_name": "Sequential", "config": {"layers": ' + b"[" * 65 + b"]" * 65 + b"}}", "nested deeper"),
    ],
)
def test_malformed_config_rejected(text: bytes, match: str) -> None:
    with pytest.raises(MalformedModelConfig, match=match):
        check_model_config(text)


def test_bad_model_rejected_by_validate_inputs_before_any_worker() -> None:
    inputs, _ = dense_model(4, [(2, "relu")])
    bad = copy.deepcopy(sequential_config(4, [(2, "relu")]))
    bad["config"]["layers"][1]["class_name"] = "TFOpLambda"
    x = np.zeros((2, 4), np.float32)
    data = {**inputs, "model": config_to_array(json.dumps(bad)), "x": x}
    spec = make_spec("keras_infer", 1, {}, data)  # refs alone look fine
    with pytest.raises(DisallowedLayer, match="TFOpLambda"):
        validate_inputs(spec, data)


def test_weight_inputs_must_be_contiguous() -> None:
    from kernels import InputMismatch

    inputs, _ = dense_model(4, [(2, "relu")])
    inputs["weight_005"] = inputs.pop("weight_001")
    with pytest.raises(InputMismatch, match="no gaps"):
        make_spec("keras_infer", 1, {}, {**inputs, "x": np.zeros((2, 4), np.float32)})
