"""Tasks by model in the market simulation: the spec names a registered model, the provider runs its bundle, the
task settles PAID and the model's owner is paid its royalty; the bid commits to the model id."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels.bundle import ModelBundle, encode_bundle, load_model_file, model_id
from kernels.bymodel import expand_model_spec, make_model_spec
from kernels.jobspec import JobSpec
from ledger.params import BPS
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import RegisterModel, TensorSignature
from p2pgpu.market import Report, ResultReady
from tests.kernels.test_bundle import keras_file

from .sim import TEST_PARAMS, MarketSim
from .test_batch import NO_AUDIT

ROYALTY = 9


def register(sim: MarketSim, bundle: ModelBundle, owner: str = "c1", royalty: int = ROYALTY) -> bytes:
    ident = model_id(bundle)
    body = RegisterModel(sender=sim.address(owner), nonce=sim.chain.nonce(owner), fee=NO_AUDIT.fee, model_id=ident,
                         name="dense", version="1", royalty_per_unit=royalty,
                         input=TensorSignature(dtype=bundle.input.dtype, shape=tuple(bundle.input.shape)),
                         output=TensorSignature(dtype=bundle.output.dtype, shape=tuple(bundle.output.shape)),
                         bundle_size=len(encode_bundle(bundle)))
    _, rejected = sim.chain.produce([sim.chain.sign(owner, body)])
    assert rejected == []
    return ident


def numpy_dense(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in for the kernel on the expanded spec: the test bundle's Dense(relu) then Dense(softmax), in NumPy."""
    weights = [inputs[f"weight_{i:03d}"] for i in range(4)]
    h = np.maximum(inputs["x"] @ weights[0] + weights[1], 0)
    z = h @ weights[2] + weights[3]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return {"y": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}


