"""The many-job layout that ``p2pgpu submit --jobs PATH`` reads.

Every job is read and checked (files, arrays, spec, terms) before anything
is posted, so a typo in the fortieth job costs nothing; the first problem
is reported naming its file and key (exit 2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pgpu.cli import CLIError
from p2pgpu.submit_io import build_request, load_npy, load_spec_file

__all__ = ["JOB_FILE", "LAYOUT_HELP", "Job", "JobTerms", "load_jobs"]

JOB_FILE = "job.json"
SPEC_FILE = "spec.json"

LAYOUT_HELP = """\
--jobs PATH takes a directory of job folders, or a JSON file listing jobs:

  jobs/                 one folder per job; the folder's name is the job's name
    resize-1/           (letters, digits, '.', '_', '-'); its results go to --out DIR/resize-1/
      spec.json         the job spec, as for --spec
      a.npy  b.npy      its inputs: each .npy file is the input named by its stem
      job.json          optional, and so is each of its keys:
                          {"spec": "spec.json", "inputs": {"a": "a.npy", "b": "b.npy"},
                           "max_price": 50, "bid_window": 10, "audit_rate": 0.1,
                           "stream": "items.npy", "units": 4}

  jobs.json             a list of such entries, each with "inputs" and an optional "name"
                        (default job-0, job-1, ...):
                          [{"name": "resize-1", "spec": "r1/spec.json",
                            "inputs": {"a": "r1/a.npy", "b": "r1/b.npy"}, "max_price": 50}, ...]

Paths are relative to the job's folder (or to the JSON file). Terms an entry leaves out come
from --max-price, --bid-window and --audit-rate; "stream" makes it a stream task (as --stream).
Every job is checked before any is posted."""

_TERMS = ("max_price", "bid_window", "audit_rate", "units")
_ENTRY_KEYS = frozenset({"spec", "inputs", "stream", *_TERMS})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True, slots=True)
class JobTerms:
    """The market terms from the command line, for jobs that do not set their own."""

    max_price: int | None
    bid_window: int
    audit_rate: float


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    where: str
    """How messages name the job's definition: its job.json, its folder, or ``jobs.json entry 3``."""
    request: Any
    """The :class:`p2pgpu.api.types.SubmitRequest` to post."""


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    where: str
    base: Path
    doc: dict[str, Any]
    scan: bool
    """A job folder: without "inputs", every .npy file in it is an input."""


def load_jobs(path: Path, terms: JobTerms) -> list[Job]:
    """Every job under ``path``, checked and ready to post, in a stable order (folder names sorted, or list order)."""
    if path.is_dir():
        entries = list(_folder_entries(path))
    elif path.is_file():
        entries = list(_list_entries(path))
    elif not path.exists():
        raise CLIError(f"--jobs {path} does not exist")
    else:
        raise CLIError(f"--jobs {path} is neither a directory nor a file")
    return [_job(entry, terms) for entry in entries]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CLIError(f"{where}: job name {name!r} is not usable as a folder name under --out (letters, digits, "
                       "'.', '_', '-'; not starting with '.' or '-'; at most 100 characters)")
    return name


def _folder_entries(root: Path) -> Iterator[_Entry]:
    if (root / SPEC_FILE).is_file() or (root / JOB_FILE).is_file():
        raise CLIError(f"--jobs {root} is one job folder itself; --jobs takes a directory of job folders "
                       "(or give this job with --spec)")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise CLIError(f"cannot list --jobs {root}: {exc.strerror or exc}") from None
    if not folders:
        raise CLIError(f"--jobs {root} holds no job folders (each job is a folder with {SPEC_FILE} and its .npy "
                       "inputs; see 'p2pgpu submit --help')")
    for folder in folders:
        job_file = folder / JOB_FILE
        where = str(job_file) if job_file.is_file() else str(folder)
        name = _check_name(folder.name, str(folder))
        doc = _read_json(job_file) if job_file.is_file() else {}
        if not isinstance(doc, dict):
            raise CLIError(f"{job_file}: expected a JSON object, got {type(doc).__name__}")
        yield _Entry(name, where, folder, doc, scan=True)


