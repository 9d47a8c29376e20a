"""Tasks by model: a keras_infer spec naming a model id carries only ``x``; the provider expands it with the bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels.bundle import bundle_to_inputs, load_model_file, model_id
from kernels.bymodel import expand_model_spec, make_model_spec, spec_model_id
from kernels.errors import InputMismatch, InvalidParams
from kernels.spec import make_spec, spec_hash, validate_inputs
from tests.kernels.test_bundle import keras_file


def _x(bundle) -> np.ndarray:  # type: ignore[no-untyped-def]
    shape = tuple(d or 1 for d in bundle.input.shape)
    return np.ones((3, *shape), dtype=np.float32)


def test_a_by_model_spec_names_the_id_and_carries_only_x(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    spec = make_model_spec(model_id(bundle), {}, _x(bundle))
    assert spec.input_dict().keys() == {"x"}
    assert spec_model_id(spec) == model_id(bundle)
    other = make_model_spec(bytes(32), {}, _x(bundle))
    assert spec_hash(other) != spec_hash(spec)  # the id is part of what a bid commits to


def test_a_spec_that_carries_its_model_names_none(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    spec = make_spec("keras_infer", 1, {}, {**bundle_to_inputs(bundle), "x": _x(bundle)})
    assert spec_model_id(spec) is None


@pytest.mark.parametrize("bad", ["ab", "A" * 64, "g" * 64])
def test_a_malformed_model_id_param_is_refused(bad: str) -> None:
    with pytest.raises(InvalidParams, match="model_id"):
        make_spec("keras_infer", 1, {"model_id": bad}, {"x": np.ones((2, 3), np.float32)})


def test_a_by_model_spec_with_weights_beside_it_is_refused(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    with pytest.raises(InputMismatch):
        make_spec("keras_infer", 1, {"model_id": model_id(bundle).hex()},
                  {**bundle_to_inputs(bundle), "x": _x(bundle)})


def test_expansion_gives_todays_spec_and_refuses_another_bundle(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    x = _x(bundle)
    spec = make_model_spec(model_id(bundle), {"batch_size": 2}, x, seconds=30.0)
    expanded, inputs = expand_model_spec(spec, bundle, {"x": x})
    today = make_spec("keras_infer", 1, {"batch_size": 2}, {**bundle_to_inputs(bundle), "x": x}, seconds=30.0)
    assert spec_hash(expanded) == spec_hash(today)
    validate_inputs(expanded, inputs)
    other = make_model_spec(bytes(32), {}, x)
    with pytest.raises(InputMismatch, match="not the model"):
        expand_model_spec(other, bundle, {"x": x})


# ------------------------------------------------------------------ stream_infer by model (a stream task)


def test_a_by_model_stream_spec_names_the_id_and_carries_no_inputs(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    spec = make_model_spec(model_id(bundle), {}, None, kernel="stream_infer", seconds=30.0)
    assert spec.kernel == "stream_infer" and spec.input_dict() == {}
    assert spec_model_id(spec) == model_id(bundle)
    batch = make_model_spec(model_id(bundle), {}, _x(bundle))
    assert spec_hash(batch) != spec_hash(spec)


def test_a_by_model_stream_spec_with_weights_or_a_bad_id_is_refused(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    with pytest.raises(InputMismatch):
        make_spec("stream_infer", 1, {"model_id": model_id(bundle).hex()}, bundle_to_inputs(bundle))
    with pytest.raises(InvalidParams, match="model_id"):
        make_spec("stream_infer", 1, {"model_id": "AB" * 32}, {})
    with pytest.raises(InvalidParams, match="cannot name a model"):
        make_model_spec(model_id(bundle), {}, _x(bundle), kernel="matmul")


def test_a_by_model_stream_spec_takes_any_float_item_until_its_node_checks_the_registry(tmp_path: Path) -> None:
    from kernels.spec import validate_stream_items

    bundle = load_model_file(keras_file(tmp_path))
    spec = make_model_spec(model_id(bundle), {}, None, kernel="stream_infer")
    items = validate_stream_items(spec, {}, np.ones((3, 5), np.float32), max_items=3)
    assert items.shape == (3, 5)
    with pytest.raises(InputMismatch):
        validate_stream_items(spec, {}, np.ones((3, 5), np.float32), max_items=2)


def test_stream_expansion_gives_todays_session_spec_and_a_disputed_items_rerun(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    spec = make_model_spec(model_id(bundle), {}, None, kernel="stream_infer", seconds=30.0)
    expanded, inputs = expand_model_spec(spec, bundle, {})
    today = make_spec("stream_infer", 1, {}, bundle_to_inputs(bundle), seconds=30.0)
    assert spec_hash(expanded) == spec_hash(today)
    validate_inputs(expanded, inputs)
    # A verifier's re-run of a disputed item: the item joins as "x" beside the bundle.
    x = _x(bundle)[:1]
    rerun, rerun_inputs = expand_model_spec(make_spec("stream_infer", 1, {"model_id": model_id(bundle).hex()},
                                                      {"x": x}, seconds=30.0), bundle, {"x": x})
    assert spec_hash(rerun) == spec_hash(make_spec("stream_infer", 1, {}, {**bundle_to_inputs(bundle), "x": x},
                                                   seconds=30.0))
    assert set(rerun_inputs) == {*bundle_to_inputs(bundle), "x"}
