"""What ``p2pgpu devnet`` does: one function per subcommand, each ``run_*(args) -> int``.

The parsers are built in :mod:`devnet.cli`, which loads this module only
when a devnet command runs (see there why). ``up`` writes keys, genesis and
configs into a directory, starts the nodes, waits until every node
finalizes blocks, prints a start card and keeps one live status line until
Ctrl-C (or returns at once with ``--detach``). ``status``, ``logs``,
``down``, ``demo``, ``load`` and the fault drills ``kill``, ``restart``,
``pause``, ``resume`` work on that directory from any terminal:
``DIR/devnet.json`` records the nodes' pids, addresses and API URLs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.status import Status
from rich.text import Text

from devnet.demo import DemoJob, run_demo, wait_providers_ready
from devnet.launcher import (
    MANIFEST,
    Devnet,
    DevnetError,
    DevnetSpec,
    Manifest,
    NodeStartFailed,
    log_tail,
    pid_alive,
    plan_devnet,
    remove_devnet,
    serving_provider_config,
    write_devnet,
)
from devnet.load import (
    LoadArgumentError,
    LoadConfig,
    LoadProgress,
    load_progress_line,
    render_load_line,
    render_load_summary,
    run_load,
    select_clients,
)
from devnet.monitor import RateMeter, sample_nodes
from devnet.render import (
    render_demo_progress,
    render_demo_summary,
    render_start_card,
    render_status_line,
    render_status_table,
)
from kernels.probe import system_memory
from p2pgpu.cli import CLIError
from p2pgpu.config import ProviderConfig
from p2pgpu.provider_warmup import provider_slots

__all__ = [
    "run_demo_cmd",
    "run_down",
    "run_drill",
    "run_load_cmd",
    "run_logs",
    "run_status",
    "run_up",
    "run_url",
]


# ----------------------------------------------------------------- helpers


def _console(stderr: bool = False) -> Console:
    """A console that is as wide as the terminal, or 160 columns into a pipe or file (no mid-URL wrapping)."""

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160
    return Console(highlight=False, stderr=stderr, width=width)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """DevnetError -> one CLI line; a node that failed to start also gets its log tail printed first."""

    try:
        yield
    except NodeStartFailed as exc:
        _print_log_tail(exc)
        raise CLIError(str(exc)) from None
    except DevnetError as exc:
        raise CLIError(str(exc)) from None


def _print_log_tail(exc: NodeStartFailed) -> None:
    body = Text(exc.tail or "(the log is empty)")
    _console(stderr=True).print(Panel(body, title=f"last lines of {exc.log_path}", title_align="left",
                                      border_style="red"))


class _Progress:
    """A spinner line on a terminal; on a pipe, a plain line at most every few seconds."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status: Status | None = None
        self.last_plain = 0.0
        self.last_text = ""

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            self.status = self.console.status("starting…")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(None, None, None)

    def __call__(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)
        elif text != self.last_text and time.monotonic() - self.last_plain >= 2.0:
            self.console.print(text, soft_wrap=True)
            self.last_plain = time.monotonic()
            self.last_text = text


def _launcher_alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"devnet" in cmdline


class _Terminate(Exception):
    """SIGTERM to a foreground launcher: stop the devnet as Ctrl-C would."""


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate()


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------- up


