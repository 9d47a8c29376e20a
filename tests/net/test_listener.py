"""A node's p2p port is its own: a second node (or anyone) on it makes the start fail, not share the port."""

from __future__ import annotations

import errno
import socket
from dataclasses import replace

import pytest
import trio
from libp2p.utils.address_validation import find_free_port

from p2pgpu.net import ListenFailed, open_network

from .conftest import FAST, seed


async def test_a_second_network_on_the_same_port_fails_to_start() -> None:
    """py-libp2p's listener set SO_REUSEPORT, so both networks listened on one port and the kernel split
    the inbound connections between them; the second now fails with the address and the OS's reason."""
    port = find_free_port()
    config = replace(FAST, listen_addrs=(f"/ip4/127.0.0.1/tcp/{port}",))
    async with open_network(config, seed(1)) as first:
        with trio.fail_after(30):
            with pytest.raises(ListenFailed) as caught:
                async with open_network(config, seed(2)):
                    pass
        assert caught.value.errno == errno.EADDRINUSE
        assert str(caught.value) == f"cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already in use"
        assert first.addrs and all(f"/tcp/{port}/" in a for a in first.addrs)  # the first is untouched
        # and the first node's listener is exclusive against any process: a plain SO_REUSEPORT bind fails too
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as bind:
                other.bind(("127.0.0.1", port))
            assert bind.value.errno == errno.EADDRINUSE
    async with open_network(config, seed(2)) as second:  # the port is free again once the first stopped
        assert any(f"/tcp/{port}/" in a for a in second.addrs)


async def test_a_port_held_by_another_process_fails_the_start_instead_of_running_unreachable() -> None:
    """The swarm only logged a listener that failed and ran on without it: a node that no peer can dial."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = replace(FAST, listen_addrs=(f"/ip4/127.0.0.1/tcp/{port}",))
        with trio.fail_after(30):
            with pytest.raises(ListenFailed, match=rf"cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already"):
                async with open_network(config, seed(3)):
                    pass


async def test_an_ephemeral_port_still_listens() -> None:
    async with open_network(FAST, seed(4)) as net:  # FAST listens on tcp/0
        assert net.addrs and all("/tcp/0/" not in a for a in net.addrs)
