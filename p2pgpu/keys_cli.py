"""``p2pgpu keys``: create encrypted key files and show what is in them (never the secret).

The passphrase comes from an environment variable, a file, or a prompt
(twice, when interactive), never from an argument: arguments end up in
shell history and ``ps``. An empty passphrase is refused unless
``--insecure-empty`` says it is meant (devnets, throwaway keys).

The libp2p peer id is computed here from the public key (identity
multihash of the protobuf-framed Ed25519 key, base58btc) rather than by
importing libp2p, whose import alone takes seconds.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from p2pgpu.cli import CLIError

# Our own imports inside functions here are deliberate: every `p2pgpu` command imports this module to build its
# parser (p2pgpu.cli, ~0.13 s for `p2pgpu --help`), so each stays where its command runs. Measured cost of each,
# on top of the parser, min of 3 runs: ledger.keystore 0.21 s (scrypt, AES), ledger.keys 0.02-0.03 s,
# p2pgpu.config 0.015 s.

__all__ = ["peer_id_of", "read_passphrase_source", "register"]

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _base58(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def peer_id_of(ed25519_public: bytes) -> str:
    """The libp2p peer id of an Ed25519 public key (what ``ID.from_pubkey`` gives)."""
    if len(ed25519_public) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(ed25519_public)}")
    # libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
    proto = b"\x08\x01\x12\x20" + ed25519_public
    # Keys of at most 42 bytes are inlined with the identity multihash (code 0x00).
    return _base58(b"\x00" + bytes([len(proto)]) + proto)


def add_passphrase_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase from environment variable VAR")
    group.add_argument("--passphrase-file", metavar="FILE", type=Path,
                       help="read the passphrase from the first line of FILE")


def read_passphrase_source(args: argparse.Namespace, *, confirm: bool, required: bool) -> str | None:
    """The passphrase from --passphrase-env / --passphrase-file, else a prompt on a TTY.

    Returns None when no source was given, stdin is not a terminal and the
    passphrase is optional.
    """
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise CLIError(f"environment variable {args.passphrase_env} is not set (from --passphrase-env)")
        return value
    if args.passphrase_file:
        try:
            lines = Path(args.passphrase_file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise CLIError(f"passphrase file {args.passphrase_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"cannot read passphrase file {args.passphrase_file}: {exc}") from None
        return lines[0] if lines else ""
    if not sys.stdin.isatty():
        if required:
            raise CLIError("no passphrase: give --passphrase-env VAR or --passphrase-file FILE "
                           "(stdin is not a terminal, so there is nobody to ask)")
        return None
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise CLIError("the two passphrases differ; nothing was written")
    return first


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="create and inspect encrypted key files")
    keys.set_defaults(run=None, parser=keys)
    sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")

    new = sub.add_parser("new", help="generate a key and write it encrypted",
                         description="Generate a new key and write it as an encrypted keystore (scrypt + AES-256-GCM).")
    new.add_argument("--out", required=True, type=Path, metavar="FILE",
                     help="keystore file to write; with --kind both the BLS key goes to FILE's "
                          "sibling <stem>.validator<suffix>")
    new.add_argument("--kind", choices=("account", "validator", "both"), default="account",
                     help="account (Ed25519, the node identity), validator (BLS), or both (default: account)")
    add_passphrase_options(new)
    new.add_argument("--insecure-empty", action="store_true", help="allow an empty passphrase (throwaway keys)")
    new.add_argument("--force", action="store_true", help="replace existing files (the old keys are lost)")
    new.add_argument("--json", action="store_true", help="print the result as JSON")
    new.set_defaults(run=run_new)

    show = sub.add_parser("show", help="print a keystore's address, public keys and peer id",
                          description="Print what a keystore holds, never the secret. With a passphrase "
                                      "source the file is also decrypted and checked.")
    show.add_argument("file", type=Path, metavar="FILE")
    add_passphrase_options(show)
    show.add_argument("--json", action="store_true", help="print the result as JSON")
    show.set_defaults(run=run_show)


def _targets(out: Path, kind: str) -> list[tuple[str, Path]]:
    from p2pgpu.config import default_validator_keystore

    if kind == "both":
        return [("account", out), ("validator", default_validator_keystore(out))]
    return [(kind, out)]


def _describe(kind: str, public: bytes, path: Path, verified: bool) -> dict[str, Any]:
    from ledger.keys import address_of

    info: dict[str, Any] = {"file": str(path), "kind": kind, "public_key": public.hex(), "verified": verified}
    if kind == "account":
        info["address"] = address_of(public).hex()
        info["peer_id"] = peer_id_of(public)
    return info


def _print(infos: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for info in infos:
        table = Table(title=f"{title}: {info['file']}", show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("kind", info["kind"])
        if "address" in info:
            table.add_row("address", info["address"])
            table.add_row("peer id", info["peer_id"])
        table.add_row("public key", info["public_key"])
        table.add_row("passphrase", "checked" if info["verified"] else "not checked (no passphrase given)")
        console.print(table)


def run_new(args: argparse.Namespace) -> int:
    from ledger.keys import AccountKey, ValidatorKey
    from ledger.keystore import KeystoreError, save_keystore

    targets = _targets(args.out, args.kind)
    for _, path in targets:
        if path.exists() and not args.force:
            raise CLIError(f"{path} already exists; refusing to replace a key (use --force to overwrite it)")
        if not path.parent.is_dir():
            raise CLIError(f"directory {path.parent} does not exist")
    passphrase = read_passphrase_source(args, confirm=True, required=True)
    assert passphrase is not None  # required=True never returns None
    if passphrase == "" and not args.insecure_empty:
        raise CLIError("empty passphrase refused: anyone with the file would hold the key "
                       "(pass --insecure-empty for a throwaway key)")
    infos = []
    for kind, path in targets:
        if kind == "account":
            account = AccountKey.generate()
            secret, public = account.seed, account.public_key
        else:
            validator = ValidatorKey.generate()
            secret, public = validator.secret, validator.public_key
        try:
            save_keystore(path, secret, kind, public, passphrase, overwrite=args.force)  # type: ignore[arg-type]
        except KeystoreError as exc:
            raise CLIError(str(exc)) from None
        infos.append(_describe(kind, public, path, verified=True))
    _print(infos, args.json, "new key")
    return 0


def _read_header(path: Path) -> tuple[str, bytes]:
    """Kind and public key from a keystore's clear header, checked as far as possible without the passphrase."""
    from ledger.keys import address_of
    from ledger.keystore import MAX_FILE_SIZE

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CLIError(f"keystore {path}: no such file") from None
    except OSError as exc:
        raise CLIError(f"keystore {path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_SIZE:
        raise CLIError(f"keystore {path}: damaged: larger than {MAX_FILE_SIZE} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
        kind = doc["kind"]
        public = bytes.fromhex(doc["public"])
        if kind not in ("account", "validator"):
            raise ValueError(f"unknown kind {kind!r}")
        if kind == "account" and (len(public) != 32 or bytes.fromhex(doc["address"]) != address_of(public)):
            raise ValueError("address does not match the public key")
        if kind == "validator" and len(public) != 48:
            raise ValueError("a BLS public key is 48 bytes")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CLIError(f"keystore {path}: damaged: {exc}") from None
    return kind, public


def run_show(args: argparse.Namespace) -> int:
    from ledger.keystore import KeystoreError, load_keystore

    kind, public = _read_header(args.file)
    passphrase = read_passphrase_source(args, confirm=False, required=False)
    verified = False
    if passphrase is not None:
        try:
            contents = load_keystore(args.file, passphrase)
        except KeystoreError as exc:
            raise CLIError(str(exc)) from None
        kind, public, verified = contents.kind, contents.public, True
    _print([_describe(kind, public, args.file, verified)], args.json, "key")
    return 0