def run_up(args: argparse.Namespace) -> int:
    console = _console()
    root: Path = args.dir.absolute()
    with _errors():
        if (root / MANIFEST).exists():
            devnet = Devnet.open(root)
            devnet.check_not_running()
            if args.fresh:
                remove_devnet(root)
            else:
                console.print(f"resuming the devnet in {root} (chain {devnet.manifest.chain_id[:16]}…); "
                              "node counts come from its manifest; pass --fresh to start a new one", soft_wrap=True)
        elif root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DevnetError(f"{root} exists and is not a devnet directory (no {MANIFEST}); choose another --dir")
        if not (root / MANIFEST).exists():
            spec = DevnetSpec(validators=args.validators, providers=args.providers, clients=args.clients,
                              block_interval=args.block_interval, base_port=args.base_port,
                              log_level=args.log_level, provider_default=_serving_providers(args))
            plan = plan_devnet(spec, master_seed=os.urandom(32), genesis_time_ms=int(time.time() * 1000))
            devnet = Devnet(write_devnet(plan, root))
            console.print(f"created a devnet in {root}: {len(plan.nodes)} nodes, chain "
                          f"{devnet.manifest.chain_id[:16]}…", soft_wrap=True)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, _raise_terminate)
    try:
        return _up(devnet, args, console)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def _serving_providers(args: argparse.Namespace) -> ProviderConfig:
    """``[provider]`` for a new devnet's providers: pushed models kept warm, slots for this machine."""
    return serving_provider_config(providers=args.providers, device_slots=provider_slots(ProviderConfig()),
                                   memory_bytes=system_memory(), slots=args.provider_slots)


def _up(devnet: Devnet, args: argparse.Namespace, console: Console) -> int:
    started = time.monotonic()
    try:
        with _errors():
            devnet.manifest.launcher_pid = None if args.detach else os.getpid()
            with _Progress(console) as progress:
                devnet.start_all(timeout=args.timeout, progress=progress)
                heights = devnet.heights()
                target = max((h for h in heights.values() if h is not None), default=0) + 2
                devnet.wait_finalized(target, timeout=args.timeout, progress=progress)
            devnet.manifest.save()
    except (KeyboardInterrupt, _Terminate):
        _ignore_stop_signals()
        devnet.stop_all(grace=5.0)
        console.print("interrupted: stopped every node started so far")
        return 130
    except BaseException:
        devnet.stop_all(grace=5.0)
        raise
    console.print(render_start_card(devnet.manifest, detached=args.detach, elapsed_s=time.monotonic() - started))
    code = 0
    interrupted = False
    if args.demo:
        try:
            code = _demo(devnet.manifest, console, tasks=args.tasks, seed=0, timeout=300.0)
        except CLIError as exc:
            console.print(f"[red]demo failed:[/] {exc}", soft_wrap=True)
            code = 1
        except (KeyboardInterrupt, _Terminate):
            interrupted = True  # Ctrl-C during the demo: detached nodes stay up; a foreground devnet stops
    if args.detach:
        return 130 if interrupted else code
    if not interrupted:
        try:
            _watch(devnet, console)
        except (KeyboardInterrupt, _Terminate):
            pass
    _ignore_stop_signals()  # a second Ctrl-C must not leave half the nodes running; SIGKILL follows the grace anyway
    console.print("stopping the devnet…")
    with contextlib.suppress(Exception):
        devnet.reload()  # pick up nodes restarted from another terminal
    devnet.manifest.launcher_pid = None
    how = devnet.stop_all()
    for name, result in how.items():
        console.print(f"  {name}: {result}")
    console.print(f"stopped {len(how)} node(s); data kept in {devnet.root} "
                  f"('p2pgpu devnet up --dir {devnet.root}' resumes it)", soft_wrap=True)
    return code


def _watch(devnet: Devnet, console: Console) -> None:
    """The live status line, until Ctrl-C; node deaths and restarts are printed above it as they happen."""

    meter = RateMeter()
    alive: dict[str, bool] = {}

    def tick() -> Text:
        with contextlib.suppress(Exception):  # a manifest mid-rewrite by another command: keep the last one
            devnet.reload()
        samples = sample_nodes(devnet.manifest.nodes)
        heights = [s.height for s in samples if s.height is not None]
        meter.observe(time.monotonic(), max(heights) if heights else None)
        for s in samples:
            if alive.get(s.name, True) != s.alive:
                console.print(f"{time.strftime('%H:%M:%S')} node {s.name} "
                              f"{'is back (pid ' + str(s.pid) + ')' if s.alive else 'is down'}")
            alive[s.name] = s.alive
        return render_status_line(samples, meter.rate())

    if console.is_terminal:
        with Live(tick(), console=console, refresh_per_second=4, transient=True) as live:
            while True:
                time.sleep(1.0)
                live.update(tick())
    else:
        while True:
            console.print(tick().plain, soft_wrap=True)
            time.sleep(1.0)


