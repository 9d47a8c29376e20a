"""What the devnet commands print, as rich renderables built from plain values.

Nothing here reads files, processes or sockets, so each view is tested by
printing it into ``Console(file=StringIO(), width=...)``: the start card (as
anvil's), the one-line live status (as solana-test-validator's), the status
table, and the demo's progress and summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devnet.demo import DemoJob, DemoSummary
from devnet.launcher import Manifest
from devnet.monitor import NodeSample

__all__ = ["render_demo_progress", "render_demo_summary", "render_start_card", "render_status_line",
           "render_status_table", "short"]

STAGES = ("posted", "bids", "assigned", "running", "delivered", "settled")
_HEALTH_STYLE = {"ready": "green", "syncing": "yellow", "paused": "yellow", "starting": "yellow",
                 "down": "red", "unreachable": "red", "stopped": "dim", "killed": "red"}


def short(text: str, keep: int = 12) -> str:
    return text if len(text) <= keep + 1 else text[:keep] + "…"


def _p2p_addr(addrs: Sequence[str]) -> str:
    for a in addrs:
        if a.startswith("/ip4/127.0.0.1/"):
            return a.split("/p2p/", 1)[0]
    return addrs[0].split("/p2p/", 1)[0] if addrs else "-"


def _q(path: Any) -> str:
    text = str(path)
    return f"'{text}'" if any(c in text for c in " '\"$") else text


def render_start_card(manifest: Manifest, *, detached: bool, elapsed_s: float | None = None) -> Panel:
    """The card printed once every node finalizes blocks: who runs where, and how to drive it."""
    nodes = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("node", "roles", "pid", "peer id", "account", "p2p", "API"):
        nodes.add_column(col, no_wrap=True, overflow="ellipsis")
    for n in manifest.nodes:
        nodes.add_row(n.name, ",".join(n.roles), str(n.pid or "-"), short(n.peer_id, 14), short(n.address, 8),
                      _p2p_addr(n.addrs).removeprefix("/ip4/"), n.api_url or "-")
    d = _q(manifest.root)
    first = manifest.nodes[0].name
    client = next((n for n in manifest.nodes if "client" in n.roles), None)
    lines = Text()
    lines.append("Chain      ", style="bold").append(f"{manifest.chain_name} ")
    lines.append(f"{manifest.chain_id}\n", style="dim")
    lines.append("Data dir   ", style="bold").append(f"{manifest.root}\n")
    lines.append("Manifest   ", style="bold").append(f"{manifest.root / 'devnet.json'}  (JSON for scripts)\n")
    lines.append("Logs       ", style="bold").append(f"{manifest.root / 'logs'}/<node>.log\n")
    lines.append("Keys       ", style="bold").append("nodes/<node>/key*.json, encrypted with the generated\n")
    lines.append(f"           passphrase in {manifest.passphrase_file} (mode 0600)\n")
    lines.append("           ")
    lines.append("DEVNET ONLY: keys and passphrase sit side by side; never use them for value.\n",
                 style="yellow")
    lines.append("\nCommands\n", style="bold")
    cmds = [
        ("status", f"p2pgpu devnet status --dir {d}"),
        ("follow a log", f"p2pgpu devnet logs {first} -f --dir {d}"),
        ("run the demo", f"p2pgpu devnet demo --dir {d}"),
        ("fault drills", f"p2pgpu devnet kill|restart|pause|resume {first} --dir {d}"),
        ("stop", (f"p2pgpu devnet down --dir {d}" if detached else f"Ctrl-C here (or p2pgpu devnet down --dir {d})")),
    ]
    if client is not None and client.api_url:
        cmds.insert(3, ("submit a task", f"p2pgpu submit --api {client.api_url} --spec job.json --input a=a.npy ..."))
        cmds.insert(4, ("serve a model", f"p2pgpu model push model.keras --name NAME --api {client.api_url}"))
        cmds.insert(5, ("", f"then POST {client.api_url}/v2/models/NAME/infer (README: Serve a Keras model)"))
    for label, cmd in cmds:
        lines.append(f"  {label:<14}", style="dim").append(cmd + "\n")
    title = f"p2pgpu devnet: {len(manifest.nodes)} nodes up"
    if elapsed_s is not None:
        title += f" in {elapsed_s:.1f} s"
    return Panel(Group(nodes, Text(""), lines), title=title, title_align="left", border_style="green")


def render_status_line(samples: Sequence[NodeSample], rate: float | None) -> Text:
    """One line for the whole devnet: height, finalization rate, peers, mempool, tasks, nodes up."""
    heights = [s.height for s in samples if s.height is not None]
    peers = [s.peers for s in samples if s.peers is not None]
    mempool = [s.mempool for s in samples if s.mempool is not None]
    tasks = [s.tasks for s in samples if s.tasks is not None]
    ready = sum(1 for s in samples if s.health == "ready")
    line = Text()
    if heights:
        line.append("height ", style="dim").append(str(max(heights)), style="bold")
        if min(heights) != max(heights):
            line.append(f" (min {min(heights)})", style="yellow")
    else:
        line.append("height ", style="dim").append("-")
    line.append("  finalized ", style="dim").append("-" if rate is None else f"{rate:.2f} blk/s")
    line.append("  peers ", style="dim").append(
        "-" if not peers else (str(min(peers)) if min(peers) == max(peers) else f"{min(peers)}-{max(peers)}"))
    line.append("  mempool ", style="dim").append("-" if not mempool else str(max(mempool)))
    line.append("  tasks ", style="dim").append("-" if not tasks else str(sum(tasks)))
    style = "green" if ready == len(samples) else "yellow"
    line.append("  nodes ", style="dim").append(f"{ready}/{len(samples)} ready", style=style)
    troubled = [f"{s.name} {s.health}" for s in samples if s.health != "ready"]
    if troubled:
        line.append("  (" + ", ".join(troubled) + ")", style="yellow")
    return line


def render_status_table(manifest: Manifest, samples: Sequence[NodeSample]) -> Table:
    table = Table(title=f"devnet {manifest.root}  chain {short(manifest.chain_id, 16)}", title_justify="left",
                  header_style="bold")
    for col in ("node", "roles", "pid", "alive", "health", "height", "peers", "mempool", "API"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("pid", "height", "peers", "mempool") else "left")
    for s in samples:
        style = _HEALTH_STYLE.get(s.health, "")
        health = Text(s.health, style=style)
        if s.detail and s.health not in ("ready",):
            health.append(f" ({s.detail})", style="dim")
        table.add_row(s.name, ",".join(s.roles), str(s.pid or "-"), "yes" if s.alive else "no", health,
                      _num(s.height), _num(s.peers), _num(s.mempool), s.api_url or "-")
    return table


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


def _stage_track(stage: str, outcome: str | None) -> Text:
    reached = STAGES.index(stage) if stage in STAGES else -1
    track = Text()
    for i, name in enumerate(STAGES):
        if i:
            track.append(" → ", style="dim")
        if i < reached:
            track.append(name, style="green")
        elif i == reached:
            style = "bold green" if name != "settled" or outcome == "paid" else "bold red"
            track.append(name, style=style)
        else:
            track.append(name, style="dim")
    return track


def render_demo_progress(jobs: Sequence[DemoJob], views: Sequence[Any], names: Mapping[str, str]) -> Table:
    """One row per task: its stage on the posted → … → settled track, bids, provider, price, outcome."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "job", "task", "progress", "bids", "provider", "price", "outcome"):
        table.add_column(col, no_wrap=True)
    for job, view in zip(jobs, views, strict=True):
        provider = "-" if view.provider is None else names.get(view.provider.hex(), short(view.provider.hex()))
        table.add_row(str(job.index), job.label, short(view.task_id.hex(), 10), _stage_track(view.stage, view.outcome),
                      str(len(view.bids)), provider, _num(view.unit_price), view.outcome or "")
    return table


