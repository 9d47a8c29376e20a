"""Node config files: a good file loads; every bad one names the file, the key and the problem."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from p2pgpu.config import (
    ApiToken,
    ConfigError,
    NodeConfig,
    PassphraseUnavailable,
    default_validator_keystore,
    load_config,
    read_passphrase,
    render_api_token,
    render_config,
)

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWCDsmdou1oz2dA8nMVEGZrxL9tbvcGBF4DGhLG4Ecuyxo"
SHA_A = hashlib.sha256(b"p2pgpu_token-a").hexdigest()
SHA_B = hashlib.sha256(b"p2pgpu_token-b").hexdigest()

GOOD = f"""
data_dir = "state"
keystore = "keys/node.json"
passphrase_env = "NODE_PASS"
genesis = "genesis.json"
roles = ["validator", "provider"]

[network]
listen_addrs = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = ["{PEER}"]
target_peers = 4

[network.gossip]
degree = 5
heartbeat_interval = 0.5

[api]
port = 0

[[api.tokens]]
name = "ci-runner"
token_sha256 = "{SHA_A}"
scopes = ["read", "submit"]
spend_per_hour = 5000

[[api.tokens]]
name = "grafana"
token_sha256 = "{SHA_B}"
scopes = ["read"]

[provider]
max_concurrent_jobs = 2
device = "cpu"
unit_cost = 7
margin = 0.5
floor = 3
receipt_every = 4

[client]
max_wait_blocks = 3
enough_bids = 2

[consensus]
timeout_propose = 2

[logging]
level = "debug"
format = "json"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    for name in ("keys/node.json", "keys/node.validator.json", "genesis.json"):
        (tmp_path / name).write_text("{}")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "node.toml"
    path.write_text(text)
    return path