# ----------------------------------------------------------------- status, logs, down, drills


def run_status(args: argparse.Namespace) -> int:
    with _errors():
        devnet = Devnet.open(args.dir)
    samples = sample_nodes(devnet.manifest.nodes)
    if args.json:
        print(json.dumps({"dir": str(devnet.root), "chain_id": devnet.manifest.chain_id,
                          "nodes": [{f: getattr(s, f) for f in s.__slots__} for s in samples]}, indent=2))
    else:
        _console().print(render_status_table(devnet.manifest, samples))
    return 0


def run_url(args: argparse.Namespace) -> int:
    """Print one node's API URL and nothing else, so ``API=$(p2pgpu devnet url c0)`` works in a shell."""
    with _errors():
        manifest = Devnet.open(args.dir).manifest
        if args.name is not None:
            rec = manifest.node(args.name)
        else:
            clients = [n for n in manifest.nodes if "client" in n.roles]
            if not clients:
                raise DevnetError(f"the devnet in {manifest.root} has no client node; name a node: "
                                  f"{', '.join(n.name for n in manifest.nodes)}")
            rec = clients[0]
        if rec.pid is None or not rec.api_url or not pid_alive(rec.pid, rec.config):
            raise DevnetError(f"node {rec.name} is not running (state {rec.state}), so its API is not there; "
                              f"start the devnet with 'p2pgpu devnet up --detach --dir {manifest.root}'")
    print(rec.api_url)
    return 0


def run_logs(args: argparse.Namespace) -> int:
    with _errors():
        rec = Devnet.open(args.dir).manifest.node(args.name)
    if not rec.log.exists():
        raise CLIError(f"node {rec.name} has no log yet ({rec.log})")
    if args.lines == 0:
        with open(rec.log, "rb") as f:
            sys.stdout.write(f.read().decode("utf-8", "replace"))
    else:
        text = log_tail(rec.log, args.lines)
        if text:
            print(text)
    sys.stdout.flush()
    if not args.follow:
        return 0
    try:
        with open(rec.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            while True:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.25)
    except KeyboardInterrupt:
        return 0


def run_down(args: argparse.Namespace) -> int:
    console = _console()
    with _errors():
        devnet = Devnet.open(args.dir)
    launcher = devnet.manifest.launcher_pid
    if _launcher_alive(launcher):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(launcher, signal.SIGTERM)  # type: ignore[arg-type]
    how = devnet.stop_all(grace=args.grace)
    devnet.manifest.launcher_pid = None
    devnet.manifest.save()
    if not how:
        console.print(f"nothing was running in {devnet.root}")
    for name, result in how.items():
        console.print(f"{name}: {result}")
    return 0


def run_drill(args: argparse.Namespace) -> int:
    console = _console()
    with _errors():
        devnet = Devnet.open(args.dir)
        devnet.manifest.node(args.name)  # UnknownNode lists the names
        if args.drill == "kill":
            rec = devnet.kill(args.name)
            console.print(f"killed {rec.name} (SIGKILL); 'p2pgpu devnet restart {rec.name}' brings it back")
        elif args.drill == "pause":
            rec = devnet.pause(args.name)
            console.print(f"paused {rec.name} (SIGSTOP, pid {rec.pid}); 'p2pgpu devnet resume {rec.name}' continues it")
        elif args.drill == "resume":
            rec = devnet.resume(args.name)
            console.print(f"resumed {rec.name} (SIGCONT, pid {rec.pid})")
        else:
            with _Progress(console) as progress:
                rec = devnet.restart(args.name, timeout=args.timeout, progress=progress)
                console.print(f"restarted {rec.name} (pid {rec.pid}, API {rec.api_url})")
                if not args.no_wait:
                    others = {n: h for n, h in devnet.heights().items() if n != rec.name and h is not None}
                    target = max(others.values(), default=0)
                    if target:
                        devnet.wait_finalized(target, timeout=args.timeout, names=[rec.name], progress=progress)
                        console.print(f"{rec.name} caught up to height {target}")
    return 0


