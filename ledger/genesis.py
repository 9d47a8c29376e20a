"""Genesis: the record that defines a chain, its JSON file, and the initial state.

The chain id is the hash of the genesis record's canonical encoding, so every
signature on a chain is bound to exactly one genesis (a devnet's messages
never verify on another).

The file is JSON so operators can read and edit it: integers as numbers,
bytes as hex strings, ``params`` may name only the values it changes. The
loader checks every field and names the first bad one, e.g.
``genesis.json: validators[2].bls_pubkey: expected exactly 48 bytes, got 47``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, cast

from ledger.bls import get_backend
from ledger.codec import (
    U64,
    Address,
    Bool,
    Bytes,
    DecodeError,
    FieldType,
    Float,
    Int,
    ListOf,
    Maybe,
    Nested,
    Record,
    Text,
    encode,
    record,
)
from ledger.committee import compute_committee
from ledger.exceptions import InvalidGenesis
from ledger.params import Params
from ledger.state import Account, Provider, State, Validator, ValidatorStatus
from ledger.transactions import MAX_CAPABILITIES_BYTES
from ledger.votes import BLSPubkey, BLSSignature

MAX_SUPPLY = 2**63 - 1


@record
class GenesisAccount(Record):
    address: Address
    balance: U64


@record
class GenesisValidator(Record):
    address: Address
    bls_pubkey: BLSPubkey
    proof_of_possession: BLSSignature
    stake: U64


@record
class GenesisProvider(Record):
    address: Address
    capabilities: Annotated[bytes, Bytes(MAX_CAPABILITIES_BYTES)]
    bond: U64


@record
class Genesis(Record):
    MAX_BYTES = 64 << 20
    chain_name: Annotated[str, Text(64, 1)]
    genesis_time_ms: U64
    params: Params
    accounts: Annotated[tuple[GenesisAccount, ...], ListOf(Nested(GenesisAccount), 100_000)]
    validators: Annotated[tuple[GenesisValidator, ...], ListOf(Nested(GenesisValidator), 10_000, 1)]
    providers: Annotated[tuple[GenesisProvider, ...], ListOf(Nested(GenesisProvider), 10_000)]

    def chain_id(self) -> bytes:
        return compute_chain_id(self)


def compute_chain_id(genesis: Genesis) -> bytes:
    return hashlib.sha256(b"p2pgpu/genesis" + encode(genesis)).digest()


def compute_genesis_randomness(chain_id: bytes) -> bytes:
    return hashlib.sha256(b"p2pgpu/rand" + chain_id).digest()


def _check_unique(items: tuple[Any, ...], what: str) -> None:
    seen: set[bytes] = set()
    for i, item in enumerate(items):
        if item.address in seen:
            raise InvalidGenesis(f"{what}[{i}].address: {item.address.hex()} appears twice")
        seen.add(item.address)


def initial_state(genesis: Genesis, *, check_proofs: bool = True) -> State:
    """The state at height 0. Raises :class:`InvalidGenesis` naming the problem."""
    params = genesis.params
    _check_unique(genesis.accounts, "accounts")
    _check_unique(genesis.validators, "validators")
    _check_unique(genesis.providers, "providers")
    if params.epoch_length == 0 or params.committee_size == 0:
        raise InvalidGenesis("params: epoch_length and committee_size must be positive")
    if params.challenge_window == 0 or params.audit_window == 0:
        raise InvalidGenesis("params: challenge_window and audit_window must be positive")
    for name in ("double_sign_slash_bps", "evidence_reward_bps", "protocol_fee_bps", "collateral_bps",
                 "missed_deadline_slash_bps", "fraud_client_share_bps", "fraud_verifier_share_bps"):
        if getattr(params, name) > 10_000:
            raise InvalidGenesis(f"params.{name}: {getattr(params, name)} exceeds 10000 basis points")
    if params.fraud_client_share_bps + params.fraud_verifier_share_bps > 10_000:
        raise InvalidGenesis("params: fraud_client_share_bps + fraud_verifier_share_bps exceed 10000")
    backend = get_backend()
    keys: set[bytes] = set()
    for i, v in enumerate(genesis.validators):
        if v.stake < params.min_validator_stake:
            raise InvalidGenesis(f"validators[{i}].stake: {v.stake} below min_validator_stake {params.min_validator_stake}")
        if v.bls_pubkey in keys:
            raise InvalidGenesis(f"validators[{i}].bls_pubkey: key used twice")
        keys.add(v.bls_pubkey)
        if check_proofs and not backend.pop_verify(v.bls_pubkey, v.proof_of_possession):
            raise InvalidGenesis(f"validators[{i}].proof_of_possession: does not verify for bls_pubkey")
    for i, p in enumerate(genesis.providers):
        if p.bond < params.min_provider_bond:
            raise InvalidGenesis(f"providers[{i}].bond: {p.bond} below min_provider_bond {params.min_provider_bond}")
    supply = (
        sum(a.balance for a in genesis.accounts)
        + sum(v.stake for v in genesis.validators)
        + sum(p.bond for p in genesis.providers)
    )
    if supply > MAX_SUPPLY:
        raise InvalidGenesis(f"total supply {supply} exceeds {MAX_SUPPLY}")
    chain_id = compute_chain_id(genesis)
    randomness = compute_genesis_randomness(chain_id)
    validators = {
        v.address: Validator(bls_pubkey=v.bls_pubkey, stake=v.stake, status=ValidatorStatus.ACTIVE, jailed_until=0,
                             unbonding=())
        for v in genesis.validators
    }
    committee = compute_committee(validators, randomness, params.committee_size, 0, params.min_validator_stake)
    return State(
        chain_id=chain_id,
        params=params,
        genesis_supply=supply,
        height=0,
        last_block_hash=chain_id,
        randomness=randomness,
        committee=committee,
        previous_committee=committee,
        accounts={a.address: Account(balance=a.balance, nonce=0) for a in genesis.accounts},
        validators=validators,
        providers={
            p.address: Provider(capabilities=p.capabilities, bond=p.bond, completed=0, failed=0, missed=0)
            for p in genesis.providers
        },
    )


# ------------------------------------------------------------ JSON file


def _to_json(value: Any, ftype: FieldType) -> Any:
    if isinstance(ftype, Bytes):
        return value.hex()
    if isinstance(ftype, Nested):
        return {name: _to_json(getattr(value, name), ft) for name, ft in ftype.cls._fields_}
    if isinstance(ftype, ListOf):
        return [_to_json(v, ftype.item) for v in value]
    if isinstance(ftype, Maybe):
        return None if value is None else _to_json(value, ftype.item)
    return value


def _from_json(obj: Any, ftype: FieldType, path: str, *, partial_defaults: bool = False) -> Any:
    if isinstance(ftype, Bytes):
        if not isinstance(obj, str):
            raise DecodeError(path, f"expected a hex string, got {type(obj).__name__}")
        try:
            raw = bytes.fromhex(obj.removeprefix("0x"))
        except ValueError:
            raise DecodeError(path, "not valid hex") from None
        return ftype.from_wire(raw, path)
    if isinstance(ftype, Nested):
        if not isinstance(obj, dict):
            raise DecodeError(path, f"expected an object, got {type(obj).__name__}")
        names = [n for n, _ in ftype.cls._fields_]
        unknown = sorted(set(obj) - set(names))
        if unknown:
            raise DecodeError(path, f"unknown field(s) {', '.join(unknown)}")
        values = {}
        defaults = {f.name for f in dataclasses.fields(cast(Any, ftype.cls))  # a record is a dataclass
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        for name, ft in ftype.cls._fields_:
            sub = f"{path}.{name}" if path else name
            if name not in obj:
                if partial_defaults and name in defaults:
                    continue
                raise DecodeError(sub, "missing")
            values[name] = _from_json(obj[name], ft, sub, partial_defaults=partial_defaults)
        return ftype.cls(**values)
    if isinstance(ftype, ListOf):
        if not isinstance(obj, list):
            raise DecodeError(path, f"expected a list, got {type(obj).__name__}")
        if not ftype.min_items <= len(obj) <= ftype.max_items:
            raise DecodeError(path, f"expected {ftype.min_items}..{ftype.max_items} entries, got {len(obj)}")
        return tuple(_from_json(v, ftype.item, f"{path}[{i}]") for i, v in enumerate(obj))
    if isinstance(ftype, Maybe):
        return None if obj is None else _from_json(obj, ftype.item, path)
    if isinstance(ftype, (Int, Text, Bool, Float)):
        return ftype.from_wire(obj, path)
    raise DecodeError(path, f"unsupported field type {type(ftype).__name__}")


def genesis_to_json(genesis: Genesis) -> str:
    return json.dumps(_to_json(genesis, Nested(Genesis)), indent=2)


def genesis_from_json(text: str, *, source: str = "genesis") -> Genesis:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidGenesis(f"{source}: not valid JSON: {exc}") from exc
    try:
        if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
            params = _from_json(obj["params"], Nested(Params), "params", partial_defaults=True)
            obj = dict(obj, params=None)
        else:
            params = None
        if params is None:
            raise DecodeError("params", "missing or not an object")
        fields = {n: ft for n, ft in Genesis._fields_ if n != "params"}
        if not isinstance(obj, dict):
            raise DecodeError("", f"expected an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(fields) - {"params"})
        if unknown:
            raise DecodeError("", f"unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {"params": params}
        for name, ft in fields.items():
            if name not in obj:
                raise DecodeError(name, "missing")
            values[name] = _from_json(obj[name], ft, name)
        return Genesis(**values)
    except DecodeError as exc:
        raise InvalidGenesis(f"{source}: {exc}") from exc


def load_genesis(path: str | os.PathLike[str]) -> Genesis:
    """Read and check a genesis file; every problem raises :class:`InvalidGenesis` naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidGenesis(f"{p}: genesis file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidGenesis(f"{p}: cannot read genesis file: {exc}") from exc
    genesis = genesis_from_json(text, source=str(p))
    try:
        initial_state(genesis)
    except InvalidGenesis as exc:
        raise InvalidGenesis(f"{p}: {exc}") from exc
    return genesis


def save_genesis(path: str | os.PathLike[str], genesis: Genesis) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(genesis_to_json(genesis) + "\n", encoding="utf-8")
    os.replace(tmp, p)