def test_good_file_loads_with_paths_relative_to_it(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # the working directory must not matter
    cfg = load_config(write(folder, GOOD))
    assert cfg.data_dir == folder / "state"
    assert cfg.keystore == folder / "keys" / "node.json"
    assert cfg.validator_keystore_path == folder / "keys" / "node.validator.json"
    assert cfg.genesis == folder / "genesis.json"
    assert cfg.roles == frozenset({"validator", "provider"})
    assert cfg.network.bootstrap == (PEER,) and cfg.network.gossip.degree == 5
    assert cfg.api.port == 0 and cfg.api.host == "127.0.0.1"
    assert cfg.api.tokens == (ApiToken("ci-runner", SHA_A, frozenset({"read", "submit"}), 5000),
                              ApiToken("grafana", SHA_B, frozenset({"read"}), None))
    assert (cfg.provider.device, cfg.provider.unit_cost, cfg.provider.margin, cfg.provider.floor) == ("cpu", 7, 0.5, 3)
    assert cfg.provider.receipt_every == 4
    assert cfg.consensus.timeout_propose == 2.0 and isinstance(cfg.consensus.timeout_propose, float)
    assert cfg.logging.format == "json"
    net = cfg.network.to_net_config()
    assert net.bootstrap_peers == (PEER,) and net.gossip.degree == 5 and net.target_peers == 4


def test_defaults_are_a_usable_devnet_node(folder: Path) -> None:
    (folder / "node.key.json").write_text("{}")
    (folder / "node.key.validator.json").write_text("{}")
    cfg = load_config(write(folder, ""))
    assert cfg.api.host == "127.0.0.1" and not cfg.api.allow_remote
    assert "validator" in cfg.roles and cfg.keystore == folder / "node.key.json"
    cfg.network.to_net_config()  # the network layer accepts the defaults too


def test_render_then_load_round_trip(folder: Path) -> None:
    cfg = load_config(write(folder, GOOD))
    again = load_config(write(folder, render_config(cfg)))
    assert again == cfg
    odd = dataclasses.replace(cfg, passphrase_env='A"B\\C\n\x7f\U0001f600', data_dir=folder / "dir with ' quote")
    assert load_config(write(folder, render_config(odd))) == odd


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (("[api]\nport = 0", "[api]\nprot = 0"), "api.prot", "unknown key (did you mean 'port'?)"),
        (("data_dir", "data_dri"), "data_dri", "did you mean 'data_dir'?"),
        (("[client]", "[clinet]"), "clinet", "did you mean 'client'?"),
        (("target_peers = 4", 'target_peers = "4"'), "network.target_peers", "expected an integer, got a string"),
        (("target_peers = 4", "target_peers = 4.5"), "network.target_peers", "expected an integer, got a float"),
        (("target_peers = 4", "target_peers = true"), "network.target_peers", "expected an integer, got a boolean"),
        (("margin = 0.5", 'margin = "high"'), "provider.margin", "expected a number"),
        (('roles = ["validator", "provider"]', 'roles = "validator"'), "roles", "expected an array"),
        (("[api]\nport = 0", "[api]\nport = 70000"), "api.port", "70000 is out of range [0, 65535]"),
        (("margin = 0.5", "margin = -1"), "provider.margin", "out of range"),
        (("max_concurrent_jobs = 2", "max_concurrent_jobs = 0"), "provider.max_concurrent_jobs", "out of range"),
        (("max_concurrent_jobs = 2", "slots = 0"), "provider.slots", "0 is out of range [1, 1024]"),
        (("max_concurrent_jobs = 2", 'slots = "auto"'), "provider.slots", "expected an integer"),
        (("max_concurrent_jobs = 2", "queue = -1"), "provider.queue", "-1 is out of range [0, 100000]"),
        (('device = "cpu"', 'device = "tpu"'), "provider.device", "'tpu' is not one of any, cpu, gpu"),
        (("receipt_every = 4", "receipt_every = 0"), "provider.receipt_every", "0 is out of range [1, 1024]"),
        (("receipt_every = 4", "receipt_every = 4096"), "provider.receipt_every", "out of range [1, 1024]"),
        (("receipt_every = 4", "receipt_every = 2.5"), "provider.receipt_every", "expected an integer"),
        (("receipt_every = 4", 'receipt_every = 4\nrun_before_final = "no"'), "provider.run_before_final",
         "expected a boolean"),
        (("receipt_every = 4", "receipt_every = 4\nrun_before_finl = false"), "provider.run_before_finl",
         "did you mean 'run_before_final'?"),
        (("receipt_every = 4", "recept_every = 4"), "provider.recept_every", "did you mean 'receipt_every'?"),
        (('level = "debug"', 'level = "verbose"'), "logging.level", "is not one of"),
        (('roles = ["validator", "provider"]', 'roles = ["validater"]'), "roles[0]", "did you mean 'validator'?"),
        (('roles = ["validator", "provider"]', "roles = []"), "roles", "at least 1"),
        (('roles = ["validator", "provider"]', 'roles = ["client", "client"]'), "roles", "more than once"),
        ((f'bootstrap = ["{PEER}"]', 'bootstrap = ["/ip4/999.1.1.1/tcp/1/p2p/x"]'), "network.bootstrap[0]",
         "not a valid multiaddr"),
        ((f'bootstrap = ["{PEER}"]', 'bootstrap = ["/ip4/127.0.0.1/tcp/4001"]'), "network.bootstrap[0]",
         "no /p2p/<peer id>"),
        (('listen_addrs = ["/ip4/127.0.0.1/tcp/0"]', 'listen_addrs = ["/ip4/127.0.0.1/udp/1"]'),
         "network.listen_addrs[0]", "not a TCP address"),
        (('listen_addrs = ["/ip4/127.0.0.1/tcp/0"]', "listen_addrs = []"), "network.listen_addrs", "at least 1"),
        (("degree = 5", "degree = 30"), "network.gossip.degree", "degree_low <= degree <= degree_high"),
        (("degree = 5", "degree = 5\nfanout_degree = 9"), "network.gossip.fanout_degree",
         "must be at most degree_high (6), got 9"),
        (("degree = 5", "degree = 5\nfanout_degree = 0"), "network.gossip.fanout_degree", "out of range"),
        (("[api]\nport = 0", '[api]\nhost = "0.0.0.0"'), "api.host", "api.allow_remote = true"),
        (('name = "grafana"\n', ""), "api.tokens[1].name", "missing (required)"),
        (('name = "grafana"', 'name = "graf ana"'), "api.tokens[1].name", "use letters, digits"),
        (('name = "grafana"', 'name = "ci-runner"'), "api.tokens[1].name", "also the name of api.tokens[0]"),
        (('name = "grafana"', 'nmae = "grafana"'), "api.tokens[1].nmae", "did you mean 'name'?"),
        ((SHA_B, SHA_A), "api.tokens[1].token_sha256", "the same token as api.tokens[0]"),
        ((SHA_B, SHA_B[:-1]), "api.tokens[1].token_sha256", "expected 64 hex digits"),
        ((SHA_B, "z" * 64), "api.tokens[1].token_sha256", "expected 64 hex digits"),
        ((SHA_B, "p2pgpu_" + "x" * 43), "api.tokens[1].token_sha256", "this is a token, not its SHA-256"),
        ((f'token_sha256 = "{SHA_B}"\n', ""), "api.tokens[1].token_sha256", "missing (required)"),
        (('scopes = ["read"]', 'scopes = ["reed"]'), "api.tokens[1].scopes[0]", "did you mean 'read'?"),
        (('scopes = ["read"]', "scopes = []"), "api.tokens[1].scopes", "at least 1"),
        (('scopes = ["read"]', 'scopes = ["read", "dispute"]'), "api.tokens[1].spend_per_hour",
         "required with the dispute scope"),
        (("spend_per_hour = 5000", "spend_per_hour = -1"), "api.tokens[0].spend_per_hour", "out of range"),
        (("spend_per_hour = 5000", 'spend_per_hour = "5000"'), "api.tokens[0].spend_per_hour", "expected an integer"),

        (("[api]\nport = 0", '[api]\nhost = "example.com"'), "api.host", "not a loopback address"),
        (('genesis = "genesis.json"', 'genesis = "nope/genesis.json"'), "genesis", "no such file"),
        (('keystore = "keys/node.json"', 'keystore = "keys/other.json"'), "keystore", "no such file"),
        (('passphrase_env = "NODE_PASS"', 'passphrase_env = "X"\npassphrase_file = "genesis.json"'),
         "passphrase_file", "not both"),
        (("[network.gossip]", "[network.gossip.extra]"), "network.gossip.extra", "unknown key"),
        (("timeout_propose = 2", "timeout_propose = 2\ntx_batch = -0.1"), "consensus.tx_batch", "out of range"),
        (("timeout_propose = 2", 'timeout_propose = 2\nmin_block_pause = "soon"'), "consensus.min_block_pause",
         "expected a number"),
        (("timeout_propose = 2", "timeout_propose = 2\ntx_bacth = 0.2"), "consensus.tx_bacth",
         "did you mean 'tx_batch'?"),
        (("timeout_propose = 2", 'timeout_propose = 2\nrelay_votes = "yes"'), "consensus.relay_votes",
         "expected a boolean"),
        (("timeout_propose = 2", "timeout_propose = 2\nrelay_txs = 1"), "consensus.relay_txs",
         "expected a boolean"),
        (("timeout_propose = 2", "timeout_propose = 2\nrelay_tx = true"), "consensus.relay_tx",
         "did you mean 'relay_txs'?"),
        (("enough_bids = 2", 'enough_bids = 2\nrelay_announces = "yes"'), "client.relay_announces",
         "expected a boolean"),
        (("enough_bids = 2", "enough_bids = 2\nrelay_announce = true"), "client.relay_announce",
         "did you mean 'relay_announces'?"),
        (("[logging]", '[gateway]\nwarm_models = ["Resnet 50"]\n\n[logging]'), "gateway.warm_models[0]",
         "is not a model id (64 hex digits) or a model name"),
        (("[logging]", '[gateway]\nwarm_models = ["resnet@"]\n\n[logging]'), "gateway.warm_models[0]",
         "is not a model version"),
        (("[logging]", '[gateway]\nwarm_models = "resnet"\n\n[logging]'), "gateway.warm_models",
         "expected an array"),
    ],
)
def test_bad_values_name_file_key_and_problem(folder: Path, edit: tuple[str, str], key: str, problem: str) -> None:
    old, new = edit
    assert old in GOOD
    path = write(folder, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == str(path) and err.key == key
    assert problem in err.problem
    assert str(err).startswith(f"{path}: {key}: ")


def test_missing_file_path_is_resolved_from_the_config_directory(folder: Path) -> None:
    path = write(folder, GOOD.replace('genesis = "genesis.json"', 'genesis = "../elsewhere/g.json"'))
    with pytest.raises(ConfigError, match=r"no such file: .*/elsewhere/g.json \(relative paths are resolved from "):
        load_config(path)
    assert str(folder.parent / "elsewhere" / "g.json") in str(pytest.raises(ConfigError, load_config, path).value)


def test_validator_role_needs_its_keystore(folder: Path) -> None:
    (folder / "keys" / "node.validator.json").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(write(folder, GOOD))
    assert info.value.key == "roles" and "BLS keystore" in info.value.problem
    cfg = load_config(write(folder, GOOD.replace('["validator", "provider"]', '["provider"]')))
    assert "validator" not in cfg.roles


def test_remote_api_allowed_when_said_so_and_guarded_by_tokens(folder: Path) -> None:
    cfg = load_config(write(folder, GOOD.replace("[api]\nport = 0", '[api]\nhost = "0.0.0.0"\nallow_remote = true')))
    assert cfg.api.host == "0.0.0.0" and len(cfg.api.tokens) == 2
    cfg = load_config(write(folder, GOOD.replace("[api]\nport = 0", '[api]\nhost = "::1"')))
    assert cfg.api.host == "::1"


def _without_tokens(text: str) -> str:
    start = text.index("[[api.tokens]]")
    return text[:start] + text[text.index("[provider]"):]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "node.example.com"])
