"""Models on real node processes: push a stock Keras model, a provider fetches it, a task by model id pays the owner.

A devnet of 1 validator, 1 provider and 2 clients. c0 pushes a small stock
Keras model with ``p2pgpu model push`` (the real CLI, in its own process), so
c0 owns it; the validator's registry shows it. c1 then runs
``p2pgpu submit --model NAME --input x=X.npy``: the task names the model by
id and carries only ``x``; the provider fetches the bundle from a holder
(c1 has none, so the owner's node c0) over the data plane, runs it, and the
task settles PAID. The result is ``model.predict(x)``, and c0's balance grew
by exactly the royalty while it sent nothing. A file with a ``Lambda`` layer
is refused by the CLI (exit 2, naming Lambda) before anything reaches the
node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devnet.demo import wait_providers_ready
from devnet.launcher import DevnetSpec
from kernels.bundle import load_model_file, model_id
from ledger.params import Params
from p2pgpu.config import ClientConfig, ProviderConfig

from .conftest import TrackedDevnet, devnet_processes
from .helpers import account, get_json, height, live, on_every_node, run_cli, task_view, wait_settled, wait_until

pytestmark = pytest.mark.slow

ROYALTY = 7
NAME = "dense-e2e"
PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=60, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
SPEC = DevnetSpec(
    validators=1, providers=1, clients=2, block_interval=0.5, params=PARAMS,
    provider_configs={"p0": ProviderConfig(device="cpu", unit_cost=10)},
    client_config=ClientConfig(enough_bids=1),
)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedDevnet]:
    with devnet_processes(tmp_path_factory.mktemp("models") / "devnet", SPEC) as devnet:
        devnet.wait_finalized(2, timeout=120)
        yield devnet


def _stock_model(keras: Any) -> Any:
    keras.utils.set_random_seed(15)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])


def test_a_pushed_model_is_registered_fetched_run_by_id_and_pays_its_owner(
        net: TrackedDevnet, tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    model = _stock_model(keras)
    path = tmp_path / "dense.keras"
    model.save(path)
    ident = model_id(load_model_file(path))
    validator, owner, submitter = (net.manifest.node(n) for n in ("v0", "c0", "c1"))

    pushed = run_cli("model", "push", str(path), "--name", NAME, "--royalty", str(ROYALTY),
                     "--api", owner.api_url, "--timeout", "240", timeout=300)
    assert pushed.returncode == 0, (pushed.returncode, pushed.stdout, pushed.stderr)
    printed = re.search(r"^id ([0-9a-f]{64})$", pushed.stdout, re.MULTILINE)
    assert printed is not None and printed.group(1) == ident.hex(), pushed.stdout

    # another node's view of the registry: the validator's
    entry = wait_until(lambda: get_json(validator, f"/ledger/models/{NAME}"), timeout=60,
                       what=f"{NAME} in the validator's registry")
    assert entry["model_id"] == ident.hex() and entry["owner"] == owner.address, entry
    assert entry["royalty_per_unit"] == ROYALTY and entry["name"] == NAME, entry

    wait_providers_ready(net.manifest, timeout=240.0)
    # c0 sends nothing from here on: its account before the task is its account at any later height
    owner_before = account(validator, owner.address)
    submitter_before = account(validator, submitter.address)

    x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    submitted = run_cli("submit", "--model", NAME, "--input", f"x={tmp_path / 'x.npy'}", "--max-price", "100000",
                        "--audit-rate", "0", "--bid-window", "20", "--timeout", "420", "--out", str(out),
                        "--api", submitter.api_url, timeout=480)
    assert submitted.returncode == 0, (submitted.returncode, submitted.stdout, submitted.stderr)
    posted = re.search(r"task ([0-9a-f]{64}) posted", submitted.stdout)
    assert posted is not None, submitted.stdout
    task_id = bytes.fromhex(posted.group(1))
    np.testing.assert_allclose(np.load(out / "y.npy"), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)

    view = wait_settled(submitter, task_id, timeout=60)
    assert view.outcome == "paid" and view.model_id == ident and view.royalty_per_unit == ROYALTY, view
    price = view.unit_price
    assert price is not None and price > 0
    h = next(t.height for stage, t in view.timings if stage == "settled")
    after = on_every_node(live(net), h, lambda rec: {n.name: account(rec, n.address) for n in (owner, submitter)})
    assert len({repr(v) for v in after.values()}) == 1, after  # every node holds the same accounts
    owner_after, submitter_after = after["v0"]["c0"], after["v0"]["c1"]
    assert owner_after == {"balance": owner_before["balance"] + ROYALTY, "nonce": owner_before["nonce"]}
    fees = (submitter_after["nonce"] - submitter_before["nonce"]) * PARAMS.min_fee
    assert submitter_after["balance"] == submitter_before["balance"] - price - ROYALTY - fees
    assert task_view(submitter, task_id).model_id == ident


def test_a_model_with_a_lambda_layer_is_refused_by_the_cli_and_nothing_is_posted(
        net: TrackedDevnet, tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Lambda(lambda t: t * 2)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    owner = net.manifest.node("c0")
    before = account(owner, owner.address)
    h = height(owner)

    pushed = run_cli("model", "push", str(path), "--name", "lambda-e2e", "--api", owner.api_url, timeout=120)
    assert pushed.returncode == 2, (pushed.returncode, pushed.stdout, pushed.stderr)
    assert "Lambda" in pushed.stderr and pushed.stdout == "", (pushed.stdout, pushed.stderr)

    # a few blocks later: no registration, no fee, no nonce spent, on every node
    wait_until(lambda: height(owner) >= h + 4, timeout=60, what="four more blocks")
    seen = on_every_node(live(net), h + 4, lambda rec: (account(rec, owner.address),
                                                          [m["name"] for m in get_json(rec, "/ledger/models")["models"]]))
    for acct, names in seen.values():
        assert acct == before and "lambda-e2e" not in names, seen
