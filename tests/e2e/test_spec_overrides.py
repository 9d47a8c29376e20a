"""Per-node settings in a devnet plan: what the e2e devnets rely on, checked without processes."""

from __future__ import annotations

import pytest

from devnet.launcher import Devnet, DevnetError, DevnetSpec, plan_devnet, write_devnet
from p2pgpu.config import ClientConfig, ProviderConfig, load_config


def test_provider_and_client_sections_reach_each_node_config(tmp_path):
    spec = DevnetSpec(validators=1, providers=2, clients=1,
                      provider_configs={"p1": ProviderConfig(unit_cost=3, fault="wrong_result")},
                      client_config=ClientConfig(enough_bids=1))
    manifest = write_devnet(plan_devnet(spec, master_seed=b"s", genesis_time_ms=1), tmp_path / "d", scrypt_n=2**10)
    configs = {n.name: load_config(n.config) for n in manifest.nodes}
    assert configs["p1"].provider == ProviderConfig(unit_cost=3, fault="wrong_result")
    assert configs["p0"].provider == ProviderConfig()
    assert configs["c0"].client.enough_bids == 1


def test_settings_for_a_provider_that_does_not_exist_are_refused():
    with pytest.raises(DevnetError, match="provider settings for p2, but the providers are p0, p1"):
        DevnetSpec(providers=2, provider_configs={"p2": ProviderConfig()})


def test_a_late_joiner_cannot_be_a_validator_or_reuse_a_name(tmp_path):
    spec = DevnetSpec(validators=1, providers=0, clients=0)
    devnet = Devnet(write_devnet(plan_devnet(spec, master_seed=b"s", genesis_time_ms=1), tmp_path / "d",
                                 scrypt_n=2**10))
    with pytest.raises(DevnetError, match="cannot be a validator"):
        devnet.join("x", ("validator",))
    with pytest.raises(DevnetError, match="already exists"):
        devnet.join("v0", ("observer",))
    with pytest.raises(DevnetError, match="no running node to bootstrap from"):
        devnet.join("o0", ("observer",))
    assert [n.name for n in devnet.manifest.nodes] == ["v0"]