def test_remote_api_without_tokens_is_refused_naming_the_fix(folder: Path, host: str) -> None:
    exposed = f'[api]\nhost = "{host}"\nallow_remote = true'
    path = write(folder, _without_tokens(GOOD).replace("[api]\nport = 0", exposed))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == "api.tokens" and "\n" not in str(err)
    assert f"{host!r} would answer anyone" in err.problem and "p2pgpu api token new" in err.problem
    assert "[[api.tokens]]" in err.problem


def test_loopback_api_without_tokens_stays_open_as_before(folder: Path) -> None:
    cfg = load_config(write(folder, _without_tokens(GOOD)))
    assert cfg.api.tokens == ()
    cfg = load_config(write(folder, _without_tokens(GOOD).replace("[api]\nport = 0", "[api]\nallow_remote = true")))
    assert cfg.api.tokens == () and cfg.api.allow_remote  # allow_remote on loopback exposes nothing
    off = _without_tokens(GOOD).replace("[api]\nport = 0", '[api]\nenabled = false\nhost = "0.0.0.0"\n'
                                                            "allow_remote = true")
    assert not load_config(write(folder, off)).api.enabled  # no API, nothing to guard


@pytest.mark.parametrize(("tokens", "key"), [
    (f'[api.tokens]\nname = "x"\ntoken_sha256 = "{SHA_A}"\nscopes = ["read"]\n', "api.tokens"),
    ('[api]\ntokens = ["p2pgpu_x"]\n', "api.tokens[0]"),
])
def test_tokens_must_be_a_list_of_tables(folder: Path, tokens: str, key: str) -> None:
    path = write(folder, _without_tokens(GOOD).replace("[provider]", tokens + "\n[provider]")
                 .replace("[api]\nport = 0\n", "" if tokens.startswith("[api]") else "[api]\nport = 0\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and "[[api.tokens]] header per entry" in info.value.problem
    assert "p2pgpu_x" not in str(info.value)


def test_a_rendered_token_table_loads_back(folder: Path) -> None:
    token = ApiToken("ops.team-1", SHA_A, frozenset({"read", "submit", "dispute"}), 0)
    snippet = render_api_token(token)
    assert snippet.startswith("[[api.tokens]]\n") and SHA_A in snippet
    cfg = load_config(write(folder, _without_tokens(GOOD).replace("[provider]", snippet + "\n[provider]")))
    assert cfg.api.tokens == (token,)


def test_toml_syntax_error_names_the_line(folder: Path) -> None:
    path = write(folder, 'data_dir = "x"\nroles = ["client"\n[api]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert "not valid TOML" in str(info.value) and "line 3" in str(info.value)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml")


def test_check_files_false_skips_existence(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), check_files=False)
    assert cfg.keystore == tmp_path / "keys" / "node.json"


def test_passphrase_sources(folder: Path) -> None:
    cfg = load_config(write(folder, GOOD))
    assert read_passphrase(cfg, {"NODE_PASS": "s3cret"}) == "s3cret"
    with pytest.raises(PassphraseUnavailable, match="NODE_PASS is not set"):
        read_passphrase(cfg, {})
    (folder / "pass").write_text("from file\nignored\n")
    cfg = load_config(write(folder, GOOD.replace('passphrase_env = "NODE_PASS"', 'passphrase_file = "pass"')))
    assert read_passphrase(cfg, {}) == "from file"
    assert read_passphrase(dataclasses.replace(cfg, passphrase_file=None), {}) is None


def test_default_validator_keystore_name() -> None:
    assert default_validator_keystore(Path("/k/node.json")) == Path("/k/node.validator.json")
    assert default_validator_keystore(Path("/k/node")) == Path("/k/node.validator.json")
    assert NodeConfig().validator_keystore_path == Path("node.key.validator.json")


def test_provider_receipt_interval_reaches_the_provider_role(folder: Path) -> None:
    from p2pgpu.roles import provider_role_config

    cfg = load_config(write(folder, GOOD))
    role = provider_role_config(cfg.provider)
    assert (role.receipt_every, role.max_concurrent_jobs) == (4, 2)
    default = load_config(write(folder, GOOD.replace("receipt_every = 4\n", "")))
    assert provider_role_config(default.provider).receipt_every == 8
