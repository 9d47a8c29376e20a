"""Encrypted keystore files: round trips, and a specific error for every way a file can be wrong."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from Crypto.Cipher import AES
from Crypto.Protocol.KDF import scrypt

from ledger import bls
from ledger.keys import AccountKey, ValidatorKey, address_of
from ledger.keystore import (
    KeystoreContents,
    KeystoreDamaged,
    KeystoreError,
    KeystoreExists,
    KeystoreKeyMismatch,
    KeystoreNotFound,
    KeystoreParameterError,
    KeystoreTruncated,
    KeystoreUnsupported,
    WrongPassphrase,
    load_keystore,
    open_keystore,
    save_keystore,
    seal_keystore,
)

FAST_N = 2**4  # tests only; the default is 2**15
PASS = "correct horse battery staple"


@pytest.fixture
def account() -> AccountKey:
    return AccountKey.from_seed(hashlib.sha256(b"keystore-account").digest())


@pytest.fixture
def validator() -> ValidatorKey:
    return ValidatorKey.from_ikm(hashlib.sha256(b"keystore-validator").digest())


@pytest.fixture
def account_file(tmp_path: Path, account: AccountKey) -> Path:
    path = tmp_path / "node.key.json"
    save_keystore(path, account.seed, "account", account.public_key, PASS, scrypt_n=FAST_N)
    return path


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _flip_hex(text: str, index: int = 0) -> str:
    """Change one hex digit (staying lowercase hex)."""
    replacement = "0" if text[index] != "0" else "1"
    return text[:index] + replacement + text[index + 1 :]


def _handmade(secret: bytes, kind: str, public: bytes, passphrase: bytes, n: int = FAST_N) -> dict[str, Any]:
    """A keystore built from the format described in ledger/keystore.py's docstring, not from its code."""
    salt, nonce = b"\x01" * 32, b"\x02" * 12
    derived = scrypt(passphrase, salt, 64, N=n, r=8, p=1)
    assert isinstance(derived, bytes)
    check = hmac.new(derived[32:], b"p2pgpu keystore passphrase check v1", hashlib.sha256).digest()[:16]
    address = address_of(public) if kind == "account" else b""
    aad = (
        b"p2pgpu keystore v1\x00"
        + (1).to_bytes(2, "big")
        + bytes([len(kind)])
        + kind.encode()
        + bytes([len(public)])
        + public
        + bytes([len(address)])
        + address
    )
    cipher = AES.new(derived[:32], AES.MODE_GCM, nonce=nonce)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(secret)
    return {
        "version": 1,
        "kind": kind,
        "public": public.hex(),
        "address": address.hex() if kind == "account" else None,
        "kdf": {"name": "scrypt", "n": n, "r": 8, "p": 1, "salt": salt.hex()},
        "cipher": {"name": "aes-256-gcm", "nonce": nonce.hex(), "ciphertext": ciphertext.hex(), "tag": tag.hex()},
        "check": check.hex(),
    }


# --------------------------------------------------------------------------
# Round trips


def test_account_round_trip(account_file: Path, account: AccountKey) -> None:
    contents = load_keystore(account_file, PASS)
    assert contents == KeystoreContents(kind="account", secret=account.seed, public=account.public_key)
    assert AccountKey.from_seed(contents.secret) == account
    doc = json.loads(account_file.read_text())
    assert doc["public"] == account.public_key.hex()
    assert doc["address"] == account.address.hex()
    assert account.seed.hex() not in account_file.read_text()
    assert account.seed.hex() not in repr(contents)


def test_validator_round_trip(tmp_path: Path, validator: ValidatorKey) -> None:
    path = tmp_path / "validator.json"
    save_keystore(path, validator.secret, "validator", None, b"raw bytes passphrase", scrypt_n=FAST_N)
    contents = load_keystore(path, b"raw bytes passphrase")
    assert contents.kind == "validator"
    assert ValidatorKey.from_secret(contents.secret) == validator
    assert json.loads(path.read_text())["address"] is None


