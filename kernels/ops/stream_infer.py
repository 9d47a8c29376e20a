"""``stream_infer`` v1: a model loaded once, then items one at a time.

Param ``rows`` (default 0) says what an item is: 0, one sample of the
model's input shape (answered with one output); ``rows > 0``, a batch
``[n, *item_shape]`` of 1 to ``rows`` samples, answered ``[n, *out_shape]``
by one forward pass, so a client batching concurrent requests pays one unit
per batch. The spec carries ``rows``, so a provider prices a unit knowing it.
A disputed item is re-run as the batch it was (:func:`disputed_item_batch`).

As a batch job (``x`` given) it runs every row as its own item through one
loaded model -- the same path a streaming session takes -- and returns the
stacked outputs ``y``. A streaming session's spec omits ``x``: the model and
weights are the job, items arrive later (see ``kernels.runtime.StreamSession``).
Verification is ``keras_infer``'s: a CPU re-run within a relative tolerance.

By model: a spec whose ``model_id`` param names a registered model carries
no model inputs at all (and ``x`` only as a batch job or a disputed item's
re-run); the provider opens the session on the spec
:func:`kernels.bymodel.expand_model_spec` makes with the bundle. Its item
signature is then the registry's, checked by the client's node
(``registered_model_of``), so here it is any float item.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.errors import InputMismatch, ShapeMismatch
from kernels.jobspec import JobSpec
from kernels.kernel import ItemSignature, Kernel, Param, Verdict, check_params, compare_outputs, require_inputs
from kernels.models import check_model_config
from kernels.ops import _keras
from kernels.ops._tf import cpu_device
from kernels.ops.keras_infer import check_model_id_param

NAME = "stream_infer"
VERSION = 1
MAX_ROWS = 1 << 16
PARAMS: dict[str, Param] = {"model_id": Param(str, default=""), "rows": Param(int, default=0, lo=0, hi=MAX_ROWS)}


def item_rows(spec: JobSpec) -> int:
    """The spec's ``rows``: 0 for one-sample items, else the largest batch one item may hold."""
    rows: int = check_params(spec, PARAMS)["rows"]
    return rows


def disputed_item_batch(spec: JobSpec, item: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``x`` and claimed ``y`` a verifier re-runs a disputed item as: the item's own batch when ``rows > 0``,
    else a batch of one."""
    rows = spec.param_dict().get("rows", 0) if spec.kernel == NAME else 0
    if isinstance(rows, int) and rows > 0:
        return np.asarray(item), np.asarray(output)
    return np.asarray(item)[None, ...], np.asarray(output)[None, ...]


def validate(spec: JobSpec) -> None:
    p = check_params(spec, PARAMS)
    if p["model_id"]:
        check_model_id_param(p["model_id"])
        refs = require_inputs(spec, set(), {"x"})
    else:
        refs, _ = _keras.model_refs(spec, set(), optional={"x"})
    if "x" in refs:
        _keras.check_batch_input("x", refs["x"])


def validate_inputs(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    if "model" in inputs:  # a by-model spec's model is checked when its bundle is decoded
        _keras.check_config_input(inputs)


def item_signature(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> ItemSignature:
    """One item: a float tensor of the model's input shape (and its declared float dtype, if it declares one);
    with ``rows > 0`` a batch of 1 to ``rows`` such samples.

    Read from the model config alone, so a client's node can refuse a bad
    item before it posts the task and locks escrow. A by-model spec holds no
    config: any float item here, the registered shape at the client's node.
    """
    rows = item_rows(spec)
    if "model" not in inputs:
        return ItemSignature(dtypes=_keras.FLOAT_DTYPES, shape=None, max_rows=rows)
    dtype, shape = _keras.input_signature(check_model_config(inputs["model"]))
    dtypes = (dtype,) if dtype in _keras.FLOAT_DTYPES else _keras.FLOAT_DTYPES
    return ItemSignature(dtypes=dtypes, shape=shape, max_rows=rows)


class StreamModel:
    """The warm half of a session: the model and its traced forward pass."""

    def __init__(self, inputs: Mapping[str, np.ndarray], rows: int = 0) -> None:
        self.model, self.item_shape = _keras.load(inputs)
        self.rows = rows
        self.fn = _keras.forward_fn(self.model)
        self.loads = 1
        self.items = 0

    def infer(self, item: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        _keras.require_float("item", item)
        if self.rows > 0:  # a batch of 1..rows samples, one forward pass
            if item.ndim < 1 or not 1 <= item.shape[0] <= self.rows:
                raise ShapeMismatch(f"item: shape {tuple(item.shape)} is not a batch of 1 to {self.rows} rows")
            _keras.check_item_shape(self.item_shape, tuple(item.shape[1:]), "item rows")
            batch: Any = self.fn(tf.convert_to_tensor(item))
            self.items += 1
            return np.asarray(batch)
        _keras.check_item_shape(self.item_shape, tuple(item.shape), "item")
        out: Any = self.fn(tf.convert_to_tensor(item[None, ...]))
        self.items += 1
        first: np.ndarray = np.asarray(out)[0]
        return first


    def run_batch(self, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """What ``keras_infer.run`` returns for ``x`` with this model: the same checks and the same ``predict``."""
        _keras.check_item_shape(self.item_shape, tuple(x.shape[1:]), "input 'x' rows")
        return {"y": _keras.predict(self.model, x, batch_size)}


def run(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every row of ``x`` through one loaded model: one row per item, or ``rows`` rows per item."""
    rows = item_rows(spec)
    if "x" not in inputs:
        raise InputMismatch("stream_infer as a batch job needs an 'x' input (sessions send items instead)")
    session = StreamModel(inputs, rows)
    x = inputs["x"]
    _keras.check_item_shape(session.item_shape, tuple(x.shape[1:]), "input 'x' rows")
    if rows > 0:
        return {"y": np.concatenate([session.infer(x[i:i + rows]) for i in range(0, x.shape[0], rows)])}
    return {"y": np.stack([session.infer(x[i]) for i in range(x.shape[0])])}


def verify(spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray]) -> Verdict:
    if "x" not in inputs:
        raise InputMismatch("stream_infer verification needs the 'x' items")
    with cpu_device():
        model, _ = _keras.load(inputs)
        ref = {"y": _keras.predict(model, inputs["x"], 256)}
    tol = _keras.INFER_TOLERANCE.get(ref["y"].dtype.name, 1e-4)
    return compare_outputs(claimed, ref, tol)


KERNEL = Kernel(NAME, VERSION, validate, validate_inputs, run, verify, PARAMS, __doc__ or "",
                item_signature=item_signature)
