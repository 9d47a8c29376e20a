"""``p2pgpu model inspect|push|ls|show``: model files, checked as the network would, and the model registry.

The file (``.keras``, legacy Keras H5, or an ``.npz`` of today's
``model``/``weight_NNN`` inputs) is read as data by :mod:`kernels.bundle`;
nothing of it runs and TensorFlow is not imported. The id printed is the
one ``model push`` registers.

``push`` validates the file here first (a bad file, name or royalty is
refused before the node is contacted), sends the canonical bundle to the
node (``POST /models``: the node checks the name, the royalty bound and its
balance before it signs anything), then waits until the ``RegisterModel``
is in a final block and prints the model's id. ``ls`` and ``show`` read the
registry (``GET /ledger/models``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ledger.modelnames import is_valid_model_name
from p2pgpu.cli import CLIError
from p2pgpu.intparse import U64_MAX, cli_int

# kernels.bundle is imported inside run_inspect: every `p2pgpu` command imports this module to build its parser,
# and the bundle code pulls in numpy and h5py (about 0.3 s) that only this command needs. Likewise the API client
# (p2pgpu.submit_io / p2pgpu.api: kernels, numpy, trio, ~0.9 s) inside the commands that call the node.
# ledger.modelnames is a few regexes: imported at the top.

DEFAULT_API = "http://127.0.0.1:8645"
TOKEN_ENV = "P2PGPU_API_TOKEN"

__all__ = ["register", "render_summary"]


def register(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="model bundles: validate and inspect model files")
    model.set_defaults(run=None, parser=model)
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    inspect = model_sub.add_parser(
        "inspect", help="validate a model file (no code of it runs) and print its id, layers and signature",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    inspect.add_argument("file", metavar="FILE", help=".keras, legacy .h5, or .npz of model/weight_NNN inputs")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(run=run_inspect)

    push = model_sub.add_parser("push", help="validate a model file, register it on the ledger, serve it to providers")
    push.add_argument("file", metavar="FILE", help=".keras, legacy .h5, or .npz of model/weight_NNN inputs")
    push.add_argument("--name", required=True, help="registry name: lowercase [a-z0-9][a-z0-9._-]{0,63}; the first "
                                                    "account to register a name owns all its versions")
    push.add_argument("--version", default="1", help="version (same alphabet; default 1); a version never changes")
    push.add_argument("--royalty", type=cli_int(0, U64_MAX), default=0, metavar="N",
                      help="paid to you per unit of work with this model (default 0; the chain caps it)")
    push.add_argument("--timeout", type=float, default=300.0, metavar="S",
                      help="give up waiting for the registration after S seconds (default 300)")
    push.add_argument("--poll-interval", type=float, default=0.5, metavar="S", help=argparse.SUPPRESS)
    _api_options(push)
    push.set_defaults(run=run_push)

    ls = model_sub.add_parser("ls", help="list registered models")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")
    _api_options(ls)
    ls.set_defaults(run=run_ls)

    show = model_sub.add_parser("show", help="show one registered model: by id, NAME (latest) or NAME@VERSION")
    show.add_argument("ref", metavar="NAME|ID")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    _api_options(show)
    show.set_defaults(run=run_show)


def _api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", default=os.environ.get("P2PGPU_API", DEFAULT_API), metavar="URL",
                        help=f"the node's local API (default: $P2PGPU_API or {DEFAULT_API})")
    parser.add_argument("--token", default=None, metavar="TOKEN",
                        help=f"bearer token for a node with [[api.tokens]] (default: ${TOKEN_ENV})")


def summary(path: str) -> dict[str, Any]:
    """The name-free facts of a model file; raises CLIError naming what is wrong with it."""
    from kernels.bundle import encode_bundle, layer_summary, load_model_file, model_id, parameter_count
    from kernels.errors import KernelError

    try:
        bundle = load_model_file(path)
    except KernelError as exc:
        raise CLIError(f"{path}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror or exc}") from exc
    return {
        "id": model_id(bundle).hex(),
        "bundle_bytes": len(encode_bundle(bundle)),
        "parameters": parameter_count(bundle),
        "input": {"dtype": bundle.input.dtype, "shape": list(bundle.input.shape)},
        "output": {"dtype": bundle.output.dtype, "shape": list(bundle.output.shape)},
        "layers": [{"name": name, "class": cls, "parameters": params} for name, cls, params in layer_summary(bundle)],
    }


def _shape(shape: list[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def render_summary(facts: dict[str, Any]) -> str:
    lines = [
        f"id          {facts['id']}",
        f"input       {facts['input']['dtype']} {_shape(facts['input']['shape'])} per item",
        f"output      {facts['output']['dtype']} {_shape(facts['output']['shape'])} per item",
        f"parameters  {facts['parameters']:,}",
        f"size        {facts['bundle_bytes']:,} bytes (bundle)",
        f"layers      {len(facts['layers'])}",
    ]
    width = max((len(layer["name"]) for layer in facts["layers"]), default=0)
    lines += [f"  {layer['name']:<{width}}  {layer['class']:<24} {layer['parameters']:>12,}" for layer in facts["layers"]]
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    facts = summary(args.file)
    print(json.dumps(facts, sort_keys=True) if args.json else render_summary(facts))
    return 0


# ------------------------------------------------------------------ the registry


def _check_push_args(args: argparse.Namespace) -> None:
    for what, text in (("--name", args.name), ("--version", args.version)):
        if not is_valid_model_name(text):
            raise CLIError(f"{what} {text!r}: use lowercase letters, digits and . _ - (first a letter or digit), "
                           f"at most 64 characters, not a 64-digit hex id")


def run_push(args: argparse.Namespace) -> int:
    from kernels.bundle import encode_bundle, load_model_file
    from kernels.errors import KernelError
    from p2pgpu.submit_io import api_client, call_api

    _check_push_args(args)
    try:
        bundle = encode_bundle(load_model_file(args.file))  # refused here: nothing reaches the node
    except KernelError as exc:
        raise CLIError(f"{args.file}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise CLIError(f"{args.file}: {exc.strerror or exc}") from exc
    with api_client(args) as client:
        pushed = call_api(lambda: client.push_model(bundle, name=args.name, version=args.version,
                                                    royalty=args.royalty))
        model_id = bytes.fromhex(pushed["model_id"])
        print(f"pushed {args.name}@{args.version} ({len(bundle):,} bytes); waiting for its registration to be final",
              file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        status = pushed
        while status["status"] == "pending":
            if time.monotonic() > deadline:
                raise CLIError(f"not registered after {args.timeout:g} s (still pending: {status['detail']}); "
                               f"see 'p2pgpu model show {model_id.hex()}'", exit_code=1)
            time.sleep(args.poll_interval)
            status = call_api(lambda: client.model_push(model_id))
            print(".", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    if status["status"] != "registered":
        raise CLIError(f"registration of {args.name}@{args.version} failed: {status['detail']}", exit_code=1)
    print(f"registered {args.name}@{args.version} at height {status['height']}")
    print(f"id {model_id.hex()}")
    return 0


def render_model(m: dict[str, Any]) -> str:
    return "\n".join([
        f"id          {m['model_id']}",
        f"name        {m['name']}@{m['version']}" + ("  (latest)" if m["latest"] else ""),
        f"owner       {m['owner']}",
        f"royalty     {m['royalty_per_unit']} per unit",
        f"input       {m['input']['dtype']} {_shape(m['input']['shape'])} per item",
        f"output      {m['output']['dtype']} {_shape(m['output']['shape'])} per item",
        f"size        {m['bundle_size']:,} bytes (bundle)",
        f"registered  at height {m['registered_height']}",
    ])


def run_ls(args: argparse.Namespace) -> int:
    from p2pgpu.submit_io import api_client, call_api

    with api_client(args) as client:
        models = call_api(client.models)
    if args.json:
        print(json.dumps(models, sort_keys=True))
        return 0
    if not models:
        print("no registered models")
        return 0
    names = [f"{m['name']}@{m['version']}" + ("*" if m["latest"] else "") for m in models]
    width = max(len(n) for n in names)
    print(f"{'NAME@VERSION':<{width}}  {'ID':<16}  {'ROYALTY':>8}  {'HEIGHT':>7}  OWNER")
    for name, m in zip(names, models):
        print(f"{name:<{width}}  {m['model_id'][:16]}  {m['royalty_per_unit']:>8}  {m['registered_height']:>7}  "
              f"{m['owner'][:16]}")
    return 0


def render_providers(warm: dict[str, Any] | None, unavailable: str = "") -> str:
    """The ``warm at`` section of ``model show``: each provider whose advert says the model is warm, best first."""
    if warm is None:
        return f"warm at     (not known here: {unavailable})"
    providers = warm["providers"]
    if not providers:
        return "warm at     no provider advertises it warm"
    lines = [f"warm at     {len(providers)} provider(s), best first:"]
    for p in providers:
        lines.append(f"  {p['provider'][:16]}  {p['unit_price']:>8} per unit  {p['free_slots']:>3} free slot(s)  "
                     f"advert {p['advert_age_s']:.0f} s old  peer {p['peer']}")
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    """The model's registry entry, then who holds it warm (``GET /ledger/models/{ref}/providers``)."""
    from p2pgpu.api.types import Unavailable
    from p2pgpu.submit_io import api_client, call_api

    with api_client(args) as client:
        model = call_api(lambda: client.model(args.ref))

        def providers() -> tuple[dict[str, Any] | None, str]:
            try:
                return client.model_providers(model["model_id"]), ""
            except Unavailable as exc:  # a node that does not follow the market hears no adverts; the entry stands
                return None, f"{exc.message} ({exc.code})"

        warm, unavailable = call_api(providers)
    if args.json:
        print(json.dumps({**model, "warm_providers": None if warm is None else warm["providers"]}, sort_keys=True))
    else:
        print(render_model(model) + "\n" + render_providers(warm, unavailable))
    return 0
