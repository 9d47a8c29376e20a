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
