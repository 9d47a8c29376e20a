"""DevnetSpec -> keys, genesis, configs and manifest, without starting a process."""

from __future__ import annotations

import stat

import pytest

from devnet.launcher import (
    DevnetError,
    DevnetSpec,
    Manifest,
    NotADevnet,
    UnknownNode,
    plan_devnet,
    serving_provider_config,
    write_devnet,
)
from ledger.genesis import initial_state, load_genesis
from ledger.keys import AccountKey, ValidatorKey
from ledger.keystore import WrongPassphrase, load_keystore
from p2pgpu.config import ProviderConfig, load_config

SEED = b"\x07" * 32
FAST_SCRYPT = 2**4  # keystore format allows it; keeps unlocking cheap in tests


def test_plan_is_deterministic_and_funds_every_role():
    spec = DevnetSpec(validators=3, providers=2, clients=1)
    a = plan_devnet(spec, master_seed=SEED, genesis_time_ms=1)
    b = plan_devnet(spec, master_seed=SEED, genesis_time_ms=1)
    assert a.genesis.chain_id() == b.genesis.chain_id()
    assert [n.name for n in a.nodes] == ["v0", "v1", "v2", "p0", "p1", "c0"]
    assert {n.name: sorted(n.roles) for n in a.nodes}["p1"] == ["provider"]
    assert len(a.genesis.validators) == 3 and len(a.genesis.providers) == 2
    assert all(v.stake == spec.validator_stake for v in a.genesis.validators)
    assert all(p.bond == spec.provider_bond for p in a.genesis.providers)
    balances = {acct.address: acct.balance for acct in a.genesis.accounts}
    assert balances[a.node("c0").account.address] == spec.client_balance
    assert balances[a.node("p0").account.address] == spec.provider_balance
    state = initial_state(a.genesis)  # proofs of possession verify, supply adds up
    assert set(state.validators) == {a.node(f"v{i}").account.address for i in range(3)}
    other = plan_devnet(spec, master_seed=b"\x08" * 32, genesis_time_ms=1)
    assert other.genesis.chain_id() != a.genesis.chain_id()


def test_only_validators_get_bls_keys_and_base_port_assigns_ports():
    plan = plan_devnet(DevnetSpec(validators=2, providers=1, clients=1, base_port=20000), master_seed=SEED,
                       genesis_time_ms=0)
    assert [n.validator is not None for n in plan.nodes] == [True, True, False, False]
    assert plan.node("p0").config.network.listen_addrs == ("/ip4/127.0.0.1/tcp/20004",)
    assert plan.node("p0").config.api.port == 20005
    assert plan.node("v0").config.api.host == "127.0.0.1"
    with pytest.raises(UnknownNode, match="nodes: v0, v1, p0, c0"):
        plan.node("x9")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"validators": 0}, "at least one validator"),
    ({"providers": -1}, "cannot be negative"),
    ({"base_port": 80}, "1024..65535"),
    ({"base_port": 65530}, "1024..65535"),
    ({"block_interval": -1.0}, "--block-interval"),
    ({"validator_stake": 1}, "min_validator_stake"),
])
def test_bad_spec_names_the_problem(kwargs, message):
    with pytest.raises(DevnetError, match=message):
        DevnetSpec(**kwargs)