def render_demo_summary(summary: DemoSummary) -> Panel:
    tasks = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("task", "job", "outcome", "provider", "price", "to assign", "total", "result vs NumPy"):
        tasks.add_column(col, no_wrap=True)
    for t in summary.tasks:
        if t.verified is None:
            check = Text("not checked" if t.outcome != "paid" else "-", style="dim")
        elif t.verified:
            check = Text(f"ok (max rel err {t.max_error:.1e})" if t.max_error is not None else "ok", style="green")
        else:
            check = Text(f"MISMATCH: {t.detail}", style="bold red")
        outcome = Text(t.outcome or f"{t.stage} (unsettled)", style="green" if t.outcome == "paid" else "red")
        tasks.add_row(short(t.task_id, 10), t.label, outcome, t.provider or "-", _num(t.unit_price),
                      _secs(t.time_to_assign_s), _secs(t.total_s), check)
    balances = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("account", "before", "after", "change"):
        balances.add_column(col, justify="left" if col == "account" else "right", no_wrap=True)
    for name, before in summary.balances_before.items():
        after = summary.balances_after.get(name)
        change = "-" if after is None else f"{after - before:+,}"
        balances.add_row(name, f"{before:,}", "-" if after is None else f"{after:,}", change)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items()))
    head = Text()
    head.append(f"{summary.settled}/{len(summary.tasks)} tasks settled", style="bold")
    head.append(f" ({outcomes})  total paid {summary.total_paid:,}")
    mean = summary.mean_time_to_assign_s
    head.append(f"  mean time to assignment {_secs(mean)}  elapsed {summary.elapsed_s:.1f} s")
    ok = summary.all_verified
    verdict = Text("every result matches NumPy" if ok else "not every task was paid with a verified result",
                   style="bold green" if ok else "bold red")
    return Panel(Group(head, Text(""), tasks, Text(""), balances, Text(""), verdict), title="demo summary",
                 title_align="left", border_style="green" if ok else "red")


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"
