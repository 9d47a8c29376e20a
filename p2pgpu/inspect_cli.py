"""``p2pgpu inspect``: watch a chain's gossip live, record it, and replay recordings.

``p2pgpu inspect --genesis FILE --bootstrap ADDR [...]`` joins as a passive
peer and shows per-topic rates, rejects, duplicates, peers and mesh, the
chain head, and (``--follow-task``) one task's life across topics. A
bootstrap may be a multiaddr with ``/p2p/<id>`` or a node's ``node.json``
(or its data directory), which a running devnet node writes.

``p2pgpu inspect replay FILE.jsonl`` feeds a recording through the same
aggregation and prints the same summary; a malformed line stops it with the
line number unless ``--skip-bad`` is given.

libp2p and the decoder are imported inside the run functions, so
``p2pgpu --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ledger.exceptions import InvalidGenesis
from p2pgpu.cli import CLIError

# Our own imports inside functions here are deliberate: every `p2pgpu` command imports this module to build its
# parser (p2pgpu.cli, ~0.13 s for `p2pgpu --help`), so each stays where its command runs. Measured cost of each,
# on top of the parser, min of 3 runs: p2pgpu.inspect.shell 1.25 s and p2pgpu.net 0.86 s (libp2p),
# ledger.genesis 0.12 s, p2pgpu.inspect.render 0.05 s (rich), p2pgpu.inspect.state/events/recording 0.01-0.016 s each.

__all__ = ["register", "resolve_bootstrap", "run_live", "run_replay"]


def register(subparsers: Any) -> None:
    inspect = subparsers.add_parser(
        "inspect", help="watch gossip as a passive peer; 'inspect replay FILE' replays a recording",
        description="Join the chain's gossip as a passive observer: decode and verify every message.",
    )
    inspect.add_argument("--genesis", type=Path, help="genesis file of the chain to watch")
    inspect.add_argument("--bootstrap", nargs="+", default=[], metavar="ADDR",
                         help="peer multiaddr(s) with /p2p/<id>, or a node.json / node data directory")
    inspect.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", metavar="MULTIADDR",
                         help="where the inspector listens (default: a free loopback port)")
    inspect.add_argument("--record", type=Path, metavar="FILE.jsonl", help="write every event as a JSON line")
    _add_common(inspect)
    inspect.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    inspect.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                         help="log level on stderr (default warning)")
    inspect.add_argument("--no-catch-up", action="store_true",
                         help="do not fetch blocks to learn committees of later epochs")
    inspect.set_defaults(parser=inspect, run=run_live)
    sub = inspect.add_subparsers(dest="inspect_command", metavar="SUBCOMMAND")
    replay = sub.add_parser("replay", help="replay a recording and print its summary")
    replay.add_argument("file", type=Path, metavar="FILE.jsonl")
    _add_common(replay)
    replay.add_argument("--summary", action="store_true", help="print only the summary, not every event")
    replay.add_argument("--skip-bad", action="store_true", help="report malformed lines and go on")
    replay.set_defaults(run=run_replay)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow-task", metavar="TASK_ID_HEX", help="show this task's timeline (>= 8 hex digits)")
    parser.add_argument("--window", type=float, default=10.0, metavar="S", help="rate window in seconds (default 10)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _state(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from p2pgpu.inspect.state import InspectorState

    try:
        return InspectorState(window_s=args.window, follow_task=args.follow_task)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _print_summary(summary, as_json: bool, out: TextIO, title: str) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    from p2pgpu.inspect.render import render_summary, summary_json

    if as_json:
        print(summary_json(summary), file=out)
    else:
        Console(file=out, width=160 if not out.isatty() else None).print(render_summary(summary, title=title))


# ---------------------------------------------------------------- replay


def describe_event(ev) -> str:  # type: ignore[no-untyped-def]
    """One line per event for ``replay`` without ``--summary``."""
    from p2pgpu.inspect.render import _clock

    parts = [_clock(ev.ts), f"{ev.event.value:<11}", ev.topic or "-"]
    if ev.kind:
        parts.append(ev.kind)
    if ev.reason:
        parts.append(f"reason={ev.reason}")
    for key in ("height", "round", "step", "tx", "nonce", "task_id"):
        if key in ev.fields:
            value = ev.fields[key]
            parts.append(f"{key}={str(value)[:16]}")
    if ev.peer:
        parts.append(f"peer=…{ev.peer[-8:]}")
    return " ".join(parts)


def run_replay(args: argparse.Namespace) -> int:
    from p2pgpu.inspect.events import RecordingError
    from p2pgpu.inspect.recording import read_recording

    state = _state(args)
    bad: list[RecordingError] = []

    def on_bad(exc: RecordingError) -> None:
        bad.append(exc)
        print(f"p2pgpu: skipped {exc}", file=sys.stderr)

    try:
        for ev in read_recording(args.file, skip_bad=args.skip_bad, on_bad=on_bad):
            state.apply(ev)
            if not args.summary and not args.json:
                print(describe_event(ev))
    except RecordingError as exc:
        raise CLIError(f"{exc} (use --skip-bad to skip malformed lines)" if exc.line else str(exc)) from None
    _print_summary(state.summary(), args.json, sys.stdout, f"replay {args.file.name}")
    if bad:
        print(f"p2pgpu: {len(bad)} malformed line(s) skipped", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- live


def resolve_bootstrap(values: list[str]) -> tuple[str, ...]:
    """Multiaddrs from ``--bootstrap`` values: a multiaddr, a node.json, or a node data directory."""
    out: list[str] = []
    for value in values:
        if value.startswith("/"):
            path = Path(value)
            if "/p2p/" in value and not path.exists():
                out.append(value)
                continue
        path = Path(value)
        if path.is_dir():
            path = path / "node.json"
        if not path.is_file():
            raise CLIError(f"bootstrap {value!r} is neither a multiaddr with /p2p/<peer id> nor a node.json file")
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            addrs = info["addrs"]
            if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs) or not addrs:
                raise ValueError("'addrs' must be a non-empty list of multiaddr strings")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CLIError(f"bootstrap file {path}: cannot read node addresses: {exc}") from None
        out.extend(a for a in addrs if "/p2p/" in a)
    if not out:
        raise CLIError("no bootstrap peers: give --bootstrap MULTIADDR (or a node.json)")
    return tuple(dict.fromkeys(out))


def run_live(args: argparse.Namespace) -> int:
    import trio

    from ledger.genesis import load_genesis
    from p2pgpu.inspect.shell import InspectorConfig
    from p2pgpu.net import ConfigError, NetConfig
    from p2pgpu.node_cli import setup_logging

    if args.genesis is None:
        raise CLIError("inspect needs --genesis FILE (or use 'p2pgpu inspect replay FILE.jsonl')")
    if args.duration is not None and not (args.duration > 0 and math.isfinite(args.duration)):
        raise CLIError(f"--duration must be a positive number of seconds, got {args.duration}")
    state = _state(args)
    try:
        genesis = load_genesis(args.genesis)
    except InvalidGenesis as exc:
        raise CLIError(str(exc)) from None
    bootstrap = resolve_bootstrap(args.bootstrap)
    try:
        NetConfig(listen_addrs=(args.listen,), bootstrap_peers=bootstrap)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    setup_logging(args.log_level, "text")
    config = InspectorConfig(genesis=genesis, bootstrap=bootstrap, listen_addrs=(args.listen,),
                             catch_up=not args.no_catch_up)
    record: TextIO | None = None
    if args.record is not None:
        try:
            record = args.record.open("w", encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot write recording {args.record}: {exc.strerror or exc}") from None
    try:
        trio.run(_live, args, config, state, record)
    finally:
        if record is not None:
            record.close()
    _print_summary(state.summary(), args.json, sys.stdout, "inspect")
    return 0


async def _live(args: argparse.Namespace, config, state, record: TextIO | None) -> None:  # type: ignore[no-untyped-def]
    import signal

    import trio

    from p2pgpu.inspect.recording import RecordWriter
    from p2pgpu.inspect.shell import run_inspector

    writer = RecordWriter(record) if record is not None else None

    def sink(ev) -> None:  # type: ignore[no-untyped-def]
        state.apply(ev)
        if writer is not None:
            writer.write(ev)

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            network, _ = await nursery.start(run_inspector, config, sink)
            print(f"inspecting chain {config.genesis.chain_id().hex()[:16]} as passive peer {network.peer_id} "
                  f"(bootstrap: {len(config.bootstrap)} peer(s)); Ctrl-C to stop", file=sys.stderr)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            with trio.move_on_after(args.duration if args.duration is not None else math.inf):
                await _display(state, args.json)
            nursery.cancel_scope.cancel()


async def _display(state, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    import trio
    from rich.console import Console
    from rich.live import Live

    from p2pgpu.inspect.render import render_plain_line, render_summary

    console = Console()
    if as_json:
        await trio.sleep_forever()
    if console.is_terminal:
        with Live(render_summary(state.summary(now=time.time()), title="inspect"), console=console,
                  auto_refresh=False, transient=True) as live:
            while True:
                await trio.sleep(1.0)
                live.update(render_summary(state.summary(now=time.time()), title="inspect"), refresh=True)
    while True:
        await trio.sleep(5.0)
        print(render_plain_line(state.summary(now=time.time())), flush=True)
