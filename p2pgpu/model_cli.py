"""``p2pgpu model inspect FILE``: validate a model file as the network would, and show what it holds.

The file (``.keras``, legacy Keras H5, or an ``.npz`` of today's
``model``/``weight_NNN`` inputs) is read as data by :mod:`kernels.bundle`;
nothing of it runs and TensorFlow is not imported. The id printed is the
one ``model push`` will register (pushing is the ledger registry's; it lands
with that work).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from p2pgpu.cli import CLIError

# kernels.bundle is imported inside run_inspect: every `p2pgpu` command imports this module to build its parser,
# and the bundle code pulls in numpy and h5py (about 0.3 s) that only this command needs.

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
