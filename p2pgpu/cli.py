"""The ``p2pgpu`` command line.

Each subcommand lives in the module that owns its idea; this module only
parses arguments and maps errors to exit codes, so a user sees one clear line
instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class CLIError(Exception):
    """A problem the user can fix (bad argument, missing file, wrong passphrase)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pgpu", description="Decentralized GPU compute network node and tools.")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except CLIError as exc:
        print(f"p2pgpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
