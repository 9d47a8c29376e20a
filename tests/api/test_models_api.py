"""The model registry's routes over real sockets: push, list, look up by id / name / name@version, push status,
and each refusal with the project's error shape."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from kernels.bymodel import make_model_spec
from p2pgpu.api.types import SubmitRequest, encode_submit, encode_submit_batch
from tests.api.conftest import MAX_BODY, Served
from tests.api.fake_node import ALICE
from tests.api.test_api import assert_error

BUNDLE = b"\x95" + b"bundle bytes" * 10
OCTETS = {"content-type": "application/octet-stream"}
MSGPACK_HEADERS = {"content-type": "application/msgpack"}


async def test_push_then_list_and_look_up(served: Served) -> None:
    resp = await served.client.post("/models", params={"name": "mnist", "version": "1", "royalty": "3"},
                                    content=BUNDLE, headers=OCTETS)
    assert resp.status_code == 202, resp.text
    mid = hashlib.sha256(BUNDLE).hexdigest()
    assert resp.json() == {"model_id": mid, "name": "mnist", "version": "1", "royalty_per_unit": 3,
                           "status": "pending", "height": None, "detail": ""}
    assert resp.headers["location"] == f"/models/{mid}"
    status = (await served.client.get(f"/models/{mid}")).json()
    assert status["status"] == "registered" and status["height"] == served.node.height
    listed = (await served.client.get("/ledger/models")).json()["models"]
    assert [m["model_id"] for m in listed] == [mid]
    model = listed[0]
    assert model["owner"] == ALICE.hex() and model["input"] == {"dtype": "float32", "shape": [None, 4]}
    for ref in (mid, "mnist", "mnist@1"):
        assert (await served.client.get(f"/ledger/models/{ref}")).json() == model


async def test_lookups_refused_with_their_codes(served: Served) -> None:
    assert_error(await served.client.get("/ledger/models/mnist"), 404, "unknown_model")
    assert_error(await served.client.get("/ledger/models/Not%20A%20Name"), 400, "bad_model_ref")
    assert_error(await served.client.get("/ledger/models/mnist@"), 400, "bad_model_ref")
    assert_error(await served.client.get("/models/abc"), 400, "bad_model_id")
    assert_error(await served.client.get("/models/" + "00" * 32), 404, "unknown_model")


async def test_push_refusals(served: Served) -> None:
    post = served.client.post
    assert_error(await post("/models", params={"name": "m"}, content=BUNDLE, headers={"content-type": "text/plain"}),
                 415, "wrong_content_type")
    assert_error(await post("/models", content=BUNDLE, headers=OCTETS), 400, "bad_model_name")
    assert_error(await post("/models", params={"name": "m", "royalty": "-1"}, content=BUNDLE, headers=OCTETS),
                 400, "bad_royalty")
    assert_error(await post("/models", params={"name": "m"}, content=b"junk", headers=OCTETS), 422, "bad_bundle")
    assert_error(await post("/models", params={"name": "m"}, content=b"\x95" * (MAX_BODY + 1), headers=OCTETS),
                 413, "body_too_large")
    served.node.balances[ALICE] = 0
    assert_error(await post("/models", params={"name": "m"}, content=BUNDLE, headers=OCTETS), 402,
                 "insufficient_funds")
    assert served.node.model_pushes == []


async def test_warm_providers_of_a_model_best_first(served: Served) -> None:
    from p2pgpu.api.types import WarmProviderView

    await served.client.post("/models", params={"name": "mnist"}, content=BUNDLE, headers=OCTETS)
    mid = hashlib.sha256(BUNDLE).digest()
    assert (await served.client.get("/ledger/models/mnist/providers")).json() == {
        "model_id": mid.hex(), "height": served.node.height, "providers": []}
    served.node.warm[mid] = [WarmProviderView(b"\x07" * 20, "12D3KooWpeer", 2, 40, 3.5, 9, 120)]
    for ref in ("mnist", "mnist@1", mid.hex()):
        answer = (await served.client.get(f"/ledger/models/{ref}/providers")).json()
        assert answer["providers"] == [{"provider": "07" * 20, "peer": "12D3KooWpeer", "free_slots": 2,
                                        "unit_price": 40, "advert_age_s": 3.5, "sequence": 9, "expiry_height": 120}]
    assert_error(await served.client.get("/ledger/models/other/providers"), 404, "unknown_model")
    assert_error(await served.client.get("/ledger/models/Bad%20Ref/providers"), 400, "bad_model_ref")


def _by_name_submission(ref: str) -> bytes:
    """A keras_infer task whose spec names its model by ``ref`` (a name, not an id) in the ``model_id`` param."""
    x = np.ones((2, 4), np.float32)
    spec = make_model_spec(b"\x01" * 32, {}, x)
    named = dataclasses.replace(spec, params=tuple((k, ref if k == "model_id" else v) for k, v in spec.params))
    return encode_submit(SubmitRequest(spec=named, inputs={"x": x}, max_unit_price=10))


async def test_a_task_may_name_its_model_by_name_or_name_at_version(served: Served) -> None:
    await served.client.post("/models", params={"name": "mnist", "version": "1"}, content=BUNDLE, headers=OCTETS)
    mid = hashlib.sha256(BUNDLE).hexdigest()
    for ref in ("mnist", "mnist@1"):
        resp = await served.client.post("/tasks", content=_by_name_submission(ref), headers=MSGPACK_HEADERS)
        assert resp.status_code == 201, resp.text
        assert served.node.submitted[-1].spec.param_dict()["model_id"] == mid  # the task commits to the id
    batch = encode_submit_batch([_by_name_submission("mnist@1"), _by_name_submission("nope@1")])
    results = (await served.client.post("/tasks/batch", content=batch, headers=MSGPACK_HEADERS)).json()["results"]
    assert "task_id" in results[0] and results[1]["error"] == "unknown_model"


async def test_an_unknown_or_malformed_model_name_is_refused_before_anything_is_posted(served: Served) -> None:
    post = served.client.post
    assert_error(await post("/tasks", content=_by_name_submission("mnist@2"), headers=MSGPACK_HEADERS),
                 404, "unknown_model")
    assert_error(await post("/tasks", content=_by_name_submission("Not A Name"), headers=MSGPACK_HEADERS),
                 422, "bad_model_ref")
    assert served.node.submitted == []
