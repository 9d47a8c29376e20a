"""What ``p2pgpu submit`` and ``p2pgpu submit --jobs`` share: the API client, job files in, results out.

One job (:mod:`p2pgpu.submit_cli`) and a batch of them
(:mod:`p2pgpu.jobs`, :mod:`p2pgpu.submit_batch`) read specs and .npy
inputs, build their requests, call the node's API and write results the
same way; this module holds those pieces, below all three, so none of them
imports another's internals from inside a function.

Heavy imports stay inside the functions that need them, because
:mod:`p2pgpu.submit_cli` imports this module for every ``p2pgpu`` command
(it builds the parser): measured on top of the parser, ``kernels.spec``
0.44 s and ``p2pgpu.api.client`` 0.91 s (numpy, trio, httpx), ``rich`` 0.04 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from p2pgpu.cli import CLIError

if TYPE_CHECKING:
    from rich.console import Console

    from kernels.spec import JobSpec
    from p2pgpu.api.client import ApiClient
    from p2pgpu.api.types import SubmitRequest

__all__ = [
    "OUTCOME_MESSAGES",
    "TOKEN_ENV",
    "api_client",
    "api_token",
    "build_request",
    "call_api",
    "check_out_dir",
    "load_npy",
    "load_spec_file",
    "make_console",
    "model_spec",
    "write_outputs",
]

T = TypeVar("T")

TOKEN_ENV = "P2PGPU_API_TOKEN"

OUTCOME_MESSAGES = {
    "expired": "task {tid} expired: no provider bid within the bid window; the escrow was refunded",
    "missed": "provider {provider} missed the execution deadline (or did not serve its committed result to the "
              "audit); the escrow was refunded and the provider slashed",
    "fraud": "verifiers found the delivered result wrong (fraud): the provider was slashed and the escrow refunded",
    "cancelled": "task {tid} was cancelled before assignment; the escrow was refunded",
    "inputs_unavailable": "provider {provider} could not fetch the task's inputs from this node; the escrow was "
                          "refunded less a small reservation fee (is this node reachable by providers?)",
    "refused": "task {tid} never reached the ledger (its PostTask was refused); nothing was escrowed",
}
"""What to tell the user when a task ends other than paid, by outcome."""


def make_console() -> Console:
    """The console the submit commands print to (tests swap it for one writing into a buffer)."""
    from rich.console import Console

    return Console(highlight=False)


def api_token(args: argparse.Namespace, environ: Any = None) -> str | None:
    """The token to send: ``--token``, else ``$P2PGPU_API_TOKEN``, else none (an empty value counts as none)."""
    env = os.environ if environ is None else environ
    token = args.token if getattr(args, "token", None) is not None else env.get(TOKEN_ENV)
    return token or None


def api_client(args: argparse.Namespace) -> ApiClient:
    """The API client for ``--api`` with the token from ``--token`` / ``$P2PGPU_API_TOKEN``."""
    from p2pgpu.api.client import ApiClient, InvalidToken
    from p2pgpu.config import is_loopback_host

    token = api_token(args)
    try:
        client = ApiClient(args.api, token=token)
    except InvalidToken as exc:
        raise CLIError(f"{exc} (from {'--token' if args.token is not None else '$' + TOKEN_ENV})") from None
    url = urlsplit(client.base_url)
    if token is not None and url.scheme == "http" and not is_loopback_host(url.hostname or ""):
        print(f"p2pgpu: warning: sending the API token unencrypted to {url.hostname}; anyone on the path can "
              "read it (use https:// through a TLS proxy, or an SSH tunnel)", file=sys.stderr)
    return client


def call_api(fn: Callable[[], T]) -> T:
    """Run an API call, turning its failures into one-line CLI errors."""
    from p2pgpu.api.client import ApiUnreachable
    from p2pgpu.api.types import ApiError

    try:
        return fn()
    except ApiUnreachable as exc:
        raise CLIError(str(exc)) from None
    except ApiError as exc:
        raise CLIError(f"the API refused: {exc.message} ({exc.code})") from None


def load_spec_file(path: Path, inputs: dict[str, Any], given_by: str = "--input") -> JobSpec:
    """A validated :class:`kernels.spec.JobSpec` from the JSON spec file and the loaded input arrays.

    ``given_by`` names where the inputs came from, for the message when the
    spec's own ``inputs`` disagree with them.
    """
    from kernels.errors import SpecError
    from kernels.spec import make_spec

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CLIError(f"spec file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read spec file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"spec file {path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict):
        raise CLIError(f"spec file {path}: expected a JSON object")
    known = {"kernel", "version", "params", "requirements", "limits", "inputs"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise CLIError(f"spec file {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for key in ("kernel", "version"):
        if key not in doc:
            raise CLIError(f"spec file {path}: missing {key!r}")
    req = doc.get("requirements") or {}
    lim = doc.get("limits") or {}
    try:
        spec = make_spec(
            doc["kernel"], doc["version"], doc.get("params") or {}, inputs,
            device=req.get("device", "any"), memory_bytes=req.get("memory_bytes", 1 << 30),
            seconds=lim.get("seconds", 60.0), output_bytes=lim.get("output_bytes", 1 << 30),
        )
    except (SpecError, TypeError, AttributeError) as exc:
        raise CLIError(f"spec file {path}: {type(exc).__name__}: {exc}") from None
    declared = doc.get("inputs")
    if declared is not None:
        refs = spec.input_dict()
        if not isinstance(declared, dict) or set(declared) != set(refs):
            raise CLIError(f"spec file {path}: 'inputs' names {sorted(declared) if isinstance(declared, dict) else declared}"
                           f" but {given_by} gave {sorted(refs)}")
        for name, ref in refs.items():
            d = declared[name]
            if not isinstance(d, dict):
                raise CLIError(f"spec file {path}: inputs.{name} must be an object")
            if "hash" in d and str(d["hash"]).lower() != ref.hash.hex():
                raise CLIError(f"input {name!r}: the file's bytes do not match the hash in {path}")
            if "dtype" in d and d["dtype"] != ref.dtype:
                raise CLIError(f"input {name!r}: dtype is {ref.dtype} but {path} says {d['dtype']}")
            if "shape" in d and tuple(d["shape"]) != tuple(ref.shape):
                raise CLIError(f"input {name!r}: shape is {tuple(ref.shape)} but {path} says {tuple(d['shape'])}")
    return spec


def load_npy(file: str | Path, what: str) -> Any:
    """One array from a .npy file (never a pickle); errors start with ``what`` (e.g. ``--input a``)."""
    import numpy as np

    try:
        arr = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise CLIError(f"{what}: {file} does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"{what}: {file} is not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise CLIError(f"{what}: {file} holds several arrays (.npz); give one .npy per input")
    return arr


def build_request(spec: JobSpec, inputs: dict[str, Any], items: Any, *, max_price: int, units: int,
                  bid_window: int, audit_rate: float) -> SubmitRequest:
    """The :class:`SubmitRequest` for one job: a stream task when it has ``items``, else a batch task."""
    from p2pgpu.api.types import SubmitRequest

    return SubmitRequest(spec=spec, inputs=inputs if items is None else {**inputs, "items": items},
                         max_unit_price=max_price, units=units, bid_window=bid_window,
                         audit_rate_bps=round(audit_rate * 10_000), kind="batch" if items is None else "stream")


def model_spec(client: ApiClient, ref: str, inputs: dict[str, Any], *, stream: bool = False) -> JobSpec:
    """The spec of an inference task by model: ``ref`` resolved by the node's registry, ``x`` the batch.

    A stream task (``stream``) is a ``stream_infer`` spec with no inputs at
    all: its items go with ``--stream``. Refused here, before anything is
    posted: inputs other than ``x`` (none for a stream), a reference that is
    not an id, NAME or NAME@VERSION, a model the registry does not hold (the
    node's ``unknown_model``), a batch the kernel refuses.
    """
    from kernels.bymodel import make_model_spec
    from kernels.errors import SpecError
    from ledger.modelnames import parse_model_ref

    if stream and inputs:
        raise CLIError(f"--model with --stream takes no --input (the items are ITEMS.npy), not {sorted(inputs)}: "
                       f"the model's weights are not sent")
    if not stream and set(inputs) != {"x"}:
        raise CLIError(f"--model takes one input, --input x=X.npy (a batch, one item per row), not "
                       f"{sorted(inputs)}: the model's weights are not sent")
    try:
        parse_model_ref(ref)
    except ValueError as exc:
        raise CLIError(f"--model {ref}: {exc}") from None
    view = call_api(lambda: client.model(ref))
    try:
        if stream:
            return make_model_spec(bytes.fromhex(view["model_id"]), {}, None, kernel="stream_infer")
        return make_model_spec(bytes.fromhex(view["model_id"]), {}, inputs["x"])
    except SpecError as exc:
        raise CLIError(f"--input x: {type(exc).__name__}: {exc}") from None


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a non-empty directory without --force (results never mix)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CLIError(f"--out {out} is not empty; choose a new directory or pass --force")


def write_outputs(out: Path, outputs: dict[str, Any]) -> list[Path]:
    """Each output tensor as ``out/<name>.npy``, written to a temporary name and renamed into place."""
    import numpy as np

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    written = []
    for name, arr in sorted(outputs.items()):
        if not name.replace("_", "").replace("-", "").isalnum():
            raise CLIError(f"the API returned an output named {name!r}, which is not a safe file name")
        path = out / f"{name}.npy"
        tmp = out / f".{name}.npy.tmp"
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(arr), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written