def test_file_is_private_and_no_temp_file_is_left(account_file: Path) -> None:
    assert stat.S_IMODE(account_file.stat().st_mode) == 0o600
    assert os.listdir(account_file.parent) == [account_file.name]


def test_default_scrypt_cost_is_recorded(tmp_path: Path, account: AccountKey) -> None:
    path = tmp_path / "k.json"
    save_keystore(path, account.seed, "account", None, PASS)
    assert json.loads(path.read_text())["kdf"]["n"] == 2**15
    assert load_keystore(path, PASS).secret == account.seed


def test_unicode_passphrase_is_normalised(tmp_path: Path, account: AccountKey) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    path = tmp_path / "k.json"
    save_keystore(path, account.seed, "account", None, composed, scrypt_n=FAST_N)
    assert load_keystore(path, decomposed).secret == account.seed


def test_handmade_file_following_the_documented_format_opens(tmp_path: Path, account: AccountKey) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps(_handmade(account.seed, "account", account.public_key, PASS.encode())))
    assert load_keystore(path, PASS).secret == account.seed


# --------------------------------------------------------------------------
# Passphrase vs damage


def test_wrong_passphrase(account_file: Path) -> None:
    with pytest.raises(WrongPassphrase, match=f"{account_file}.*wrong passphrase"):
        load_keystore(account_file, PASS + "!")


@pytest.mark.parametrize("field", ["ciphertext", "tag", "nonce"])
def test_flipped_cipher_byte_is_damage_not_a_wrong_passphrase(account_file: Path, field: str) -> None:
    _edit(account_file, lambda d: d["cipher"].__setitem__(field, _flip_hex(d["cipher"][field], 5)))
    with pytest.raises(KeystoreDamaged, match="passphrase is right but authentication failed") as info:
        load_keystore(account_file, PASS)
    assert not isinstance(info.value, WrongPassphrase)


def test_swapped_clear_public_key_is_damage(account_file: Path) -> None:
    other = AccountKey.generate()

    def swap(doc: dict[str, Any]) -> None:
        doc["public"], doc["address"] = other.public_key.hex(), other.address.hex()

    _edit(account_file, swap)
    with pytest.raises(KeystoreDamaged, match="clear header"):
        load_keystore(account_file, PASS)


def test_address_inconsistent_with_public_key_is_damage(account_file: Path) -> None:
    _edit(account_file, lambda d: d.__setitem__("address", _flip_hex(d["address"])))
    with pytest.raises(KeystoreDamaged, match="address does not match"):
        load_keystore(account_file, PASS)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["kdf"].__setitem__("salt", _flip_hex(d["kdf"]["salt"])),
        lambda d: d["kdf"].__setitem__("n", 2**5),
        lambda d: d.__setitem__("check", _flip_hex(d["check"])),
    ],
    ids=["salt", "n", "check"],
)
def test_altered_kdf_inputs_read_as_a_wrong_passphrase(account_file: Path, change: Callable[[dict], None]) -> None:
    # Documented limitation: no reader can tell an altered salt from a mistyped passphrase.
    _edit(account_file, change)
    with pytest.raises(WrongPassphrase):
        load_keystore(account_file, PASS)


def test_public_key_not_belonging_to_the_secret(tmp_path: Path, account: AccountKey) -> None:
    other = AccountKey.generate()
    path = tmp_path / "k.json"
    path.write_text(json.dumps(_handmade(account.seed, "account", other.public_key, PASS.encode())))
    with pytest.raises(KeystoreKeyMismatch, match="does not belong to the secret"):
        load_keystore(path, PASS)


def test_decrypted_secret_that_is_no_valid_key(tmp_path: Path, validator: ValidatorKey) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps(_handmade(bytes(32), "validator", validator.public_key, PASS.encode())))
    with pytest.raises(KeystoreDamaged, match="not a validator key"):
        load_keystore(path, PASS)


# --------------------------------------------------------------------------
# Structurally bad files


