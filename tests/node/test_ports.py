"""The node's ports for the market shell (``p2pgpu.ports.RolesNode``) are ones a ``Node`` really has."""

from __future__ import annotations

from ledger.devtools import make_dev_network
from p2pgpu.node import Node, NodeKeys
from p2pgpu.ports import RolesNode

from .test_node_consensus import node_config


def test_every_roles_port_is_an_attribute_of_the_node(tmp_path) -> None:
    net = make_dev_network(validators=("v0",), providers=(), clients=("c0",))
    node = Node(node_config(tmp_path, "c0", {"client"}), NodeKeys(net.key("c0"), None), net.genesis)
    ports = _members(RolesNode)
    assert {"chain", "tx_sender", "network", "driver", "publish", "_from_self", "_own_doing"} <= ports
    missing = sorted(name for name in ports if not hasattr(node, name))
    assert missing == [], f"RolesNode names ports Node does not have: {missing}"


def _members(protocol: type) -> set[str]:
    """The names a Protocol declares, its bases' included (``typing.get_protocol_members`` is Python 3.13+)."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls is object or cls.__name__ in ("Protocol", "Generic"):
            continue
        names |= {n for n in vars(cls) if not n.startswith("__") and n not in ("_abc_impl", "_is_protocol")}
        names |= set(getattr(cls, "__annotations__", {}))
    return names
