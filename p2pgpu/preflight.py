"""Start-up checks a node runs before it joins the network, so a mistake is one line, not a traceback.

What used to happen (issue 13): a second node on the same p2p port started
silently (libp2p's listener allows port reuse), and an API port in use, a
locked data directory or a data directory of another chain each ended in a
60-80-line traceback, some after the node had joined the network. Each check
here raises :class:`PreflightError` naming the problem and the fix.

The port checks bind a socket with ``SO_REUSEADDR`` but not ``SO_REUSEPORT``
and close it: a listener already there, ours or anyone's, makes that fail,
while connections of a node killed a moment ago (TIME_WAIT on its port) do
not -- the restarted node's own bind reuses the address too, so refusing
would turn every quick restart after a crash into an error. A port freed in
between is no problem; one taken in between is what the node's own bind
then reports (rare, and no longer silent for the API).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from pathlib import Path

import multiaddr

__all__ = ["PreflightError", "check_free_port", "check_ports", "tcp_ports_of"]


class PreflightError(Exception):
    """The node cannot start as configured; the message names the problem and what to do."""


def tcp_ports_of(addrs: Iterable[str]) -> list[tuple[str, int]]:
    """(host, port) of each ``/ip4|ip6/HOST/tcp/PORT`` listen address with a fixed port (0 = any: skipped)."""
    out = []
    for text in addrs:
        addr = multiaddr.Multiaddr(text)
        host = None
        for proto in ("ip4", "ip6"):
            try:
                host = addr.value_for_protocol(proto)
                break
            except Exception:  # the multiaddr package raises several types for "not in this address"
                continue
        try:
            port = int(addr.value_for_protocol("tcp"))
        except Exception:
            continue
        if host is not None and port:
            out.append((host, port))
    return out


def check_free_port(host: str, port: int, what: str, key: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PreflightError(f"{what} port {host}:{port} is already in use (another node running from "
                                     f"this config?); stop it or set {key} to a free port (0 picks one)") from None
            raise PreflightError(f"cannot bind the {what} port {host}:{port}: {exc.strerror or exc}; "
                                 f"check {key}") from None


def check_ports(listen_addrs: Iterable[str], api_host: str | None, api_port: int | None) -> None:
    """Every fixed p2p listen port and the API port must be free (``api_host=None``: no API)."""
    for host, port in tcp_ports_of(listen_addrs):
        check_free_port(host, port, "p2p", "network.listen_addrs")
    if api_host is not None and api_port:
        check_free_port(api_host, api_port, "API", "api.port")

