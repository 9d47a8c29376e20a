"""The ``p2pgpu`` command line.

Each subcommand lives in the module that owns its idea; this module only
builds the parser and maps errors to exit codes, so a user sees one clear
line instead of a traceback.

Adding a command: write a module with ``register(subparsers)`` that adds
its parser(s) and sets ``run=<function(args) -> int>`` via
``set_defaults``, then list the module in :data:`COMMAND_MODULES`. Command
modules import heavy things (libp2p, TensorFlow, the HTTP server) inside
their ``run`` functions, so ``p2pgpu --help`` and ``p2pgpu keys show`` stay
fast. A listed module that does not exist yet is skipped, so commands owned
by other modules (``node``, ``inspect``) appear as they land.

Commands from packages layered above ``p2pgpu`` (``devnet``) are plugins:
``p2pgpu`` never imports them by name, or the layers would loop. Each is an
entry point in the ``p2pgpu.commands`` group naming its ``register``
function, the convention pytest uses for its plugins::

    [project.entry-points."p2pgpu.commands"]
    devnet = "devnet.cli:register"

:func:`command_plugins` reads the group from the installed metadata and,
in a source checkout, from the checkout's own ``pyproject.toml`` too: an
editable install's metadata is written at install time and goes stale when
the table changes, until the next ``pip install -e``.

Exit codes: 0 success; 1 the operation ran and failed (a task expired,
fraud was found); 2 a problem the user can fix (bad argument, missing file,
wrong passphrase, API unreachable); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COMMAND_MODULES: tuple[str, ...] = (
    "p2pgpu.keys_cli",  # keys new / show
    "p2pgpu.node_cli",  # node run
    "p2pgpu.submit_cli",  # submit, task show, ledger queries
    "p2pgpu.inspect_cli",  # gossip inspector
    "p2pgpu.api_cli",  # api token new
    "p2pgpu.model_cli",  # model inspect
)


class CLIError(Exception):
    """A problem the user can fix (bad argument, missing file, wrong passphrase); one line, no traceback.

    ``exit_code`` is 2 for such problems; commands use 1 when the operation
    itself ran and failed (a task that expired or was found fraudulent).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


COMMAND_ENTRY_POINT_GROUP = "p2pgpu.commands"

# The pyproject.toml of a source checkout: one directory above this package.
CHECKOUT_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

RegisterFn = Callable[[Any], None]


def checkout_entry_points(pyproject: Path = CHECKOUT_PYPROJECT) -> list[importlib.metadata.EntryPoint]:
    """The ``p2pgpu.commands`` entry points declared in a source checkout's ``pyproject.toml``.

    Empty when ``pyproject`` is absent (an installed wheel) or belongs to
    another project.
    """
    try:
        with pyproject.open("rb") as f:
            project = tomllib.load(f).get("project", {})
    except FileNotFoundError:
        return []
    if project.get("name") != "p2pgpu":
        return []
    table = project.get("entry-points", {}).get(COMMAND_ENTRY_POINT_GROUP, {})
    return [importlib.metadata.EntryPoint(name, value, COMMAND_ENTRY_POINT_GROUP) for name, value in table.items()]


def command_plugins(pyproject: Path = CHECKOUT_PYPROJECT) -> list[RegisterFn]:
    """The ``register`` functions of every command plugin, one per entry point name, sorted by name.

    A checkout's table wins over installed metadata under the same name (it
    is the newer of the two; see the module docstring).
    """
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=COMMAND_ENTRY_POINT_GROUP)}
    found.update({ep.name: ep for ep in checkout_entry_points(pyproject)})
    return [found[name].load() for name in sorted(found)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pgpu", description="Decentralized GPU compute network node and tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # not written yet; see the module docstring
            raise
        module.register(subparsers)
    for register in command_plugins():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "run", None) is None:
        # A command group given without its subcommand ("p2pgpu keys").
        getattr(args, "parser", parser).print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except CLIError as exc:
        print(f"p2pgpu: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Re-import so command modules and this entry point share one CLIError class.
    from p2pgpu.cli import main as _main

    sys.exit(_main())