# ----------------------------------------------------------------- demo


def _demo(manifest: Manifest, console: Console, *, tasks: int, seed: int, timeout: float) -> int:
    names = {n.address: n.name for n in manifest.nodes}
    console.print(f"demo: submitting {tasks} matmul task(s) through the client node")
    live: Live | None = None
    last_plain: dict[int, str] = {}

    def on_update(jobs: Sequence[DemoJob], views: Sequence[Any]) -> None:  # TaskViews, as devnet.demo.UpdateFn
        nonlocal live
        if console.is_terminal:
            table = render_demo_progress(jobs, views, names)
            if live is None:
                live = Live(table, console=console, refresh_per_second=4)
                live.__enter__()
            else:
                live.update(table)
        else:
            for job, view in zip(jobs, views, strict=True):
                if last_plain.get(job.index) != view.stage:
                    last_plain[job.index] = view.stage
                    console.print(f"task {job.index} ({job.label}) {view.task_id.hex()[:12]}: {view.stage}"
                                  + (f" {view.outcome}" if view.outcome else ""), soft_wrap=True)

    try:
        with _errors():
            with _Progress(console) as progress:
                ready = wait_providers_ready(manifest, timeout=timeout, progress=progress)
            console.print(f"providers ready to bid: {', '.join(ready)}")
            summary = run_demo(manifest, tasks=tasks, seed=seed, timeout=timeout, on_update=on_update)
    finally:
        if live is not None:
            live.__exit__(None, None, None)
    console.print(render_demo_summary(summary))
    return 0 if summary.all_verified else 1


def run_demo_cmd(args: argparse.Namespace) -> int:
    with _errors():
        devnet = Devnet.open(args.dir)
    return _demo(devnet.manifest, _console(), tasks=args.tasks, seed=args.seed, timeout=args.timeout)


# ----------------------------------------------------------------- load


def run_load_cmd(args: argparse.Namespace) -> int:
    with _errors():
        if not 0.0 <= args.audit_rate <= 1.0:
            raise LoadArgumentError(f"--audit-rate {args.audit_rate:g}: must be between 0 and 1")
        config = LoadConfig(tasks=args.tasks, rate=args.rate, concurrency=args.concurrency, size=args.size,
                            seed=args.seed, timeout=args.timeout, poll=args.poll_interval,
                            max_unit_price=args.max_price, bid_window=args.bid_window,
                            audit_rate_bps=round(args.audit_rate * 10_000))
        devnet = Devnet.open(args.dir)
        clients = select_clients(devnet.manifest, args.clients)
    console = _console(stderr=args.json)  # with --json, stdout carries only the summary
    console.print(f"load: {config.describe()} through {', '.join(c.name for c in clients)}", soft_wrap=True)
    live: Live | None = None
    last_plain = (0.0, "")

    def on_progress(p: LoadProgress) -> None:
        nonlocal live, last_plain
        if console.is_terminal:
            if live is None:
                live = Live(render_load_line(p), console=console, refresh_per_second=4)
                live.__enter__()
            else:
                live.update(render_load_line(p))
            return
        text = load_progress_line(p)
        done = p.submitted == p.tasks and p.in_flight == 0
        if text != last_plain[1] and (done or time.monotonic() - last_plain[0] >= 2.0):
            last_plain = (time.monotonic(), text)
            console.print(text, soft_wrap=True)

    try:
        with _errors():
            with _Progress(console) as progress:
                ready = wait_providers_ready(devnet.manifest, timeout=300.0, progress=progress)
            console.print(f"providers ready to bid: {', '.join(ready)}")
            summary = run_load(devnet.manifest, config, clients=clients, on_progress=on_progress, wait_ready=False)
    finally:
        if live is not None:
            live.__exit__(None, None, None)
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        console.print(render_load_summary(summary))
    return 0 if summary.ok else 1