def test_written_devnet_loads_and_unlocks(tmp_path):
    spec = DevnetSpec(validators=2, providers=1, clients=1, block_interval=0.2)
    plan = plan_devnet(spec, master_seed=SEED, genesis_time_ms=1234)
    root = tmp_path / "net"
    manifest = write_devnet(plan, root, scrypt_n=FAST_SCRYPT)

    pass_path = root / "passphrase"
    assert stat.S_IMODE(pass_path.stat().st_mode) == 0o600
    passphrase = pass_path.read_text().splitlines()[0]
    assert len(passphrase) >= 24
    genesis = load_genesis(root / "genesis.json")
    assert genesis.chain_id().hex() == manifest.chain_id == plan.genesis.chain_id().hex()

    for rec, node in zip(manifest.nodes, plan.nodes, strict=True):
        cfg = load_config(rec.config)  # checks that keystores, genesis and passphrase file exist
        assert cfg.roles == node.roles
        assert cfg.genesis == root / "genesis.json"
        assert cfg.passphrase_file == pass_path
        assert cfg.data_dir == rec.data_dir
        assert cfg.consensus.block_interval == 0.2
        assert cfg.network.listen_addrs == ("/ip4/127.0.0.1/tcp/0",) and cfg.api.port == 0
        account = load_keystore(cfg.keystore, passphrase)
        assert AccountKey.from_seed(account.secret).address.hex() == rec.address == node.account.address.hex()
        if "validator" in node.roles:
            bls = load_keystore(cfg.validator_keystore_path, passphrase)
            assert ValidatorKey.from_secret(bls.secret).public_key == node.validator.public_key
        else:
            assert not cfg.validator_keystore_path.exists()
        assert rec.log == root / "logs" / f"{rec.name}.log"
    with pytest.raises(WrongPassphrase):
        load_keystore(manifest.nodes[0].config.parent / "key.json", passphrase + "x")

    again = Manifest.load(root)
    assert again.to_json() == manifest.to_json()


def test_write_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "something.txt").write_text("keep me")
    plan = plan_devnet(DevnetSpec(validators=1, providers=0, clients=0), master_seed=SEED, genesis_time_ms=0)
    with pytest.raises(DevnetError, match="not empty"):
        write_devnet(plan, tmp_path, scrypt_n=FAST_SCRYPT)
    assert (tmp_path / "something.txt").read_text() == "keep me"


def test_manifest_load_errors(tmp_path):
    with pytest.raises(NotADevnet, match="devnet up"):
        Manifest.load(tmp_path / "absent")
    (tmp_path / "devnet.json").write_text('{"version": 99}')
    with pytest.raises(NotADevnet, match="not a devnet manifest"):
        Manifest.load(tmp_path)


GiB = 1 << 30


@pytest.mark.parametrize(("kwargs", "slots"), [
    ({"providers": 2, "device_slots": 1, "memory_bytes": 22 * GiB}, 2),  # a 2-core box: one slot by default
    ({"providers": 2, "device_slots": 4, "memory_bytes": 64 * GiB}, 4),  # never fewer than the device's
    ({"providers": 2, "device_slots": 1, "memory_bytes": 3 * GiB}, None),  # 4 workers do not fit: the default
    ({"providers": 2, "device_slots": 1, "memory_bytes": 0}, 2),  # memory unknown: taken as enough
    ({"providers": 2, "device_slots": 1, "memory_bytes": 0, "slots": 1}, 1),  # --provider-slots wins
    ({"providers": 9, "device_slots": 1, "memory_bytes": 1 * GiB, "slots": 3}, 3),
])
def test_devnet_providers_keep_every_model_warm_with_a_spare_slot(kwargs, slots):
    cfg = serving_provider_config(**kwargs)
    assert cfg.models == ("*",)
    assert cfg.slots == slots


@pytest.mark.parametrize("slots", [0, -1, 1025])
def test_provider_slots_out_of_range_is_refused(slots):
    with pytest.raises(DevnetError, match=f"--provider-slots {slots}: must be between 1 and 1024"):
        serving_provider_config(providers=2, device_slots=1, memory_bytes=0, slots=slots)


def test_provider_default_reaches_unnamed_providers_configs(tmp_path):
    warm = serving_provider_config(providers=2, device_slots=1, memory_bytes=0)
    spec = DevnetSpec(validators=1, providers=2, clients=1, provider_default=warm,
                      provider_configs={"p1": ProviderConfig(device="cpu", fault="wrong_result")})
    plan = plan_devnet(spec, master_seed=SEED, genesis_time_ms=0)
    assert plan.node("p0").config.provider == warm
    assert plan.node("p1").config.provider.fault == "wrong_result" and plan.node("p1").config.provider.models == ()
    manifest = write_devnet(plan, tmp_path / "net", scrypt_n=FAST_SCRYPT)
    written = load_config(manifest.node("p0").config, check_files=False).provider
    assert written.models == ("*",) and written.slots == 2
    assert DevnetSpec().provider_default == ProviderConfig()  # tests and benches keep the node's defaults
