"""``p2pgpu api token new``: make a bearer token for the node's API and the config table that admits it.

The token is printed once and kept nowhere: the node's config holds only
its SHA-256 (``token_sha256``), so the config file can be copied, backed up
and shown without giving anyone the API. Lose the token and you make a new
one; to revoke one, delete its ``[[api.tokens]]`` table and restart the
node (the config is read at start).

Nothing here touches a node or its config file: the operator pastes the
table where it belongs, as with every other config key.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from p2pgpu.cli import CLIError
from p2pgpu.intparse import cli_int

# Our own imports inside functions here are deliberate: every `p2pgpu` command imports this module to build its
# parser (p2pgpu.cli, ~0.13 s for `p2pgpu --help`), so each stays where its command runs. Measured cost of each,
# on top of the parser, min of 3 runs: p2pgpu.api.auth 0.79 s (the API's types pull in kernels and numpy),
# p2pgpu.config 0.015 s.

__all__ = ["register"]


def register(subparsers: Any) -> None:
    api = subparsers.add_parser("api", help="the node's HTTP API: access tokens")
    api.set_defaults(run=None, parser=api)
    api_sub = api.add_subparsers(dest="api_command", metavar="SUBCOMMAND")
    token = api_sub.add_parser("token", help="bearer tokens for the API")
    token.set_defaults(run=None, parser=token)
    token_sub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND")
    new = token_sub.add_parser(
        "new", help="make a token; prints it once, with the [[api.tokens]] table for the node's config",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    new.add_argument("--name", required=True, help="who holds it (shown in the node's log, e.g. ci-runner)")
    new.add_argument("--scopes", required=True, metavar="SCOPE,...",
                     help="comma-separated: read (status, tasks, results, ledger, metrics), submit (post tasks: "
                          "spends the node's funds), dispute (dispute stream outputs: locks a bond)")
    new.add_argument("--spend-per-hour", type=cli_int(0, 2**63 - 1), default=None, metavar="N",
                     help="most this token may commit of the node's funds in any 60 minutes, in ledger tokens "
                          "(escrow, audit fee and fee of each task; bond and fee of each dispute); "
                          "required with submit or dispute")
    new.add_argument("--json", action="store_true",
                     help="print one JSON object (name, token, token_sha256, scopes, spend_per_hour, config)")
    new.set_defaults(run=run_token_new)


def _scopes(text: str) -> frozenset[str]:
    from p2pgpu.config import API_SCOPES

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CLIError(f"--scopes: give at least one of {', '.join(API_SCOPES)}")
    unknown = [s for s in names if s not in API_SCOPES]
    if unknown:
        raise CLIError(f"--scopes: unknown scope {', '.join(map(repr, unknown))}; choose from {', '.join(API_SCOPES)}")
    if len(set(names)) != len(names):
        raise CLIError("--scopes: a scope is listed twice")
    return frozenset(names)


def run_token_new(args: argparse.Namespace) -> int:
    from p2pgpu.api.auth import hash_token, new_token
    from p2pgpu.config import SPENDING_SCOPES, TOKEN_NAME_PATTERN, ApiToken, render_api_token

    name: str = args.name
    if not (1 <= len(name) <= 64 and re.fullmatch(TOKEN_NAME_PATTERN, name)):
        raise CLIError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' and '-', starting with a letter "
                       "or digit (it appears in the node's log)")
    scopes = _scopes(args.scopes)
    spending = sorted(scopes & SPENDING_SCOPES)
    if spending and args.spend_per_hour is None:
        raise CLIError(f"--spend-per-hour is required with the {' and '.join(spending)} scope: the most this token "
                       "may commit of the node's funds per hour, in ledger tokens")
    token = new_token()
    entry = ApiToken(name=name, token_sha256=hash_token(token), scopes=scopes, spend_per_hour=args.spend_per_hour)
    table = render_api_token(entry)
    if args.json:
        print(json.dumps({"name": name, "token": token, "token_sha256": entry.token_sha256,
                          "scopes": sorted(scopes), "spend_per_hour": args.spend_per_hour, "config": table}))
        return 0
    print(f"API token for {name!r} (shown only now; the node keeps just its hash):\n")
    print(f"    {token}\n")
    print("Give it to its client, e.g. export P2PGPU_API_TOKEN=<token> (or --token). Add this table to the "
          "node's config and restart the node:\n")
    print(table, end="")
    return 0
