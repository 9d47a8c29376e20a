"""The gateway service over a fake registry and fake sessions: names resolve, big requests split, lanes are shared."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import trio

from ledger.modelnames import ModelRef
from ledger.state import ModelEntry
from ledger.transactions import TensorSignature
from p2pgpu.config import GatewayConfig
from p2pgpu.gateway.errors import ModelNotFound
from p2pgpu.gateway.lanes import LaneTarget
from p2pgpu.gateway.service import InferenceGateway
from tests.gateway.test_lanes import FakeSession, model


def entry(name: str, version: str, height: int, ident: int) -> ModelEntry:
    return ModelEntry(model_id=bytes([ident]) * 32, owner=b"\x09" * 20, name=name, version=version,
                      royalty_per_unit=1, input=TensorSignature("float32", (3,)),
                      output=TensorSignature("float32", (2,)), bundle_size=100, registered_height=height)


@dataclass
class FakeRegistry:
    models: dict[bytes, ModelEntry] = field(default_factory=dict)

    def add(self, e: ModelEntry) -> None:
        self.models[e.model_id] = e

    def find_model(self, ref: ModelRef) -> ModelEntry | None:
        if ref.model_id is not None:
            return self.models.get(ref.model_id)
        return self.get_model(ref.name, ref.version) if ref.name is not None else None

    def get_model(self, name: str, version: str | None = None) -> ModelEntry | None:
        found = sorted((m for m in self.models.values() if m.name == name and version in (None, m.version)),
                       key=lambda m: m.registered_height)
        return found[-1] if found else None


class CountingOpener:
    def __init__(self) -> None:
        self.opened: list[LaneTarget] = []
        self.sessions: list[FakeSession] = []

    async def __call__(self, target: LaneTarget, avoid: frozenset[bytes]) -> FakeSession:
        self.opened.append(target)
        await trio.sleep(0.5)
        session = FakeSession(len(self.sessions) + 1)
        self.sessions.append(session)
        return session


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add(entry("mnist", "1", 5, 1))
    reg.add(entry("mnist", "2", 9, 2))
    return reg


def test_names_versions_and_ids_resolve_through_the_registry(registry: FakeRegistry) -> None:
    gw = InferenceGateway(lambda: registry, CountingOpener(), GatewayConfig())  # type: ignore[arg-type,return-value]
    assert gw.resolve("mnist").version == "2"
    assert gw.resolve("mnist", "1").version == "1"
    assert gw.resolve((b"\x01" * 32).hex()).version == "1"
    assert gw.versions(gw.resolve("mnist")) == ["1", "2"]
    for name, version, match in [("mnist", "3", "no registered model mnist version 3"),
                                 ("resnet", None, "no registered model resnet"),
                                 ("Bad Name", None, "is not a model id")]:
        with pytest.raises(ModelNotFound, match=match):
            gw.resolve(name, version)


async def test_many_callers_of_one_model_share_one_lane_and_one_session(registry: FakeRegistry,
                                                                        autojump_clock: trio.abc.Clock) -> None:
    opener = CountingOpener()
    gw = InferenceGateway(lambda: registry, opener, GatewayConfig(max_batch_rows=8))  # type: ignore[arg-type,return-value]
    xs = [np.random.default_rng(i).standard_normal((1 + i % 20, 3)).astype(np.float32) for i in range(50)]
    out: list[np.ndarray | None] = [None] * len(xs)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        e = gw.resolve("mnist")

        async def one(i: int) -> None:
            out[i] = await gw.infer(e, xs[i])

        async with trio.open_nursery() as callers:
            for i in range(len(xs)):
                callers.start_soon(one, i)
        nursery.cancel_scope.cancel()
    for x, y in zip(xs, out, strict=True):
        assert y is not None
        np.testing.assert_array_equal(y, model(x))  # requests of 9-20 rows were split over items and joined
    assert len(opener.opened) == 1 and max(opener.sessions[0].items) <= 8


async def test_warm_models_get_a_session_before_any_request(registry: FakeRegistry,
                                                            autojump_clock: trio.abc.Clock) -> None:
    opener = CountingOpener()
    gw = InferenceGateway(lambda: registry, opener, GatewayConfig(warm_models=("mnist@1",)))  # type: ignore[arg-type,return-value]
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        assert gw.status(gw.resolve("mnist", "1")).state == "LOADING"
        await trio.sleep(1.0)
        assert [t.label for t in opener.opened] == ["mnist@1"]
        assert gw.status(gw.resolve("mnist", "1")).state == "AVAILABLE"
        nursery.cancel_scope.cancel()
