"""Tasks by model on a node: the client's refusals before anything is reserved (unknown model, rows of the wrong
shape), the royalty in what a submission costs, and the provider's model cache (holders in order, one fetch per
model, pinned and offered to any peer, a bundle that does not decode refused)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import trio

from kernels.bundle import encode_bundle, load_model_file, model_id
from kernels.bymodel import make_model_spec
from ledger.devtools import DevChain
from p2pgpu.api.types import NotFound, Unprocessable
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.clientservice import registered_model_of
from p2pgpu.dataplane import DataPlaneError
from p2pgpu.market.planner import SubmissionTerms, plan_submission
from p2pgpu.modelcache import ModelCache, ModelUnavailable, model_holders
from tests.kernels.test_bundle import keras_file
from tests.market.sim import MarketSim
from tests.market.test_by_model import register


@pytest.fixture
def registered(tmp_path: Path):  # type: ignore[no-untyped-def]
    sim = MarketSim(providers=("p0",), clients=("c0", "c1"))
    bundle = load_model_file(keras_file(tmp_path))
    return sim.chain, bundle, register(sim, bundle)


def test_a_spec_naming_a_registered_model_resolves_to_its_entry(registered) -> None:  # type: ignore[no-untyped-def]
    chain, bundle, ident = registered
    x = np.ones((2, 4), np.float32)
    entry = registered_model_of(make_model_spec(ident, {}, x), {"x": x}, chain.state)
    assert entry is not None and entry.model_id == ident and entry.royalty_per_unit == 9


def test_an_unknown_model_is_not_found_before_anything_is_posted(registered) -> None:  # type: ignore[no-untyped-def]
    chain, _, _ = registered
    x = np.ones((2, 4), np.float32)
    with pytest.raises(NotFound) as caught:
        registered_model_of(make_model_spec(b"\x07" * 32, {}, x), {"x": x}, chain.state)
    assert caught.value.code == "unknown_model"


def test_rows_of_the_wrong_shape_are_refused(registered) -> None:  # type: ignore[no-untyped-def]
    chain, _, ident = registered
    x = np.ones((2, 5), np.float32)
    with pytest.raises(Unprocessable) as caught:
        registered_model_of(make_model_spec(ident, {}, x), {"x": x}, chain.state)
    assert caught.value.code == "model_input_mismatch" and "(4)" in str(caught.value)


def test_a_stream_spec_naming_a_model_checks_its_items(registered) -> None:  # type: ignore[no-untyped-def]
    chain, _, ident = registered
    spec = make_model_spec(ident, {}, None, kernel="stream_infer")
    entry = registered_model_of(spec, {"items": np.ones((3, 4), np.float32)}, chain.state)
    assert entry is not None and entry.model_id == ident and entry.royalty_per_unit == 9
    with pytest.raises(Unprocessable) as caught:
        registered_model_of(spec, {"items": np.ones((3, 5), np.float32)}, chain.state)
    assert caught.value.code == "model_input_mismatch" and "'items'" in str(caught.value)


def test_a_spec_that_names_no_model_has_none(registered) -> None:  # type: ignore[no-untyped-def]
    from tests.market.sim import matmul_job

    chain, _, _ = registered
    spec, inputs = matmul_job()
    assert registered_model_of(spec, inputs, chain.state) is None


def test_the_royalty_is_part_of_what_a_submission_costs() -> None:
    terms = dict(limit_seconds=10.0, max_unit_price=100, units=3, bid_window=4, audit_rate_bps=0)
    chain = DevChain(MarketSim().network)
    kw = dict(available=10**9, block_seconds=1.0, enough_bids=1, max_wait_blocks=5)
    plain = plan_submission(SubmissionTerms(**terms), chain.state.params, **kw)  # type: ignore[arg-type]
    by_model = plan_submission(SubmissionTerms(**terms, royalty_per_unit=7), chain.state.params, **kw)  # type: ignore[arg-type]
    assert by_model.cost - plain.cost == 7 * 3


# ------------------------------------------------------------------ the provider's model cache


def test_holders_are_the_client_then_the_owner_connected_only() -> None:
    peers = {b"c": "peer-c", b"o": "peer-o"}
    assert model_holders(b"c", b"o", peers.get) == ["peer-c", "peer-o"]
    assert model_holders(b"x", b"o", peers.get) == ["peer-o"]
    assert model_holders(b"c", b"c", peers.get) == ["peer-c"]
    assert model_holders(b"x", None, peers.get) == []
    peers[b"p"] = "peer-p"
    assert model_holders(b"c", b"o", peers.get, provider=b"p") == ["peer-c", "peer-o", "peer-p"]


def _cache(tmp_path: Path, serve: dict[str, bytes]) -> tuple[ModelCache, BlobStore, BlobAccess, list[str]]:
    store = BlobStore(tmp_path / "blobs")
    access = BlobAccess(lambda task_id, address: None)
    asked: list[str] = []

    async def fetch(peer: str, blob_hash: bytes, max_bytes: int) -> bytes:
        asked.append(peer)
        if peer not in serve:
            raise DataPlaneError(f"{peer} does not hold it")
        data = serve[peer]
        assert len(data) <= max_bytes
        store.put(data)  # as the data plane does: into the store, hash-checked
        return data

    return ModelCache(store, access, fetch), store, access, asked


def test_the_cache_fetches_from_the_first_holder_that_has_it_once_pins_and_serves(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    data, ident = encode_bundle(bundle), model_id(bundle)
    cache, store, access, asked = _cache(tmp_path, {"owner": data})

    async def main() -> None:
        async with trio.open_nursery() as nursery:  # concurrent jobs share one fetch
            for _ in range(3):
                nursery.start_soon(lambda: cache.bundle(ident, holders=["client", "owner"], max_bytes=len(data)))
        got = await cache.bundle(ident, holders=["client", "owner"], max_bytes=len(data))
        assert model_id(got) == ident

    trio.run(main)
    assert asked == ["client", "owner"] and cache.fetches == 1
    assert store.is_pinned(ident) and ANY_PEER in access.allowed[ident]


def test_no_holder_or_a_bad_bundle_is_model_unavailable(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    ident = model_id(bundle)
    cache, _, _, _ = _cache(tmp_path, {})
    with pytest.raises(ModelUnavailable, match="does not hold it"):
        trio.run(lambda: cache.bundle(ident, holders=["client"], max_bytes=1 << 20))
    with pytest.raises(ModelUnavailable, match="no holder is connected"):
        trio.run(lambda: cache.bundle(ident, holders=[], max_bytes=1 << 20))
    junk = b"not a bundle"
    cache, _, _, _ = _cache(tmp_path / "2", {"client": junk})
    with pytest.raises(ModelUnavailable, match="not the bundle"):  # bytes that are not the id's: refused unread
        trio.run(lambda: cache.bundle(ident, holders=["client"], max_bytes=1 << 20))
    junk_id = hashlib.sha256(junk).digest()  # the id's own bytes, which are no bundle
    with pytest.raises(ModelUnavailable, match="does not decode"):
        trio.run(lambda: cache.bundle(junk_id, holders=["client"], max_bytes=1 << 20))