def _list_entries(file: Path) -> Iterator[_Entry]:
    doc = _read_json(file)
    if not isinstance(doc, list):
        raise CLIError(f"{file}: expected a JSON list of jobs, got {type(doc).__name__}")
    if not doc:
        raise CLIError(f"{file}: the list holds no jobs")
    seen: dict[str, str] = {}
    for i, item in enumerate(doc):
        where = f"{file} entry {i}"
        if not isinstance(item, dict):
            raise CLIError(f"{where}: expected a JSON object, got {type(item).__name__}")
        item = dict(item)
        name = _check_name(item.pop("name", f"job-{i}"), where)
        if name in seen:
            raise CLIError(f"{where}: job name {name!r} is taken by {seen[name]}")
        seen[name] = where
        yield _Entry(name, f"{where} ({name})", file.parent, item, scan=False)


def _count(value: Any, key: str, where: str) -> int:
    if type(value) is not int or value < 1:
        raise CLIError(f"{where}: {key} must be a whole number of at least 1, got {value!r}")
    return value


def _file(doc: dict[str, Any], key: str, where: str, base: Path) -> Path | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise CLIError(f"{where}: {key} must be a file name, got {value!r}")
    return base / value


def _job(entry: _Entry, terms: JobTerms) -> Job:
    doc, where, base = entry.doc, entry.where, entry.base
    unknown = sorted(set(doc) - _ENTRY_KEYS)
    if unknown:
        raise CLIError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})")
    if doc.get("max_price", terms.max_price) is None:
        raise CLIError(f"{where}: no max_price; set it in the job or give --max-price")
    max_price = _count(doc.get("max_price", terms.max_price), "max_price", where)
    bid_window = _count(doc.get("bid_window", terms.bid_window), "bid_window", where)
    audit_rate = doc.get("audit_rate", terms.audit_rate)
    if type(audit_rate) not in (int, float) or not 0.0 <= audit_rate <= 1.0:
        raise CLIError(f"{where}: audit_rate must be a number in [0, 1], got {audit_rate!r}")
    stream = _file(doc, "stream", where, base)
    spec_file = _file(doc, "spec", where, base) or base / SPEC_FILE

    files = doc.get("inputs")
    if files is None and not entry.scan:
        raise CLIError(f"{where}: missing 'inputs' (an object naming each input's .npy file)")
    if files is None:  # a job folder without "inputs": its .npy files, named by stem
        files = {p.stem: p.name for p in sorted(base.glob("*.npy")) if stream is None or p != stream}
        if not files:
            raise CLIError(f"{where}: no inputs (no .npy files in {base}, and no 'inputs' in its {JOB_FILE})")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) and v for v in files.values()):
        raise CLIError(f"{where}: inputs must be an object naming each input's .npy file, e.g. "
                       '{"a": "a.npy"}')
    if "items" in files:
        raise CLIError(f"{where}: an input named 'items' is reserved for a stream's items; give them as \"stream\"")
    inputs = {name: load_npy(base / file, f"{where}: inputs.{name}") for name, file in files.items()}
    items = load_npy(stream, f"{where}: stream") if stream is not None else None
    default_units = int(items.shape[0]) if items is not None and items.ndim >= 1 else 1
    units = _count(doc.get("units", default_units), "units", where)
    try:
        spec = load_spec_file(spec_file, inputs, given_by="the job's inputs")
    except CLIError as exc:
        raise CLIError(f"{where}: {exc}") from None
    request = build_request(spec, inputs, items, max_price=max_price, units=units, bid_window=bid_window,
                            audit_rate=float(audit_rate))
    return Job(entry.name, where, request)
