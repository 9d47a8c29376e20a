"""``p2pgpu devnet``: a local network of node processes on loopback, in one command.

This module builds the ``devnet`` subcommand's parsers; :mod:`devnet.commands`
does the work. ``p2pgpu``'s own CLI never names this package: it finds
:func:`register` through the ``p2pgpu.commands`` entry point in
``pyproject.toml`` (see :func:`p2pgpu.cli.command_plugins`), so the
dependency runs one way, devnet -> p2pgpu.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from p2pgpu.intparse import U32_MAX, U64_MAX, cli_int

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["register"]

_DESCRIPTION = """\
``up`` writes keys, genesis and configs into a directory, starts the nodes,
waits until every node finalizes blocks, prints a start card and keeps one
live status line until Ctrl-C (or returns at once with ``--detach``).
``status``, ``url``, ``logs``, ``down``, ``demo``, ``load`` and the fault drills ``kill``,
``restart``, ``pause``, ``resume`` work on that directory (``--dir``,
default ``./devnet-data``) from any terminal: ``DIR/devnet.json`` records
the nodes' pids, addresses and API URLs."""

# devnet.commands imports the launcher, the demo, the load driver and rich, about 0.4 s measured with
# `python -X importtime` (devnet.render alone 0.42 s cumulative); every `p2pgpu` command builds this parser, so
# `p2pgpu keys show` would pay that. It is imported only when a devnet command runs, in this one place.
_COMMANDS_MODULE = "devnet.commands"


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """``devnet.commands.<name>``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        function: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(_COMMANDS_MODULE), name)
        return function(args)

    run.__name__ = run.__qualname__ = name
    return run


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("P2PGPU_DEVNET_DIR", "devnet-data")),
                        metavar="DIR", help="devnet directory (default: $P2PGPU_DEVNET_DIR or ./devnet-data)")


def register(subparsers: Subparsers) -> None:
    devnet = subparsers.add_parser("devnet", help="run a local devnet of node processes",
                                   description=_DESCRIPTION)
    devnet.set_defaults(parser=devnet, run=None)
    sub = devnet.add_subparsers(dest="devnet_command", metavar="SUBCOMMAND")

    up = sub.add_parser("up", help="create (or resume) a devnet and start its nodes")
    _dir_option(up)
    up.add_argument("--validators", type=int, default=4, metavar="N", help="validator nodes (default 4)")
    up.add_argument("--providers", type=int, default=2, metavar="N",
                    help="provider-only nodes, bonded in genesis (default 2)")
    up.add_argument("--clients", type=int, default=1, metavar="N", help="funded client nodes (default 1)")
    up.add_argument("--block-interval", type=float, default=0.5, metavar="S",
                    help="pause after each commit before the next block (default 0.5 s)")
    up.add_argument("--base-port", type=int, default=0, metavar="PORT",
                    help="node i listens on PORT+2i (p2p) and PORT+2i+1 (API); 0 = free ports (default)")
    up.add_argument("--detach", action="store_true", help="return after the start card, leaving the nodes running")
    up.add_argument("--demo", action="store_true", help="run the demo workload once the devnet is up")
    up.add_argument("--tasks", type=int, default=3, metavar="N", help="demo tasks (with --demo; default 3)")
    up.add_argument("--fresh", action="store_true", help="delete a stopped devnet in DIR and start a new one")
    up.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="give up if the nodes do not finalize blocks within S seconds (default 120)")
    up.add_argument("--provider-slots", type=int, default=None, metavar="N",
                    help="kernel workers per provider (default: 2, or the device's count if more, when memory "
                         "allows; a pushed model is kept warm in one of them)")
    up.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="node log level (default info)")
    up.set_defaults(run=_command("run_up"))

    status = sub.add_parser("status", help="one row per node: process, health, height, peers, API")
    _dir_option(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=_command("run_status"))

    url = sub.add_parser("url", help="print a node's API URL (default: the first client node's), for scripts",
                         description="Print the API URL of NAME (default: the first client node, whose API "
                                     "serves the inference gateway), e.g. API=$(p2pgpu devnet url c0). Fails "
                                     "unless the node is running.")
    _dir_option(url)
    url.add_argument("name", metavar="NAME", nargs="?", default=None)
    url.set_defaults(run=_command("run_url"))

    logs = sub.add_parser("logs", help="print (or follow) a node's log")
    _dir_option(logs)
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="last N lines (0: all; default 50)")
    logs.set_defaults(run=_command("run_logs"))

    down = sub.add_parser("down", help="stop every node of the devnet (idempotent)")
    _dir_option(down)
    down.add_argument("--grace", type=float, default=10.0, metavar="S",
                      help="seconds between SIGTERM and SIGKILL (default 10)")
    down.set_defaults(run=_command("run_down"))

    drills = {
        "kill": "SIGKILL a node (a crash: no clean shutdown)",
        "restart": "stop a node if it runs and start it again with the same config",
        "pause": "SIGSTOP a node (it stays connected but silent)",
        "resume": "SIGCONT a paused node",
    }
    for name, helptext in drills.items():
        p = sub.add_parser(name, help=helptext)
        _dir_option(p)
        p.add_argument("name", metavar="NAME")
        if name == "restart":
            p.add_argument("--no-wait", action="store_true", help="do not wait for the node to catch up")
            p.add_argument("--timeout", type=float, default=120.0, metavar="S")
        p.set_defaults(run=_command("run_drill"), drill=name)

    demo = sub.add_parser("demo", help="submit small matmul jobs through the client node and verify the results")
    _dir_option(demo)
    demo.add_argument("--tasks", type=int, default=3, metavar="N", help="how many tasks (default 3)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    demo.add_argument("--timeout", type=float, default=300.0, metavar="S", help="stop following after S seconds")
    demo.set_defaults(run=_command("run_demo_cmd"))

    load = sub.add_parser("load", help="put the market under load: many small matmul tasks, measured",
                          description="Submit N small float32 matmul tasks over the devnet's client nodes, "
                                      "open-loop at R tasks/s or closed-loop with C in flight; check every "
                                      "result against NumPy; print delivered/s, time to assignment and to "
                                      "result, failures by reason, lost tasks, CPU per node and whether the "
                                      "ledger's supply is conserved. Exit 0 only if every task was delivered "
                                      "and none lost.")
    _dir_option(load)
    load.add_argument("--rate", type=float, metavar="R", help="open loop: send R tasks per second")
    load.add_argument("--concurrency", type=int, metavar="C", help="closed loop: keep C tasks in flight")
    load.add_argument("--tasks", type=int, required=True, metavar="N", help="how many tasks")
    load.add_argument("--size", type=int, default=64, metavar="S", help="matrix size: S x S float32 (default 64)")
    load.add_argument("--clients", default="all", metavar="c0,c1|all",
                      help="client nodes to submit through, in turn (default all)")
    load.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")
    load.add_argument("--timeout", type=float, default=600.0, metavar="S",
                      help="give up S seconds after the first submission; tasks open then are lost (default 600)")
    load.add_argument("--max-price", type=cli_int(1, U64_MAX), default=1_000, metavar="N", help="max unit price (default 1000)")
    load.add_argument("--bid-window", type=cli_int(1, U32_MAX), default=10, metavar="BLOCKS", help="bid window (default 10)")
    load.add_argument("--audit-rate", type=float, default=0.1, metavar="P",
                      help="probability a task is audited (default 0.1, as 'p2pgpu submit')")
    load.add_argument("--poll-interval", type=float, default=0.2, metavar="S", help=argparse.SUPPRESS)
    load.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    load.set_defaults(run=_command("run_load_cmd"))
