"""``p2pgpu submit``, ``p2pgpu task show`` and ``p2pgpu ledger ...``: the API's command-line clients.

``submit`` builds a job spec from a JSON file and .npy inputs (hashing the
inputs itself, so the spec file needs no hashes), posts it through the local
API, follows the task through posted -> bids -> assigned -> running ->
delivered -> settled, and writes the outputs as .npy files. A task that ends
other than paid exits 1 with what happened to the money; a problem the user
can fix (bad file, API unreachable) exits 2.

``--jobs PATH`` posts many jobs at once (a directory of job folders, or a
JSON list of jobs; the layout is in :mod:`p2pgpu.jobs`) through the
batch route, follows them all in one live display (settled out of total,
counts per stage and outcome, ETA), writes each paid result under
``--out DIR/<job name>/`` and exits 0 only if every job was paid with its
result.

A node whose config lists ``[[api.tokens]]`` wants one: ``--token TOKEN`` or
the ``P2PGPU_API_TOKEN`` environment variable (the flag wins; prefer the
variable on a shared machine, since arguments show in ``ps`` and shell
history).

``--stream ITEMS.npy`` posts a stream task instead (kernel ``stream_infer``;
``--input`` gives the model and weights, each row of ITEMS.npy is one item,
``--units`` defaults to the number of rows); the node checks every item
against the model's input before posting, and the outputs come back stacked
in ``outputs.npy``. With ``--model REF`` instead of ``--spec`` it needs no
``--input``: the provider fetches the registered model's weights.

Spec file (JSON)::

    {"kernel": "matmul", "version": 1, "params": {},
     "requirements": {"device": "any", "memory_bytes": 1073741824},   # optional
     "limits": {"seconds": 60, "output_bytes": 1073741824},           # optional
     "inputs": {"a": {"hash": "...", "dtype": "float32", "shape": [2, 3]}}}  # optional; checked if given
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ledger.books import BUCKETS
from p2pgpu.cli import CLIError
from p2pgpu.intparse import U32_MAX, U64_MAX, cli_int
from p2pgpu.jobs import LAYOUT_HELP
from p2pgpu.submit_io import (
    OUTCOME_MESSAGES,
    TOKEN_ENV,
    api_client,
    build_request,
    call_api,
    check_out_dir,
    load_npy,
    load_spec_file,
    make_console,
    model_spec,
    write_outputs,
)

# Our own imports inside functions here are deliberate: every `p2pgpu` command imports this module to build its
# parser (p2pgpu.cli, ~0.13 s for `p2pgpu --help`), so each stays where its command runs. Measured cost of each,
# on top of the parser, min of 3 runs: p2pgpu.api.types 0.9 s (kernels, numpy, trio), p2pgpu.submit_batch 0.85 s.

__all__ = ["DEFAULT_API", "register"]

DEFAULT_API = "http://127.0.0.1:8645"


def _api_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", default=os.environ.get("P2PGPU_API", DEFAULT_API), metavar="URL",
                        help=f"the node's local API (default: $P2PGPU_API or {DEFAULT_API})")
    # No default here: the variable is read when the command runs, so the token never shows in --help.
    parser.add_argument("--token", default=None, metavar="TOKEN",
                        help=f"bearer token for a node with [[api.tokens]] (default: ${TOKEN_ENV}; prefer the "
                             "variable: arguments show in ps and shell history)")


def register(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="post compute tasks and wait for their results",
                                   description=__doc__.split("\n\n")[1] if __doc__ else None,
                                   epilog=LAYOUT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _api_option(submit)
    which = submit.add_mutually_exclusive_group(required=True)
    which.add_argument("--spec", type=Path, metavar="FILE.json", help="job spec of one job (see docs)")
    which.add_argument("--model", metavar="REF",
                       help="inference with a registered model (id, NAME or NAME@VERSION): give its batch as "
                            "--input x=X.npy, or its items as --stream ITEMS.npy; the task names the model and "
                            "no weights are sent")
    which.add_argument("--jobs", type=Path, metavar="PATH",
                       help="many jobs: a directory of job folders or a JSON list of jobs (layout below); "
                            "posted together, followed in one display")
    submit.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input tensor; repeat for each input the kernel takes")
    submit.add_argument("--max-price", type=cli_int(1, U64_MAX), metavar="N",
                        help="most you pay per unit (with --jobs: for jobs that do not set max_price)")
    submit.add_argument("--units", type=cli_int(1, U32_MAX), default=None,
                        help="units of work: 1 for a batch task; for a stream, the most items paid for "
                             "(default: the number of items)")
    submit.add_argument("--stream", type=Path, default=None, metavar="ITEMS.npy",
                        help="make it a stream task (stream_infer): send each row of ITEMS.npy as one item; "
                             "the outputs come back stacked in outputs.npy")
    submit.add_argument("--bid-window", type=cli_int(1, U32_MAX), default=10, metavar="BLOCKS",
                        help="blocks to wait for bids before the task expires (default 10)")
    submit.add_argument("--audit-rate", type=float, default=0.1, metavar="R",
                        help="chance in [0, 1] that verifiers re-execute the task (default 0.1)")
    submit.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="directory for the output .npy files (with --jobs: DIR/<job name>/ per job)")
    submit.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    submit.add_argument("--poll-interval", type=float, default=0.5, metavar="S", help=argparse.SUPPRESS)
    submit.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="give up waiting after S seconds (the tasks go on; see 'p2pgpu task show')")
    submit.set_defaults(run=run_submit)

    task = subparsers.add_parser("task", help="look at a task")
    task.set_defaults(run=None, parser=task)
    task_sub = task.add_subparsers(dest="task_command", metavar="SUBCOMMAND")
    show = task_sub.add_parser("show", help="stage, bids, provider, outcome and timings of a task")
    _api_option(show)
    show.add_argument("task_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=run_task_show)
    dispute = task_sub.add_parser("dispute", help="dispute one provider-signed output of a stream task",
                                  description="The node sends a Dispute carrying the provider's signature over "
                                              "that output and a bond; drawn verifiers recompute the item. A "
                                              "wrong output slashes the provider; a right one costs the bond.")
    _api_option(dispute)
    dispute.add_argument("task_id", metavar="ID")
    dispute.add_argument("--item", required=True, type=cli_int(0, U64_MAX), metavar="N", help="the item's index (0-based)")
    dispute.add_argument("--reason", default="", help="why (kept in the task's detail)")
    dispute.set_defaults(run=run_task_dispute)
    delete = task_sub.add_parser("delete", help="delete a settled task's kept result from the node",
                                 description="The client node keeps every task and its result on disk, across "
                                             "restarts, until deleted here or until [client] "
                                             "result_retention_hours pass. Refused while the task is open.")
    _api_option(delete)
    delete.add_argument("task_id", metavar="ID")
    delete.set_defaults(run=run_task_delete)

    ledger = subparsers.add_parser("ledger", help="query the ledger through the node's API")
    ledger.set_defaults(run=None, parser=ledger)
    ledger_sub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    balance = ledger_sub.add_parser("balance", help="balance of an address")
    balance.add_argument("address")
    for name, helptext in (("validators", "validators with stake and status"),
                           ("providers", "providers with bond and record"), ("head", "the last finalized block"),
                           ("supply", "the ledger's books: funds in each bucket, and whether they add up")):
        p = ledger_sub.add_parser(name, help=helptext)
        _api_option(p)
        p.add_argument("--json", action="store_true")
        p.set_defaults(run=run_ledger, query=name)
    _api_option(balance)
    balance.add_argument("--json", action="store_true")
    balance.set_defaults(run=run_ledger, query="balance")


# ----------------------------------------------------------------- helpers


def _load_inputs(pairs: list[str], flag: str = "--input") -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise CLIError(f"{flag} {pair!r}: expected NAME=FILE.npy")
        if name in inputs:
            raise CLIError(f"{flag} {name!r} given twice")
        inputs[name] = load_npy(file, f"{flag} {name}")
    if not inputs:
        raise CLIError("no inputs: give --input NAME=FILE.npy for each input the kernel takes")
    return inputs


def _short(data: bytes | None) -> str:
    return "-" if data is None else data.hex()[:12] + "…"


def _stage_line(view: Any) -> str:
    parts = [f"{view.stage:<9}"]
    if view.bids:
        parts.append(f"bids {len(view.bids)} (best {min(b.unit_price for b in view.bids)})")
    if view.provider is not None:
        parts.append(f"provider {_short(view.provider)} at {view.unit_price}")
    timing = dict(view.timings).get(view.stage)
    if timing is not None:
        parts.append(f"height {timing.height}")
    if view.outcome:
        parts.append(f"outcome {view.outcome}")
    if view.detail:
        parts.append(view.detail)
    return "  ".join(parts)


# ----------------------------------------------------------------- submit


def run_submit(args: argparse.Namespace) -> int:
    if args.jobs is not None:
        # Imported here: p2pgpu.submit_batch costs 0.85 s (rich, the API's types, numpy), and every p2pgpu command
        # imports this module to build its parser.
        from p2pgpu.submit_batch import run_jobs

        return run_jobs(args)
    if args.max_price is None:
        raise CLIError("--max-price is required with --spec or --model")
    by_model_stream = args.model is not None and args.stream is not None  # its spec has no inputs at all
    inputs = {} if by_model_stream and not args.input else _load_inputs(args.input)
    items = _load_inputs([f"items={args.stream}"], "--stream")["items"] if args.stream is not None else None
    if "items" in inputs:
        raise CLIError("--input items: that name is reserved for a stream's items; give them with --stream")
    units = args.units if args.units is not None else (
        int(items.shape[0]) if items is not None and items.ndim >= 1 else 1)
    if units < 1:  # (--units itself is at least 1: argparse checks it)
        raise CLIError("--stream holds no items: a stream task needs at least one")
    if not 0.0 <= args.audit_rate <= 1.0:
        raise CLIError(f"--audit-rate {args.audit_rate} is not in [0, 1]")
    out: Path = args.out
    check_out_dir(out, args.force)
    spec = load_spec_file(args.spec, inputs) if args.model is None else None
    console = make_console()
    with api_client(args) as client:
        if spec is None:
            spec = model_spec(client, args.model, inputs, stream=items is not None)
            console.print(f"model {args.model}: {spec.param_dict()['model_id']}", soft_wrap=True)
        request = build_request(spec, inputs, items, max_price=args.max_price, units=units,
                                bid_window=args.bid_window, audit_rate=args.audit_rate)
        task_id: bytes = call_api(lambda: client.submit(request))
        console.print(f"task {task_id.hex()} posted via {client.base_url}", soft_wrap=True)
        view = _follow(client, task_id, console, args.poll_interval, args.timeout)
        tid = task_id.hex()
        if view.outcome != "paid":
            template = OUTCOME_MESSAGES.get(view.outcome or "", "task {tid} settled with outcome {outcome}")
            raise CLIError(template.format(tid=tid, provider=_short(view.provider), outcome=view.outcome),
                           exit_code=1)
        outputs = call_api(lambda: client.task_result(task_id))
    written = write_outputs(out, outputs)
    console.print(f"settled: paid {view.unit_price} x {units if items is None else 'items served'} to provider "
                  f"{_short(view.provider)}; "
                  f"wrote {', '.join(str(p) for p in written)}", soft_wrap=True)
    return 0


def _follow(client: Any, task_id: bytes, console: Any, poll: float, timeout: float) -> Any:
    """Poll the task until it settles, showing each stage once (a live line on a terminal)."""
    deadline = time.monotonic() + timeout
    shown: str | None = None
    live = console.is_terminal
    status = console.status("waiting for the task…") if live else None
    if status is not None:
        status.start()
    try:
        while True:
            view = call_api(lambda: client.task(task_id))
            if view.stage != shown:
                shown = view.stage
                console.print(_stage_line(view), soft_wrap=True)
            if status is not None:
                status.update(f"task {task_id.hex()[:12]}…  {_stage_line(view)}")
            if view.stage == "settled":
                return view
            if time.monotonic() >= deadline:
                raise CLIError(f"gave up after {timeout:g} s with task {task_id.hex()} at stage {view.stage}; "
                               "it goes on: follow it with 'p2pgpu task show'", exit_code=1)
            time.sleep(poll)
    finally:
        if status is not None:
            status.stop()


# ----------------------------------------------------------------- task show, ledger


def run_task_dispute(args: argparse.Namespace) -> int:
    from p2pgpu.api.types import parse_task_id

    task_id = call_api(lambda: parse_task_id(args.task_id))
    with api_client(args) as client:
        call_api(lambda: client.dispute_item(task_id, args.item, args.reason))
    make_console().print(f"disputed item {args.item} of task {task_id.hex()}; follow it with 'p2pgpu task show'",
                     soft_wrap=True)
    return 0


def run_task_delete(args: argparse.Namespace) -> int:
    from p2pgpu.api.types import parse_task_id

    task_id = call_api(lambda: parse_task_id(args.task_id))
    with api_client(args) as client:
        call_api(lambda: client.delete_result(task_id))
    make_console().print(f"deleted task {task_id.hex()} and its result from the node", soft_wrap=True)
    return 0


def run_task_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from p2pgpu.api.types import parse_task_id, task_view_json

    task_id = call_api(lambda: parse_task_id(args.task_id))
    with api_client(args) as client:
        view = call_api(lambda: client.task(task_id))
    if args.json:
        print(json.dumps(task_view_json(view), indent=2))
        return 0
    console = make_console()
    table = Table(title=f"task {view.task_id.hex()}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("stage", view.stage)
    table.add_row("outcome", view.outcome or "-")
    table.add_row("provider", view.provider.hex() if view.provider else "-")
    table.add_row("unit price", "-" if view.unit_price is None else str(view.unit_price))
    if view.model_id is not None:
        named = f"{view.model_name}@{view.model_version}  " if view.model_name is not None else ""
        table.add_row("model", named + view.model_id.hex())
        start = "-" if view.start_warm is None else ("warm" if view.start_warm else
                                                     f"cold (~{view.startup_seconds or 0:.3g} s to load)")
        table.add_row("start", start)
        table.add_row("royalty", f"{view.royalty_paid} paid ({view.royalty_per_unit} per unit)")
    if view.detail:
        table.add_row("detail", view.detail)
    console.print(table)
    if view.bids:
        bids = Table(title="bids", title_justify="left")
        for col in ("provider", "unit price", "est. seconds", "expires at"):
            bids.add_column(col, overflow="fold")
        for b in sorted(view.bids, key=lambda b: b.unit_price):
            bids.add_row(b.provider.hex(), str(b.unit_price), str(b.est_seconds), str(b.expiry_height))
        console.print(bids)
    if view.timings:
        timings = Table(title="timings", title_justify="left")
        for col in ("stage", "height", "time (ms)"):
            timings.add_column(col)
        for stage, t in view.timings:
            timings.add_row(stage, str(t.height), str(t.time_ms))
        console.print(timings)
    return 0


_LEDGER_COLUMNS = {
    "validators": ("address", "stake", "status", "in_committee", "jailed_until"),
    "providers": ("address", "bond", "completed", "failed", "missed", "unavailable"),
}


def _supply_table(books: dict[str, Any]) -> Any:
    """The buckets, then what they must add up to: a reader sees where the funds are and whether any went missing."""
    from rich.table import Table

    table = Table(title=f"supply at height {books['height']}", show_header=False, title_justify="left")
    table.add_column("bucket", style="bold")
    table.add_column("amount", justify="right")
    for name in BUCKETS:
        table.add_row(name.replace("_", " "), str(books[name]), end_section=name == BUCKETS[-1])
    table.add_row("total", str(books["total"]))
    table.add_row("genesis supply", str(books["genesis_supply"]))
    table.add_row("minted", str(books["minted"]))
    if books["conserved"]:
        table.add_row("conserved", "yes")
    else:
        off = books["total"] - books["genesis_supply"] - books["minted"]
        table.add_row("conserved", f"[red]NO: total - (genesis supply + minted) = {off:+}[/red]")
    return table


def run_ledger(args: argparse.Namespace) -> int:
    from rich.table import Table

    from p2pgpu.api.types import parse_address

    with api_client(args) as client:
        if args.query == "balance":
            address = call_api(lambda: parse_address(args.address))
            result: Any = call_api(lambda: client.balance(address.hex()))
        else:
            result = call_api(getattr(client, args.query))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = make_console()
    if args.query == "supply":
        table = _supply_table(result)
    elif args.query in _LEDGER_COLUMNS:
        cols = _LEDGER_COLUMNS[args.query]
        table = Table(title=f"{args.query} ({len(result)})", title_justify="left")
        for col in cols:
            # Addresses whole on one line, so they can be copied; the BLS key is in --json.
            table.add_column(col.replace("_", " "), no_wrap=col == "address", overflow="fold")
        for row in result:
            table.add_row(*(str(row.get(c, "-")) for c in cols))
    else:
        table = Table(title=args.query, show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in result.items():
            table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    return 0