@pytest.mark.parametrize(
    ("change", "error", "problem"),
    [
        (lambda d: d.__setitem__("version", 2), KeystoreUnsupported, "format version 2"),
        (lambda d: d.__setitem__("kind", "miner"), KeystoreUnsupported, "key kind 'miner'"),
        (lambda d: d["kdf"].__setitem__("name", "pbkdf2"), KeystoreUnsupported, "kdf 'pbkdf2'"),
        (lambda d: d["cipher"].__setitem__("name", "aes-128-ctr"), KeystoreUnsupported, "cipher 'aes-128-ctr'"),
        (lambda d: d.__setitem__("version", "1"), KeystoreDamaged, "version must be an integer, got str"),
        (lambda d: d.__setitem__("version", True), KeystoreDamaged, "version must be an integer, got bool"),
        (lambda d: d["kdf"].__setitem__("n", 16.0), KeystoreDamaged, "kdf.n must be an integer"),
        (lambda d: d.__delitem__("check"), KeystoreDamaged, "missing field.*check"),
        (lambda d: d["cipher"].__delitem__("tag"), KeystoreDamaged, "cipher is missing field.*tag"),
        (lambda d: d.__setitem__("comment", "hi"), KeystoreDamaged, "unknown field.*comment"),
        (lambda d: d.__setitem__("kdf", []), KeystoreDamaged, "kdf must be a JSON object, got list"),
        (lambda d: d.__setitem__("public", d["public"].upper()), KeystoreDamaged, "public is not lowercase hex"),
        (lambda d: d.__setitem__("public", d["public"][:-1]), KeystoreDamaged, "public is not lowercase hex"),
        (lambda d: d.__setitem__("public", "zz" * 32), KeystoreDamaged, "public is not lowercase hex"),
        (lambda d: d.__setitem__("public", d["public"][:-2]), KeystoreDamaged, "public must be 32 bytes, got 31"),
        (lambda d: d["cipher"].__setitem__("nonce", "00" * 16), KeystoreDamaged, "nonce must be 12 bytes"),
        (lambda d: d["cipher"].__setitem__("ciphertext", "00" * 33), KeystoreDamaged, "ciphertext must be 32"),
        (lambda d: d["kdf"].__setitem__("salt", "00" * 8), KeystoreDamaged, "salt must be 16..64 bytes"),
        (lambda d: d["kdf"].__setitem__("n", 2**30), KeystoreDamaged, "n=1073741824 is not a power of two in"),
        (lambda d: d["kdf"].__setitem__("n", 1000), KeystoreDamaged, "n=1000 is not a power of two"),
        (lambda d: d["kdf"].__setitem__("n", 2**20), KeystoreDamaged, "would need 1024 MiB"),
        (lambda d: d["kdf"].__setitem__("r", 0), KeystoreDamaged, "r=0 is outside"),
        (lambda d: d["kdf"].__setitem__("p", 10**9), KeystoreDamaged, "p=1000000000 is outside"),
        (lambda d: d["kdf"].update(n=2**18, r=8, p=16), KeystoreDamaged, "exceeds the work limit"),
    ],
)
def test_bad_fields_are_refused_with_the_field_named(
    account_file: Path, change: Callable[[dict], None], error: type[KeystoreError], problem: str
) -> None:
    _edit(account_file, change)
    with pytest.raises(error, match=problem) as info:
        load_keystore(account_file, PASS)
    assert str(account_file) in str(info.value)
    assert info.value.path == str(account_file)


def test_validator_file_with_an_address_is_refused(tmp_path: Path, validator: ValidatorKey) -> None:
    path = tmp_path / "v.json"
    save_keystore(path, validator.secret, "validator", validator.public_key, PASS, scrypt_n=FAST_N)
    _edit(path, lambda d: d.__setitem__("address", "00" * 20))
    with pytest.raises(KeystoreDamaged, match="address must be null"):
        load_keystore(path, PASS)


def test_every_cut_of_the_file_is_reported_as_truncated(account_file: Path) -> None:
    text = account_file.read_text()
    end = text.rindex("}")
    for cut in range(0, end):
        account_file.write_text(text[:cut])
        with pytest.raises(KeystoreTruncated):
            load_keystore(account_file, PASS)