def by_model_runner(bundle: ModelBundle, run: Any, seen: list[JobSpec]) -> Any:
    """The provider's part: expand the spec with the (cached) bundle, then run it."""
    def runner(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(spec)
        expanded, full = expand_model_spec(spec, bundle, inputs)
        return dict(run(expanded, full))
    return runner


def _run_by_model(tmp_path: Path, bundle: ModelBundle, run: Any) -> tuple[MarketSim, Any, np.ndarray, dict]:
    sim = MarketSim(providers=("p0",), clients=("c0", "c1"))
    ident = register(sim, bundle)
    seen: list[JobSpec] = []
    sim.add_provider("p0", runner=by_model_runner(bundle, run, seen))
    x = np.linspace(-1, 1, 3 * bundle.input.shape[-1], dtype=np.float32).reshape(3, -1)
    spec = make_model_spec(ident, {}, x)
    before = {n: sim.balance(n) for n in ("c0", "c1", "p0")}
    task = sim.submit("c0", spec, {"x": x}, max_unit_price=1_000, config=NO_AUDIT)
    sim.run_until(lambda: task.closed)
    assert seen and set(seen[0].input_dict()) == {"x"}  # the provider was handed no weights
    return sim, task, x, before


def test_a_task_by_model_settles_paid_and_pays_the_owner_its_royalty(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    sim, task, x, before = _run_by_model(tmp_path, bundle, numpy_dense)
    ledger_task = sim.task(task.task_id)
    assert ledger_task.status == TaskStatus.SETTLED and ledger_task.outcome == TaskOutcome.PAID
    assert ledger_task.model_id == model_id(bundle) and ledger_task.royalty_per_unit == ROYALTY
    price, fee = ledger_task.unit_price, NO_AUDIT.fee
    assert sim.balance("c1") == before["c1"] + ROYALTY  # the owner: one unit's royalty
    assert sim.balance("c0") == before["c0"] - price - ROYALTY - 2 * fee
    assert sim.balance("p0") == before["p0"] + price - price * TEST_PARAMS.protocol_fee_bps // BPS - fee
    (ready,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    np.testing.assert_allclose(ready.outputs["y"], numpy_dense(*expand_model_spec(task.spec, bundle, {"x": x}))["y"])
    assert sim.gossip_rejects == [] and sim.tx_rejects == []


def test_a_bid_commits_to_the_model_id() -> None:
    """The same terms with another (or no) model hash differently, so an Assign cannot swap the royalty's payee."""
    from ledger.transactions import task_terms_hash

    common = dict(kind=1, spec_hash=b"\x01" * 32, requirements=b"", units=1, exec_blocks=5)
    plain = task_terms_hash(**common)  # type: ignore[arg-type]
    assert task_terms_hash(**common, model_id=None) == plain  # type: ignore[arg-type]
    a, b = (task_terms_hash(**common, model_id=m) for m in (b"\x02" * 32, b"\x03" * 32))  # type: ignore[arg-type]
    assert len({plain, a, b}) == 3


@pytest.mark.slow
def test_a_task_by_a_stock_keras_model_equals_model_predict(tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    from kernels.registry import lookup

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    path = tmp_path / "dense.keras"
    model.save(path)
    bundle = load_model_file(path)
    kernel = lookup("keras_infer", 1)
    sim, task, x, _ = _run_by_model(tmp_path, bundle, kernel.run)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    (ready,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    np.testing.assert_allclose(ready.outputs["y"], model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_a_post_naming_another_model_than_its_spec_is_never_paid(tmp_path: Path) -> None:
    """A client whose PostTask names model B (another owner's royalty) while its spec runs model A gets no
    provider: the provider refuses the task (ledger and spec disagree) and an early bid's terms would not match."""
    from ledger.transactions import task_terms_hash
    from p2pgpu.market import ClientTask
    from p2pgpu.market.messages import encode_requirements
    from kernels.spec import encode_spec

    bundle = load_model_file(keras_file(tmp_path))
    sim = MarketSim(providers=("p0",), clients=("c0", "c1"))
    ident = register(sim, bundle)
    seen: list[JobSpec] = []
    sim.add_provider("p0", runner=by_model_runner(bundle, numpy_dense, seen))
    x = np.ones((2, 4), np.float32)
    spec = make_model_spec(ident, {}, x)
    fake = b"\x42" * 32  # a model id the spec does not name; registered under the same owner and royalty
    body = RegisterModel(sender=sim.address("c1"), nonce=sim.chain.nonce("c1"), fee=NO_AUDIT.fee, model_id=fake,
                         name="other", version="1", royalty_per_unit=ROYALTY,
                         input=TensorSignature("float32", (4,)), output=TensorSignature("float32", (2,)),
                         bundle_size=10)
    assert sim.chain.produce([sim.chain.sign("c1", body)])[1] == []
    task = ClientTask(key=sim.network.key("c0"), chain_id=sim.chain_id, spec=spec, post_nonce=sim.reserve_nonce("c0"),
                      max_unit_price=1_000, data_peer=b"peer-c0", config=NO_AUDIT, height=sim.chain.state.height,
                      providers=sim.chain.state.providers)
    task.model_id = fake  # the lie: posted with another model than the spec names
    task.terms_hash = task_terms_hash(kind=1, spec_hash=task.spec_hash, requirements=encode_requirements(
        spec.requirements), units=1, exec_blocks=NO_AUDIT.exec_blocks, model_id=fake)
    sim.clients[task.task_id] = ("c0", task)
    sim.inputs[task.task_id] = {"x": x}
    sim.specs[task.task_id] = encode_spec(spec)
    sim.route("c0", task.start())
    sim.drain()
    sim.run_until(lambda: task.closed)
    ledger_task = sim.task(task.task_id)
    assert ledger_task.model_id == fake and ledger_task.outcome != TaskOutcome.PAID
    assert seen == []  # nothing ran
    reports = [r.message for r in sim.logs["p0"].of(Report)]
    assert any("not the one its spec names" in m for m in reports), reports


def test_a_task_by_model_is_priced_by_the_registered_bundle_size(tmp_path: Path) -> None:
    """It carries no weights to count: the provider sizes it by the registry's bundle size."""
    from p2pgpu.market import PricingPolicy
    from p2pgpu.market.pricing import Quote, assess_task, bundle_weight_elements

    from .sim import CPU

    spec = make_model_spec(b"\x05" * 32, {}, np.ones((64, 4), np.float32))
    kw = dict(kind=1, units=1, max_unit_price=10**9, exec_blocks=10**6, capabilities=CPU, policy=PricingPolicy())
    small = assess_task(spec, **kw)  # type: ignore[arg-type]
    big = assess_task(spec, **kw, model_weight_elements=bundle_weight_elements(400 << 20))  # type: ignore[arg-type]
    assert isinstance(small, Quote) and isinstance(big, Quote)
    assert big.flops == 2.0 * (100 << 20) * 64 * PricingPolicy().model_factor and big.unit_price > small.unit_price
