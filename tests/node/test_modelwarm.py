"""Keeping models warm on a provider: the registry as a catalog, the model cache as the bids' warm view, prefetch;
a provider that prefetched a task's model bids warm, one that did not bids cold, and the client takes the warm one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import trio

from kernels.bundle import ModelBundle, encode_bundle, load_model_file, model_id
from ledger.transactions import RegisterModel, TensorSignature
from kernels.bymodel import make_model_spec
from ledger.state import TaskOutcome
from p2pgpu.blobaccess import BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.config import MODEL_WILDCARD
from p2pgpu.dataplane import DataPlaneError
from p2pgpu.market import ClientConfig, PricingPolicy, PublishBid, Report, decode_market_message
from p2pgpu.market.warmset import ColdReason, estimate_startup_seconds
from p2pgpu.modelcache import ModelCache
from p2pgpu.modelwarm import (CacheWarmView, LedgerModelCatalog, ModelPrefetcher, task_model_id, wanted_models)
from tests.kernels.helpers import dense_model
from tests.kernels.test_bundle import LAYERS, keras_file, standard_members, write_zip
from tests.market.sim import MarketSim
from tests.market.test_by_model import NO_AUDIT, by_model_runner, numpy_dense, register

CONFIG = ClientConfig(bid_window=4, exec_blocks=20, audit_rate_bps=0)


def _cache(root: Path, serve: dict[str, bytes]) -> ModelCache:
    store = BlobStore(root / "blobs")

    async def fetch(peer: str, blob_hash: bytes, max_bytes: int) -> bytes:
        if peer not in serve:
            raise DataPlaneError(f"{peer} does not hold it")
        store.put(serve[peer])
        return serve[peer]

    return ModelCache(store, BlobAccess(lambda task_id, address: None), fetch)


@pytest.fixture
def registered(tmp_path: Path):  # type: ignore[no-untyped-def]
    sim = MarketSim(providers=("p0", "p1"), clients=("c0", "c1"))
    bundle = load_model_file(keras_file(tmp_path))
    return sim, bundle, register(sim, bundle)


def test_the_catalog_reads_the_registry_with_the_owner_node_as_holder(registered) -> None:  # type: ignore[no-untyped-def]
    sim, bundle, ident = registered
    peers = {sim.address("c1"): "peer-owner"}
    catalog = LedgerModelCatalog(lambda: sim.chain.state, peers.get)
    info = catalog.lookup(ident)
    assert info is not None and list(catalog.model_ids()) == [ident]
    assert info.bundle_size == len(encode_bundle(bundle)) and info.royalty_per_unit == 9
    assert info.holders == ("peer-owner",)
    assert info.input_signature == (bundle.input.dtype, tuple(bundle.input.shape))
    assert LedgerModelCatalog(lambda: sim.chain.state, {}.get).lookup(ident).holders == ()  # type: ignore[union-attr]
    assert catalog.lookup(b"\x05" * 32) is None


def test_the_view_says_absent_then_on_disk_then_loaded(registered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim, bundle, ident = registered
    data = encode_bundle(bundle)
    cache = _cache(tmp_path, {"peer-owner": data})
    catalog = LedgerModelCatalog(lambda: sim.chain.state, {sim.address("c1"): "peer-owner"}.get)
    names = {b"by-model": ident, b"plain": None, b"unregistered": b"\x05" * 32}
    loaded: set[bytes] = set()
    view = CacheWarmView(cache, catalog, lambda task_id, spec_hash: names[task_id], loaded=loaded.__contains__)
    absent = view.startup(b"by-model", b"h")
    assert absent is not None and not absent.warm and absent.seconds > 0
    assert view.startup(b"plain", b"h") is None and view.startup(b"unregistered", b"h") is None
    trio.run(lambda: cache.bundle(ident, holders=["peer-owner"], max_bytes=len(data)))
    on_disk = view.startup(b"by-model", b"h")  # fetched and decoded, not yet in a worker: the load is still to pay
    assert on_disk is not None and not on_disk.warm and 0 < on_disk.seconds <= absent.seconds
    assert on_disk == estimate_startup_seconds(len(data), warm=False, on_disk=True)
    assert absent == estimate_startup_seconds(len(data), warm=False, on_disk=False)
    loaded.add(ident)  # a warm session holds it in a worker
    warm = view.startup(b"by-model", b"h")
    assert warm is not None and warm.warm and warm.seconds == 0.0


def _register(sim: MarketSim, bundle: ModelBundle, version: str) -> bytes:
    ident = model_id(bundle)
    body = RegisterModel(sender=sim.address("c1"), nonce=sim.chain.nonce("c1"), fee=NO_AUDIT.fee, model_id=ident,
                         name="dense", version=version, royalty_per_unit=1,
                         input=TensorSignature(dtype=bundle.input.dtype, shape=tuple(bundle.input.shape)),
                         output=TensorSignature(dtype=bundle.output.dtype, shape=tuple(bundle.output.shape)),
                         bundle_size=len(encode_bundle(bundle)))
    _, rejected = sim.chain.produce([sim.chain.sign("c1", body)])
    assert rejected == []
    return ident


def test_a_new_model_that_does_not_fit_beside_the_held_one_evicts_it(registered, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    sim, bundle, ident = registered
    other = load_model_file(write_zip(tmp_path / "other.keras", standard_members(weights=dense_model(4, LAYERS, 5)[1])))
    other_id = model_id(other)
    serve = {"peer-owner": encode_bundle(bundle)}
    cache = _cache(tmp_path, serve)
    catalog = LedgerModelCatalog(lambda: sim.chain.state, {sim.address("c1"): "peer-owner"}.get)
    kept: list[list[bytes]] = []
    busy: set[bytes] = set()
    budget = max(len(encode_bundle(bundle)), len(encode_bundle(other)))  # room for one of the two
    fetcher = ModelPrefetcher(cache, catalog, [other_id, ident], budget, in_use=lambda: set(busy),
                              keep_loaded=kept.append)
    caplog.set_level(logging.INFO)
    trio.run(fetcher.prefetch_once)  # the other model is not registered yet: ours is kept
    assert cache.held_sizes().keys() == {ident} and cache.store.is_pinned(ident) and kept[-1] == [ident]

    _register(sim, other, "2")
    serve["peer-owner"] = encode_bundle(other)
    busy.add(ident)  # a running task uses ours: it stays until the next plan
    plan = trio.run(fetcher.prefetch_once)
    assert plan.evict == (ident,) and fetcher.deferred == {ident, other_id} and cache.store.has(ident)
    assert cache.held_sizes().keys() == {ident}  # no room for the new one until ours is evicted
    assert "model_evict_deferred" in caplog.text and "model_fetch_deferred" in caplog.text

    busy.clear()
    plan = trio.run(fetcher.prefetch_once)
    assert plan.evict == (ident,) and fetcher.deferred == set()
    assert not cache.store.has(ident) and not cache.store.is_pinned(ident) and not cache.is_warm(ident)
    assert cache.held_sizes() == {other_id: len(encode_bundle(other))} and cache.evictions == 1
    assert kept[-1] == [other_id] and "model_evicted" in caplog.text


def test_evicting_a_model_this_node_also_pins_keeps_the_blob(registered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim, bundle, ident = registered
    data = encode_bundle(bundle)
    cache = _cache(tmp_path, {"peer-owner": data})
    trio.run(lambda: cache.bundle(ident, holders=["peer-owner"], max_bytes=len(data)))
    trio.run(lambda: cache.bundle(ident, holders=["peer-owner"], max_bytes=len(data)))  # one pin however often
    cache.store.pin(ident)  # the publisher's own pin (this node pushed the model)
    assert cache.evict(ident) and cache.store.has(ident) and cache.store.is_pinned(ident)
    cache.store.unpin(ident)
    assert not cache.store.is_pinned(ident) and not cache.evict(ident)  # not held any more


def test_the_prefetcher_fetches_what_fits_and_logs_each_model(registered, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    sim, bundle, ident = registered
    data = encode_bundle(bundle)
    unknown = b"\x05" * 32
    catalog = LedgerModelCatalog(lambda: sim.chain.state, {sim.address("c1"): "peer-owner"}.get)
    caplog.set_level(logging.INFO)

    nobody = ModelPrefetcher(_cache(tmp_path / "a", {}), catalog, [ident], 1 << 30)
    trio.run(nobody.prefetch_once)
    assert nobody.failed == {ident} and "model_prefetch_failed" in caplog.text

    cache = _cache(tmp_path / "b", {"peer-owner": data})
    fetcher = ModelPrefetcher(cache, catalog, [ident, unknown], 1 << 30)
    plan = trio.run(fetcher.prefetch_once)
    assert cache.is_warm(ident) and fetcher.failed == set() and "model_prefetched" in caplog.text
    assert plan.cold == ((unknown, ColdReason.UNREGISTERED),) and "model_cold" in caplog.text

    small = ModelPrefetcher(_cache(tmp_path / "c", {"peer-owner": data}), catalog, None, len(data) - 1)
    assert trio.run(small.prefetch_once).cold == ((ident, ColdReason.OVER_BUDGET),)
    assert not small.cache.is_warm(ident)


def test_configured_models_are_ids_in_order_or_the_wildcard() -> None:
    assert wanted_models([MODEL_WILDCARD], MODEL_WILDCARD) is None
    assert wanted_models(["ab" * 32, "cd" * 32], MODEL_WILDCARD) == [b"\xab" * 32, b"\xcd" * 32]
    assert not ModelPrefetcher(None, None, [], 0).enabled  # type: ignore[arg-type]


def test_a_provider_that_prefetched_the_model_bids_warm_and_the_client_takes_it(registered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim, bundle, ident = registered
    data = encode_bundle(bundle)
    peer_of = {sim.address("c1"): "peer-owner"}.get
    catalog = LedgerModelCatalog(lambda: sim.chain.state, peer_of)
    views = {}
    for name in ("p0", "p1"):
        cache = _cache(tmp_path / name, {"peer-owner": data})
        loaded = {ident} if name == "p1" else set()  # p1's warm pool holds the model in a worker
        views[name] = CacheWarmView(cache, catalog, lambda task_id, _h, n=name: task_model_id(sim.providers[n], task_id),
                                    loaded=loaded.__contains__)
        if name == "p1":
            trio.run(ModelPrefetcher(cache, catalog, [ident], 1 << 30).prefetch_once)
    seen: list = []
    sim.add_provider("p0", runner=by_model_runner(bundle, numpy_dense, seen), warm=views["p0"])  # cheaper, cold
    sim.add_provider("p1", runner=by_model_runner(bundle, numpy_dense, seen), warm=views["p1"],
                     pricing=PricingPolicy(margin_bps=4_000))
    sim.step()
    x = np.linspace(-1, 1, 3 * bundle.input.shape[-1], dtype=np.float32).reshape(3, -1)
    task = sim.submit("c0", make_model_spec(ident, {}, x), {"x": x}, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.closed)
    bids = {a.signed.bid.provider: a for a in sim.logs["p0"].of(PublishBid) + sim.logs["p1"].of(PublishBid)}
    starts = {p: decode_market_message(b.data).start for p, b in bids.items()}
    cold, warm = starts[sim.address("p0")], starts[sim.address("p1")]
    assert cold is not None and not cold.start.warm and cold.start.startup_seconds > 0
    assert warm is not None and warm.start.warm
    assert bids[sim.address("p0")].signed.bid.unit_price < bids[sim.address("p1")].signed.bid.unit_price
    assert task.chosen is not None and task.chosen.bid.provider == sim.address("p1")
    chose = [r.message for r in sim.logs["c0"].of(Report) if r.message.startswith("chose")]
    assert chose and chose[0].endswith(": warm")
    assert sim.chain.state.tasks[task.task_id].outcome == TaskOutcome.PAID
    assert model_id(bundle) == ident