def test_empty_file_is_truncated(account_file: Path) -> None:
    account_file.write_text("")
    with pytest.raises(KeystoreTruncated, match="empty"):
        load_keystore(account_file, PASS)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"version": 1,, "kind": "account"}', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2, 3]", "the document must be a JSON object, got list"),
        (b"{}" + b" " * 20000, "larger than"),
    ],
)
def test_garbage_files_are_damaged(account_file: Path, content: bytes, problem: str) -> None:
    account_file.write_bytes(content)
    with pytest.raises(KeystoreDamaged, match=problem) as info:
        load_keystore(account_file, PASS)
    assert not isinstance(info.value, KeystoreTruncated)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(KeystoreNotFound, match=f"keystore {missing}: no such file"):
        load_keystore(missing, PASS)
    with pytest.raises(KeystoreError, match="is a directory"):
        load_keystore(tmp_path, PASS)


def test_open_keystore_works_on_an_in_memory_document(account: AccountKey) -> None:
    doc = seal_keystore(account.seed, "account", None, PASS, scrypt_n=FAST_N)
    assert open_keystore(doc, PASS).secret == account.seed
    with pytest.raises(WrongPassphrase, match="<memory>"):
        open_keystore(doc, "nope")


# --------------------------------------------------------------------------
# Saving


def test_save_never_replaces_a_key_unless_asked(account_file: Path) -> None:
    before = account_file.read_bytes()
    other = AccountKey.generate()
    with pytest.raises(KeystoreExists, match="refusing to replace"):
        save_keystore(account_file, other.seed, "account", None, PASS, scrypt_n=FAST_N)
    assert account_file.read_bytes() == before
    save_keystore(account_file, other.seed, "account", None, PASS, scrypt_n=FAST_N, overwrite=True)
    assert load_keystore(account_file, PASS).public == other.public_key
    assert os.listdir(account_file.parent) == [account_file.name]


def test_save_refuses_a_public_key_of_another_secret(tmp_path: Path, account: AccountKey) -> None:
    path = tmp_path / "k.json"
    with pytest.raises(KeystoreKeyMismatch, match="does not belong"):
        save_keystore(path, account.seed, "account", AccountKey.generate().public_key, PASS, scrypt_n=FAST_N)
    assert not path.exists()


@pytest.mark.parametrize(
    ("secret", "kind", "kwargs", "problem"),
    [
        (b"\x01" * 32, "miner", {}, "unknown key kind 'miner'"),
        (b"\x01" * 31, "account", {}, "account key secret must be 32 bytes, got 31"),
        (bytes(32), "validator", {}, "not a validator secret key"),
        (bls.CURVE_ORDER.to_bytes(32, "big"), "validator", {}, "not a validator secret key"),
        (b"\x01" * 32, "account", {"scrypt_n": 2**21}, "not a power of two"),
        (b"\x01" * 32, "account", {"scrypt_n": 2**4, "scrypt_r": 0}, "r=0"),
        (b"\x01" * 32, "account", {"scrypt_n": 2.5}, "scrypt n must be an int"),
    ],
)
def test_save_refuses_bad_parameters(
    tmp_path: Path, secret: bytes, kind: str, kwargs: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "k.json"
    with pytest.raises(KeystoreParameterError, match=problem):
        save_keystore(path, secret, kind, None, PASS, **{"scrypt_n": FAST_N, **kwargs})  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_directory(tmp_path: Path, account: AccountKey) -> None:
    with pytest.raises(KeystoreError, match="does not exist"):
        save_keystore(tmp_path / "no" / "k.json", account.seed, "account", None, PASS, scrypt_n=FAST_N)


def test_save_refuses_a_public_key_that_is_not_bytes(tmp_path: Path, account: AccountKey) -> None:
    with pytest.raises(KeystoreParameterError, match="public key must be bytes or None, got str"):
        save_keystore(tmp_path / "k.json", account.seed, "account", account.public_key.hex(), PASS)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
