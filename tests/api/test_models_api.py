"""The model registry's routes over real sockets: push, list, look up by id / name / name@version, push status,
and each refusal with the project's error shape."""

from __future__ import annotations

import hashlib

from tests.api.conftest import MAX_BODY, Served
from tests.api.fake_node import ALICE
from tests.api.test_api import assert_error

BUNDLE = b"\x95" + b"bundle bytes" * 10
OCTETS = {"content-type": "application/octet-stream"}


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
