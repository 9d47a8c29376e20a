"""``p2pgpu node run --config FILE``: unlock the keys, open the chain, join the network.

Once the node is up it writes ``<data_dir>/node.json`` (pid, peer id,
listen addresses, API URL): launchers and scripts read it instead of
parsing logs. It is removed again on a clean stop.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ledger.exceptions import InvalidGenesis
from p2pgpu.cli import CLIError

# Our own imports inside functions here are deliberate: every `p2pgpu` command imports this module to build its
# parser (p2pgpu.cli, ~0.13 s for `p2pgpu --help`), so each stays where its command runs. Measured cost of each,
# on top of the parser, min of 3 runs: p2pgpu.node 1.8 s (libp2p), ledger.chain 0.20 s, ledger.keystore
# 0.21 s, ledger.genesis 0.12 s, p2pgpu.config 0.015 s, ledger.store 0.01 s.
from p2pgpu.logfilter import RepeatFolder
from p2pgpu.preflight import PreflightError, check_ports

RUN_INFO = "node.json"


def register(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="run a peer node")
    node.set_defaults(parser=node, run=None)
    sub = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="run a node from a TOML config file")
    run.add_argument("--config", required=True, type=Path, help="node configuration (TOML)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="overrides logging.level")
    run.add_argument("--log-format", choices=("text", "json"), help="overrides logging.format")
    run.add_argument("--debug", action="store_true", help="show the full traceback of a start-up failure")
    run.set_defaults(run=run_node)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RepeatFolder())  # third-party warnings repeated per message or peer: one line a minute
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # libp2p is chatty at INFO and logs harmless stream teardown at ERROR on shutdown
    logging.getLogger("libp2p").setLevel(max(logging.WARNING, root.level))


def load_node_keys(cfg, passphrase: str):
    """Unlock the account keystore (and the validator one for the validator role)."""
    from ledger.keys import AccountKey, ValidatorKey
    from ledger.keystore import KeystoreError, load_keystore
    from p2pgpu.node import NodeKeys

    try:
        account = load_keystore(cfg.keystore, passphrase)
        if account.kind != "account":
            raise CLIError(f"{cfg.keystore}: holds a {account.kind} key; 'keystore' must be an account key")
        validator = None
        if "validator" in cfg.roles:
            vpath = cfg.validator_keystore_path
            contents = load_keystore(vpath, passphrase)
            if contents.kind != "validator":
                raise CLIError(f"{vpath}: holds a {contents.kind} key; the validator role needs a BLS validator key")
            validator = ValidatorKey.from_secret(contents.secret)
    except KeystoreError as exc:
        raise CLIError(str(exc)) from None
    return NodeKeys(account=AccountKey.from_seed(account.secret), validator=validator)


def _passphrase(cfg) -> str:
    from p2pgpu.config import ConfigError, read_passphrase

    try:
        value = read_passphrase(cfg)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise CLIError("no passphrase source: set passphrase_env or passphrase_file in the config, "
                       "or run interactively to be prompted")
    return getpass.getpass(f"passphrase for {cfg.keystore}: ")


def write_run_info(data_dir: Path, info: dict[str, Any]) -> Path:
    path = data_dir / RUN_INFO
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def run_node(args: argparse.Namespace) -> int:
    import trio

    from ledger.genesis import load_genesis
    from p2pgpu.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    setup_logging(args.log_level or cfg.logging.level, args.log_format or cfg.logging.format)
    try:
        genesis = load_genesis(cfg.genesis)
    except InvalidGenesis as exc:
        raise CLIError(str(exc)) from None
    keys = load_node_keys(cfg, _passphrase(cfg))
    from ledger.chain import ChainError
    from ledger.store import StoreError

    debug = bool(getattr(args, "debug", False))
    try:  # before anything starts: a taken port is one line, not a node that half-joined the network
        check_ports(cfg.network.listen_addrs, cfg.api.host if cfg.api.enabled else None, cfg.api.port)
    except PreflightError as exc:
        raise _startup_failure(exc, str(exc), debug) from None
    from p2pgpu.net import ListenFailed  # libp2p: imported once the cheap checks passed

    try:
        trio.run(_serve, cfg, keys, genesis)
    except (ChainError, StoreError, ListenFailed) as exc:
        raise _startup_failure(exc, _one_line(exc, cfg), debug) from None
    except BaseExceptionGroup as group:  # from the node's nursery: say what failed, in one line each
        known, rest = group.split((ChainError, StoreError, ListenFailed, OSError))
        if known is None or rest is not None:
            raise  # not a start-up mistake we know: the traceback is the report
        message = "; ".join(_one_line(exc, cfg) for exc in _leaves(known))
        raise _startup_failure(group, message, debug) from None
    return 0


def _startup_failure(exc: BaseException, message: str, debug: bool) -> CLIError:
    """The one-line error for a start-up failure; with ``--debug`` its traceback is printed first."""
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return CLIError(message)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _one_line(exc: BaseException, cfg) -> str:
    from ledger.chain import ChainError
    from ledger.store import StoreError

    from p2pgpu.net import ListenFailed

    if isinstance(exc, (ChainError, StoreError)):
        return f"data directory {cfg.data_dir}: {exc}"
    if isinstance(exc, ListenFailed):
        if exc.errno == errno.EADDRINUSE:
            return (f"p2p port in use: {exc} (another node running from this config?); stop it or set "
                    "network.listen_addrs to a free port (0 picks one)")
        return f"{exc}; check network.listen_addrs"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"a port is already in use ({exc.strerror}); check network.listen_addrs and api.port"
    return f"{type(exc).__name__}: {exc}"


async def _serve(cfg, keys, genesis) -> None:
    import trio

    from p2pgpu.node import Node
    from p2pgpu.node_service import serve_node

    node = Node(cfg, keys, genesis)
    data_dir = Path(cfg.data_dir)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            info = await nursery.start(serve_node, node)
            write_run_info(data_dir, info)
            logging.getLogger("p2pgpu").info("event=node_ready %s", " ".join(f"{k}={v}" for k, v in info.items()
                                                                               if k != "addrs"))
            async for _ in signals:
                logging.getLogger("p2pgpu").info("event=node_stopping reason=signal")
                nursery.cancel_scope.cancel()
                break
    (data_dir / RUN_INFO).unlink(missing_ok=True)
