"""Bundles of files written by stock Keras: the keras_infer kernel on a bundle's inputs equals model.predict.

Keras (and TensorFlow) are imported in this test process on purpose, to
write real ``.keras`` and ``.h5`` files; the bundle code itself never
imports them (see test_bundle.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from kernels import DisallowedLayer, KernelRuntime, make_spec
from kernels.bundle import bundle_to_inputs, decode_bundle, encode_bundle, load_model_file, model_id

pytestmark = pytest.mark.slow

keras: Any = pytest.importorskip("keras")


def functional_model() -> Any:
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    a = keras.layers.Dense(5, activation="tanh")(x)
    b = keras.layers.Dense(5)(x)
    y = keras.layers.Dense(3, activation="softmax")(keras.layers.Add()([a, b]))
    model = keras.Model(inp, y)
    # non-trivial batch-norm statistics, so their order in the weights matters
    model.layers[2].set_weights([np.linspace(0.5, 1.5, 3), np.linspace(-0.2, 0.2, 3),
                                 np.linspace(-0.1, 0.3, 3), np.linspace(0.5, 2.0, 3)])
    return model


def sequential_model() -> Any:
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.1),
                              keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    model.fit(np.ones((4, 4), np.float32), np.ones((4, 2), np.float32), verbose=0)  # saves optimizer state too
    return model


@pytest.mark.parametrize("make", [functional_model, sequential_model])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
async def test_kernel_on_bundle_inputs_equals_model_predict(runtime: KernelRuntime, tmp_path: Path,
                                                            make: Any, suffix: str) -> None:
    model = make()
    path = tmp_path / f"model{suffix}"
    model.save(path)
    bundle = decode_bundle(encode_bundle(load_model_file(path)))
    item_shape = tuple(model.inputs[0].shape[1:])
    assert bundle.input.shape == item_shape
    assert bundle.output.shape == tuple(model.outputs[0].shape[1:])
    x = np.random.default_rng(0).standard_normal((5, *item_shape)).astype(np.float32)
    inputs = {**bundle_to_inputs(bundle), "x": x}
    spec = make_spec("keras_infer", 1, {}, inputs)
    with trio.fail_after(120):
        out = (await runtime.run(spec, inputs)).outputs
    np.testing.assert_allclose(out["y"], model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_same_model_saved_twice_has_one_id(tmp_path: Path) -> None:
    model = functional_model()
    model.save(tmp_path / "a.keras")
    model.save(tmp_path / "b.keras")  # another save time
    assert model_id(load_model_file(tmp_path / "a.keras")) == model_id(load_model_file(tmp_path / "b.keras"))


def test_stock_keras_file_with_a_lambda_layer_refused(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Lambda(lambda t: t * 2)])
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(DisallowedLayer, match="Lambda"):
        load_model_file(tmp_path / "lambda.keras")
