"""A provider paused past several epochs catches up within seconds of waking, and bids (and is paid) again.

Real processes: 1 validator, 1 provider, 1 client, epochs of 8 blocks at
~4 blocks a second. The provider is paused (SIGSTOP) for four epochs: the
blocks gossiped to it on waking are signed by committees it has not seen
yet, so nothing it hears proves it is behind; its stall watch asks its peers
for the blocks after its head and verifies them through every committee
change. While it is behind it holds the announces it hears; once caught up
it bids on the next task, and the task is paid.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devnet.demo import wait_providers_ready
from devnet.launcher import DevnetSpec
from ledger.params import Params
from p2pgpu.config import ClientConfig, ProviderConfig

from .conftest import TrackedDevnet, devnet_processes
from .helpers import height, matmul_job, submit, wait_settled, wait_until

pytestmark = pytest.mark.slow

EPOCH = 8
PARAMS = Params(epoch_length=EPOCH, committee_size=4, challenge_window=10, audit_window=60, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
SPEC = DevnetSpec(
    validators=1, providers=1, clients=1, block_interval=0.25, params=PARAMS,
    provider_configs={"p0": ProviderConfig(device="cpu", unit_cost=10)},
    client_config=ClientConfig(enough_bids=1),
)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedDevnet]:
    with devnet_processes(tmp_path_factory.mktemp("catchup") / "devnet", SPEC) as devnet:
        devnet.wait_finalized(2, timeout=120)
        yield devnet


def test_a_provider_paused_past_several_epochs_catches_up_and_is_paid_again(net: TrackedDevnet) -> None:
    wait_providers_ready(net.manifest, timeout=240.0)
    v0, p0, c0 = (net.manifest.node(n) for n in ("v0", "p0", "c0"))
    paused_at = height(p0)
    net.pause("p0")
    try:
        wait_until(lambda: height(v0) >= paused_at + 4 * EPOCH, timeout=120, what="four epochs pass")
    finally:
        net.resume("p0")
    woke = time.monotonic()
    target = height(v0)
    wait_until(lambda: height(p0) >= target, timeout=60, what=f"p0 caught up to height {target}", interval=0.1)
    print(f"follower_catchup_s={time.monotonic() - woke:.2f} blocks={target - paused_at}")  # never asserted

    spec, inputs = matmul_job(32, seed=31)
    task_id = submit(c0, spec, inputs, max_unit_price=100_000, audit_rate_bps=0, bid_window=40)
    view = wait_settled(c0, task_id, timeout=120)
    assert view.outcome == "paid", view
    assert view.provider is not None and view.provider.hex() == p0.address
