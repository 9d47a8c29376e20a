"""``[network.rate_limits]`` and the gossip ``peer_rate``/``peer_burst``: read, rendered back, and range-checked."""

from __future__ import annotations

import pytest

from p2pgpu.config import ConfigError, parse_config, render_config
from p2pgpu.node import Node, NodeKeys, net_config_from


def _parse(text: str):
    return parse_config(text, source="node.toml", check_files=False)


def test_defaults_are_far_above_an_honest_busy_client() -> None:
    limits = _parse("").network.rate_limits
    assert limits.tx_per_sender_burst >= 1500 and limits.announces_per_client_burst >= 1000
    gossip = _parse("").network.gossip
    assert gossip.peer_burst >= 10_000 and gossip.peer_rate >= 1000


def test_limits_are_read_rendered_back_and_reach_the_limiters() -> None:
    cfg = _parse("[network.rate_limits]\ntx_per_sender_burst = 10\ntx_per_sender_rate = 2.5\n"
                 "announces_per_client_burst = 3\nannounces_per_client_rate = 0.5\ntracked_keys = 100\n"
                 "[network.gossip]\npeer_rate = 50.0\npeer_burst = 70\n")
    again = _parse(render_config(cfg))
    assert again.network == cfg.network
    gossip = net_config_from(cfg).gossip
    assert (gossip.peer_rate, gossip.peer_burst) == (50.0, 70)
    from ledger.devtools import make_dev_network

    dev = make_dev_network(validators=("v0",), providers=(), clients=())
    node = Node(cfg, NodeKeys(dev.key("v0")), dev.genesis)
    assert (node.tx_limiter.limit.rate, node.tx_limiter.limit.burst, node.tx_limiter.max_keys) == (2.5, 10, 100)
    assert (node.announce_limiter.limit.rate, node.announce_limiter.limit.burst) == (0.5, 3)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("[network.rate_limits]\ntx_per_sender_burst = 0", "network.rate_limits.tx_per_sender_burst", "out of range"),
    ("[network.rate_limits]\ntx_per_sender_rate = 0", "network.rate_limits.tx_per_sender_rate", "out of range"),
    ("[network.rate_limits]\nannounces_per_client_burst = -1", "network.rate_limits.announces_per_client_burst",
     "out of range"),
    ("[network.rate_limits]\ntracked_keys = 1", "network.rate_limits.tracked_keys", "out of range"),
    ("[network.rate_limits]\ntx_per_sender_brust = 5", "network.rate_limits.tx_per_sender_brust", "did you mean"),
    ("[network.gossip]\npeer_rate = 0", "network.gossip.peer_rate", "out of range"),
    ("[network.gossip]\npeer_burst = 0.5", "network.gossip.peer_burst", "expected an integer"),
])
def test_bad_limits_name_file_key_and_problem(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(text)
    assert err.value.key == key
    assert problem in err.value.problem
