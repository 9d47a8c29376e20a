"""The model allowlist, checked in the caller's process without TensorFlow."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from kernels import (
    DisallowedLayer,
    DtypeMismatch,
    InputMismatch,
    MalformedModelConfig,
    ShapeMismatch,
    TensorTooLarge,
    check_model_config,
    make_spec,
    validate_inputs,
)
from kernels.models import config_to_array
from kernels.ops._keras import input_signature
from kernels.spec import validate_stream_items
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


# ----------------------------------------------------------------- stream items (per-item input signature)


def stream_job(config: dict | None = None) -> tuple[object, dict[str, np.ndarray]]:
    inputs, _ = dense_model(8, [(4, "relu")], seed=0)
    if config is not None:
        inputs["model"] = config_to_array(json.dumps(config))
    return make_spec("stream_infer", 1, {}, inputs), inputs


def test_stream_items_that_fit_the_model_input_pass_as_one_canonical_array() -> None:
    spec, inputs = stream_job()
    items = np.asfortranarray(np.ones((3, 8), np.float32))
    out = validate_stream_items(spec, inputs, items, max_items=3)
    assert out.flags.c_contiguous and out.shape == (3, 8)


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        (np.zeros((3, 7), np.float32), ShapeMismatch, r"item 0 .*shape \(7,\), but the model takes float32 items of "
                                                      r"shape \(8,\)"),
        (np.zeros((3, 2, 8), np.float32), ShapeMismatch, r"shape \(2, 8\)"),
        (np.zeros((3, 8), np.int32), DtypeMismatch, "item 0 .*dtype int32"),
        (np.zeros((3, 8), np.float64), DtypeMismatch, "dtype float64, but the model takes float32"),
        (np.zeros((0, 8), np.float32), InputMismatch, "no items"),
        (np.float32(1.0), InputMismatch, "one item per row"),
        (np.zeros((6, 8), np.float32), InputMismatch, "6 items but the task's cap is 5 units"),
        (np.vstack([np.zeros((3, 8)), [[0] * 7 + [np.inf]]]).astype(np.float32), InputMismatch,
         "item 3 holds NaN or infinite"),
    ],
)
def test_bad_stream_items_are_refused_naming_the_first_bad_item(items: np.ndarray, error: type, match: str) -> None:
    spec, inputs = stream_job()
    with pytest.raises(error, match=match):
        validate_stream_items(spec, inputs, items, max_items=5)


def test_stream_items_over_the_frame_limit_are_refused() -> None:
    spec, inputs = stream_job()
    with pytest.raises(TensorTooLarge, match="8 elements, over the stream limit of 4"):
        validate_stream_items(spec, inputs, np.zeros((2, 8), np.float32), max_item_elements=4)


def test_a_kernel_that_cannot_stream_refuses_items() -> None:
    a = np.ones((2, 2), np.float32)
    spec = make_spec("matmul", 1, {}, {"a": a, "b": a})
    with pytest.raises(InputMismatch, match="matmul v1 cannot serve a streaming session"):
        validate_stream_items(spec, {"a": a, "b": a}, np.ones((1, 2), np.float32))


def test_input_signature_is_read_from_keras_2_functional_and_built_configs() -> None:
    keras2 = sequential_config(8, [(4, "relu")])
    keras2["config"]["layers"][0]["config"] = {"batch_input_shape": [None, 8], "dtype": "float64", "name": "in"}
    assert input_signature(keras2) == ("float64", (8,))
    functional = sequential_config(8, [(4, "relu")])
    functional["class_name"] = "Functional"
    functional["config"]["input_layers"] = ["input_layer", 0, 0]
    functional["config"]["layers"] = functional["config"]["layers"][::-1]  # found by name, not position
    assert input_signature(functional) == ("float32", (8,))
    built = sequential_config(5, [(4, "relu")])
    del built["config"]["layers"][0]
    assert input_signature(built) == (None, (5,))
    built.pop("build_config")
    assert input_signature(built) == (None, None)
    # A model that does not declare its input: any float item passes here (the provider's model decides).
    spec, inputs = stream_job(built)
    assert validate_stream_items(spec, inputs, np.zeros((1, 3, 3), np.float64)).shape == (1, 3, 3)
