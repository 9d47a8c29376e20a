"""Wire forms of the API without a server: submission and result codecs, hex parsing, JSON rendering."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import pytest

from ledger.codec import encode
from p2pgpu.api.models import TaskViewOut
from p2pgpu.api.types import (
    BadRequest,
    NotFound,
    PaymentRequired,
    SubmitRequest,
    SubmitTaskWire,
    TaskView,
    Unprocessable,
    decode_result,
    decode_submit,
    encode_result,
    encode_submit,
    error_from_status,
    parse_address,
    parse_task_id,
    task_view_json,
    to_jsonable,
)
from tests.api.fake_node import FakeNode, matmul_job, stream_job


def test_submission_round_trip_stream_kind() -> None:
    spec, inputs, items = stream_job(4)
    req = decode_submit(encode_submit(SubmitRequest(spec, {**inputs, "items": items}, 3, units=50, bid_window=2,
                                                    audit_rate_bps=0, kind="stream")))
    assert (req.kind, req.units, req.max_unit_price, req.audit_rate_bps) == ("stream", 50, 3, 0)
    # The items ride beside the spec's inputs: the spec names only the model.
    assert req.spec == spec and sorted(req.inputs) == sorted([*inputs, "items"]) and "items" not in spec.input_dict()
    np.testing.assert_array_equal(req.inputs["items"], items)


@pytest.mark.parametrize(
    ("change", "error", "code", "match"),
    [
        ({"items": None}, Unprocessable, "invalid_items", "a stream task needs its items"),
        ({"items": np.zeros((4, 7), np.float32)}, Unprocessable, "invalid_items",
         r"ShapeMismatch: item 0 .*shape \(7,\), but the model takes float32 items of shape \(8,\)"),
        ({"items": np.ones((4, 8), np.float16)}, Unprocessable, "invalid_items", "DtypeMismatch: item 0"),
        ({"items": np.array([[0.0] * 8, [0.0] * 7 + [np.nan]], np.float32)}, Unprocessable, "invalid_items",
         "item 1 holds NaN"),
        ({"units": 3}, Unprocessable, "invalid_items", "4 items but the task's cap is 3 units"),
    ],
)
def test_stream_submission_items_are_checked_against_the_model(change: dict, error: type, code: str,
                                                               match: str) -> None:
    spec, inputs, items = stream_job(4)
    terms = {"units": 10, **{k: v for k, v in change.items() if k != "items"}}
    rows = change.get("items", items)
    req = SubmitRequest(spec, {**inputs, **({"items": rows} if rows is not None else {})}, 3, kind="stream",
                        **terms)
    with pytest.raises(error, match=match) as caught:
        decode_submit(encode_submit(req))
    assert caught.value.code == code


def test_items_of_a_batch_task_are_an_unexpected_input() -> None:
    spec, inputs = matmul_job()
    with pytest.raises(Unprocessable, match=r"unexpected \['items'\]"):
        decode_submit(encode_submit(SubmitRequest(spec, {**inputs, "items": np.ones((2, 2), np.float32)}, 3)))


def test_a_kernel_that_cannot_stream_is_refused_as_a_stream_task() -> None:
    spec, inputs = matmul_job()
    with pytest.raises(Unprocessable, match="matmul v1 cannot serve a streaming session"):
        decode_submit(encode_submit(SubmitRequest(spec, {**inputs, "items": np.ones((2, 2), np.float32)}, 3,
                                                  units=2, kind="stream")))


def test_unknown_kind_code_is_malformed() -> None:
    spec, inputs = matmul_job()
    body = encode(SubmitTaskWire(spec, tuple(sorted(inputs.items())), 3, 1, 2, 0, 9))
    with pytest.raises(BadRequest, match="kind: 9"):
        decode_submit(body)


def test_disallowed_tensor_refused_by_name() -> None:
    spec, inputs = matmul_job()
    with pytest.raises(Unprocessable, match="inputs"):
        encode_submit(SubmitRequest(spec, {**inputs, "a": np.array(["x"])}, 3))


def test_result_round_trip() -> None:
    out = {"c": np.arange(4, dtype=np.int32).reshape(2, 2)}
    wire = decode_result(encode_result(b"\x01" * 32, out))
    np.testing.assert_array_equal(dict(wire.outputs)["c"], out["c"])
    with pytest.raises(BadRequest, match="malformed result"):
        decode_result(b"\x90")


def test_hex_parsing() -> None:
    assert parse_address("0x" + "AB" * 20) == b"\xab" * 20
    with pytest.raises(BadRequest, match="21 bytes; expected 20"):
        parse_address("ab" * 21)
    with pytest.raises(BadRequest) as info:
        parse_task_id("zz")
    assert info.value.code == "bad_task_id"


async def test_task_view_json_round_trip() -> None:
    node = FakeNode()
    spec, inputs = matmul_job()
    task_id = await node.submit_task(SubmitRequest(spec, inputs, 3))
    for _ in range(5):
        view = await node.task(task_id)
    assert TaskView.from_json(task_view_json(view)) == view
    with pytest.raises(BadRequest, match="stage"):
        TaskView.from_json({**task_view_json(view), "stage": "flying"})


def test_to_jsonable() -> None:
    class Color(enum.IntEnum):
        DARK_RED = 1

    assert to_jsonable({"c": Color.DARK_RED, "b": b"\x01", "t": (1, 2), "n": np.int64(3)}) == {
        "c": "dark_red", "b": "01", "t": [1, 2], "n": 3}
    with pytest.raises(TypeError, match="msgpack"):
        to_jsonable(np.zeros(2))


def test_error_from_status() -> None:
    err = error_from_status(404, "unknown_task", "no task")
    assert isinstance(err, NotFound) and err.code == "unknown_task" and err.message == "no task"
    assert error_from_status(599, "x", "y").status == 500
    funds = error_from_status(402, "insufficient_funds", "balance 3 cannot cover escrow and fee 12")
    assert isinstance(funds, PaymentRequired) and PaymentRequired("x").code == "insufficient_funds"


def test_a_task_view_by_model_round_trips_its_model_name_start_and_royalty() -> None:
    view = TaskView(task_id=b"\x07" * 32, stage="settled", provider=b"\x02" * 20, unit_price=5, outcome="paid",
                    model_id=b"\x01" * 32, royalty_per_unit=3, model_name="dense", model_version="1",
                    start_warm=True, startup_seconds=0.0, royalty_paid=3)
    wire = task_view_json(view)
    assert (wire["model_name"], wire["model_version"], wire["start_warm"], wire["royalty_paid"]) == ("dense", "1",
                                                                                                    True, 3)
    assert TaskView.from_json(wire) == view
    cold = dataclasses.replace(view, start_warm=False, startup_seconds=2.1, royalty_paid=0)
    assert TaskView.from_json(task_view_json(cold)) == cold
    assert TaskViewOut.model_validate(task_view_json(cold)).start_warm is False  # the published answer model has them
