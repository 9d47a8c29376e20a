"""Encrypted key files: scrypt + AES-256-GCM in a small JSON document.

File format (version 1), all byte strings lowercase hex::

    {
      "version": 1,
      "kind": "account" | "validator",
      "public": <Ed25519 public key (32 B) | BLS public key (48 B)>,
      "address": <20-byte address for an account key | null for a validator key>,
      "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": <16..64 B>},
      "cipher": {"name": "aes-256-gcm", "nonce": <12 B>, "ciphertext": <32 B>, "tag": <16 B>},
      "check": <16 B>
    }

scrypt derives 64 bytes from the passphrase: the first 32 are the AES key,
the last 32 a check key. ``check = HMAC-SHA256(check_key, CHECK_LABEL)[:16]``
depends on nothing but the passphrase and the kdf parameters, while the GCM
tag also authenticates the clear header as associated data::

    AAD = "p2pgpu keystore v1" || 0x00 || version (u16 BE) || len(kind) || kind
          || len(public) || public || len(address) || address   (lengths 1 byte;
                                                   address empty for a validator)

That is how a wrong passphrase is told from a damaged file:

* check mismatch -> :class:`WrongPassphrase` (or the salt/kdf parameters/check
  were altered, which no reader can tell from a typo);
* check matches but GCM fails -> :class:`KeystoreDamaged` (ciphertext, nonce,
  tag or clear header altered);
* GCM passes but the secret's public key differs from ``public`` ->
  :class:`KeystoreKeyMismatch` (a file written wrongly, never by this module).

The check value gives an attacker nothing the GCM tag would not: testing a
guess costs one scrypt either way.

Reading is strict and bounded: unknown or missing fields, wrong JSON types,
non-canonical hex, and kdf parameters that would cost more than
:data:`MAX_SCRYPT_MEMORY` or :data:`MAX_SCRYPT_WORK` are refused before
scrypt runs, so a planted file cannot stall a node. Writes are atomic (temp
file in the same directory, fsync, link/rename, fsync of the directory) with
mode 0600, and never replace an existing key unless asked to: a lost key is
lost stake.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from Crypto.Cipher import AES
from Crypto.Protocol.KDF import scrypt

from ledger import bls
from ledger.keys import AccountKey, KeyMaterialError, address_of
from ledger.store import sync_dir

__all__ = [
    "CHECK_LABEL",
    "DEFAULT_SCRYPT_N",
    "FORMAT_VERSION",
    "KEY_KINDS",
    "MAX_SCRYPT_MEMORY",
    "MAX_SCRYPT_WORK",
    "KeyKind",
    "KeystoreContents",
    "KeystoreDamaged",
    "KeystoreError",
    "KeystoreExists",
    "KeystoreKeyMismatch",
    "KeystoreNotFound",
    "KeystoreParameterError",
    "KeystoreTruncated",
    "KeystoreUnsupported",
    "WrongPassphrase",
    "load_keystore",
    "open_keystore",
    "public_of",
    "save_keystore",
    "seal_keystore",
]

KeyKind = Literal["account", "validator"]
KEY_KINDS: Final = ("account", "validator")
FORMAT_VERSION: Final = 1
CHECK_LABEL: Final = b"p2pgpu keystore passphrase check v1"
AAD_LABEL: Final = b"p2pgpu keystore v1\x00"

DEFAULT_SCRYPT_N: Final = 2**15
DEFAULT_SCRYPT_R: Final = 8
DEFAULT_SCRYPT_P: Final = 1
MIN_SCRYPT_N: Final = 2**4
MAX_SCRYPT_N: Final = 2**20
MAX_SCRYPT_R: Final = 32
MAX_SCRYPT_P: Final = 16
MAX_SCRYPT_MEMORY: Final = 256 * 1024 * 1024
"""Bytes scrypt may allocate (128 * n * r): refuses files that would exhaust memory."""
MAX_SCRYPT_WORK: Final = 2**23
"""Upper bound on n * r * p (time): 32x the default."""
MIN_SALT: Final = 16
MAX_SALT: Final = 64
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
CHECK_SIZE: Final = 16
MAX_FILE_SIZE: Final = 16 * 1024

_SECRET_SIZE: Final = {"account": 32, "validator": bls.SECRET_KEY_SIZE}
_PUBLIC_SIZE: Final = {"account": 32, "validator": bls.PUBLIC_KEY_SIZE}
_TOP_FIELDS: Final = frozenset({"version", "kind", "public", "address", "kdf", "cipher", "check"})
_KDF_FIELDS: Final = frozenset({"name", "n", "r", "p", "salt"})
_CIPHER_FIELDS: Final = frozenset({"name", "nonce", "ciphertext", "tag"})
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


class KeystoreError(Exception):
    """Base class; ``path`` names the file and the message says what is wrong with it."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"keystore {self.path}: {problem}")


class KeystoreNotFound(KeystoreError):
    """No file at the path."""


class KeystoreExists(KeystoreError):
    """Saving would replace an existing key file and ``overwrite`` was not given."""


class KeystoreParameterError(KeystoreError, ValueError):
    """The caller asked to save something that cannot be saved (bad kind, secret size, kdf parameters)."""


class WrongPassphrase(KeystoreError):
    """The passphrase does not open the file (or its kdf parameters/salt were altered)."""


class KeystoreDamaged(KeystoreError):
    """The file is not an intact keystore: bad JSON, fields, hex, or an authentication failure."""


class KeystoreTruncated(KeystoreDamaged):
    """The file ends before the JSON document does (an interrupted copy, a full disk)."""


class KeystoreUnsupported(KeystoreDamaged):
    """A version, kind, kdf or cipher this code does not implement."""


class KeystoreKeyMismatch(KeystoreDamaged):
    """The public key written in the file does not belong to the secret inside it."""


@dataclass(frozen=True, slots=True)
class KeystoreContents:
    """An opened keystore. ``repr`` leaves the secret out."""

    kind: KeyKind
    secret: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"KeystoreContents(kind={self.kind!r}, public={self.public.hex()})"


def public_of(kind: KeyKind, secret: bytes) -> bytes:
    """The public key of ``secret``: Ed25519 for an account, BLS G1 for a validator.

    Raises KeyMaterialError / BLSKeyError if ``secret`` is not a key of that kind.
    """
    if kind == "account":
        return AccountKey.from_seed(secret).public_key
    if kind == "validator":
        return bls.get_backend().sk_to_pk(secret)
    raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")


# --------------------------------------------------------------------------
# Pure core: document <-> secret


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    # NFKD so that the same passphrase typed on two keyboards (composed vs
    # decomposed accents) opens the same file, as in EIP-2335.
    if isinstance(passphrase, bytes):
        return passphrase
    if isinstance(passphrase, str):
        return unicodedata.normalize("NFKD", passphrase).encode("utf-8")
    raise TypeError(f"passphrase must be str or bytes, got {type(passphrase).__name__}")


def _scrypt_problem(n: int, r: int, p: int) -> str | None:
    """Why these scrypt parameters are refused, or None."""
    if not (MIN_SCRYPT_N <= n <= MAX_SCRYPT_N and n & (n - 1) == 0):
        return f"scrypt n={n} is not a power of two in [2**4, 2**20]"
    if not 1 <= r <= MAX_SCRYPT_R:
        return f"scrypt r={r} is outside [1, {MAX_SCRYPT_R}]"
    if not 1 <= p <= MAX_SCRYPT_P:
        return f"scrypt p={p} is outside [1, {MAX_SCRYPT_P}]"
    if 128 * n * r > MAX_SCRYPT_MEMORY:
        return f"scrypt n={n}, r={r} would need {128 * n * r // 2**20} MiB (limit {MAX_SCRYPT_MEMORY // 2**20} MiB)"
    if n * r * p > MAX_SCRYPT_WORK:
        return f"scrypt n*r*p={n * r * p} exceeds the work limit {MAX_SCRYPT_WORK}"
    return None


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    # pycryptodome returns a tuple only when num_keys > 1.
    derived = scrypt(passphrase, salt, 64, N=n, r=r, p=p)
    enc_key, check_key = derived[:32], derived[32:]
    return enc_key, hmac.new(check_key, CHECK_LABEL, hashlib.sha256).digest()[:CHECK_SIZE]


def _associated_data(version: int, kind: str, public: bytes, address: bytes | None) -> bytes:
    return b"".join(
        (
            AAD_LABEL,
            version.to_bytes(2, "big"),
            bytes([len(kind)]),
            kind.encode("ascii"),
            bytes([len(public)]),
            public,
            bytes([len(address or b"")]),
            address or b"",
        )
    )


def seal_keystore(
    secret: bytes,
    kind: KeyKind,
    public: bytes | None,
    passphrase: str | bytes,
    *,
    scrypt_n: int = DEFAULT_SCRYPT_N,
    scrypt_r: int = DEFAULT_SCRYPT_R,
    scrypt_p: int = DEFAULT_SCRYPT_P,
    path: str | os.PathLike[str] = "<memory>",
) -> dict[str, Any]:
    """Encrypt ``secret`` into a keystore document (a JSON-ready dict); no I/O.

    ``public`` is derived when None and must match the secret when given, so
    a file can never name a key it does not hold. ``path`` only labels errors.
    """
    if kind not in KEY_KINDS:
        raise KeystoreParameterError(path, f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")
    if not isinstance(secret, bytes) or len(secret) != _SECRET_SIZE[kind]:
        got = f"{len(secret)} bytes" if isinstance(secret, bytes) else type(secret).__name__
        raise KeystoreParameterError(path, f"the {kind} key secret must be {_SECRET_SIZE[kind]} bytes, got {got}")
    for label, value in (("n", scrypt_n), ("r", scrypt_r), ("p", scrypt_p)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise KeystoreParameterError(path, f"scrypt {label} must be an int")
    problem = _scrypt_problem(scrypt_n, scrypt_r, scrypt_p)
    if problem:
        raise KeystoreParameterError(path, problem)
    try:
        derived_public = public_of(kind, secret)
    except (KeyMaterialError, bls.BLSKeyError) as exc:
        raise KeystoreParameterError(path, f"not a {kind} secret key: {exc}") from exc
    if public is not None and not isinstance(public, bytes):
        raise KeystoreParameterError(path, f"public key must be bytes or None, got {type(public).__name__}")
    if public is not None and not hmac.compare_digest(public, derived_public):
        raise KeystoreKeyMismatch(path, f"the given public key {public.hex()} does not belong to the secret")
    address = address_of(derived_public) if kind == "account" else None

    salt = secrets.token_bytes(32)
    nonce = secrets.token_bytes(NONCE_SIZE)
    enc_key, check = _derive(_passphrase_bytes(passphrase), salt, scrypt_n, scrypt_r, scrypt_p)
    cipher = AES.new(enc_key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
    cipher.update(_associated_data(FORMAT_VERSION, kind, derived_public, address))
    ciphertext, tag = cipher.encrypt_and_digest(secret)
    return {
        "version": FORMAT_VERSION,
        "kind": kind,
        "public": derived_public.hex(),
        "address": address.hex() if address is not None else None,
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": scrypt_r, "p": scrypt_p, "salt": salt.hex()},
        "cipher": {"name": "aes-256-gcm", "nonce": nonce.hex(), "ciphertext": ciphertext.hex(), "tag": tag.hex()},
        "check": check.hex(),
    }


class _Reader:
    """Strict field access on a parsed document, raising errors that name the field."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def damaged(self, problem: str) -> KeystoreDamaged:
        return KeystoreDamaged(self.path, problem)

    def as_object(self, value: object, where: str, fields: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.damaged(f"{where} must be a JSON object, got {type(value).__name__}")
        missing = sorted(fields - value.keys())
        if missing:
            raise self.damaged(f"{where} is missing field(s) {', '.join(missing)}")
        extra = sorted(value.keys() - fields)
        if extra:
            raise self.damaged(f"{where} has unknown field(s) {', '.join(extra)}")
        return value

    def as_int(self, value: object, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.damaged(f"{where} must be an integer, got {type(value).__name__}")
        return value

    def as_str(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.damaged(f"{where} must be a string, got {type(value).__name__}")
        return value

    def as_hex(self, value: object, where: str, min_size: int, max_size: int | None = None) -> bytes:
        text = self.as_str(value, where)
        if not _HEX.fullmatch(text):
            raise self.damaged(f"{where} is not lowercase hex of whole bytes")
        data = bytes.fromhex(text)
        top = min_size if max_size is None else max_size
        if not min_size <= len(data) <= top:
            size = f"{min_size}" if max_size is None else f"{min_size}..{max_size}"
            raise self.damaged(f"{where} must be {size} bytes, got {len(data)}")
        return data


def open_keystore(document: object, passphrase: str | bytes, path: str | os.PathLike[str] = "<memory>") -> KeystoreContents:
    """Check and decrypt a parsed keystore document; no I/O. ``path`` labels errors."""
    rd = _Reader(path)
    doc = rd.as_object(document, "the document", _TOP_FIELDS)

    version = rd.as_int(doc["version"], "version")
    if version != FORMAT_VERSION:
        raise KeystoreUnsupported(path, f"format version {version} is not supported (this code reads {FORMAT_VERSION})")
    kind = rd.as_str(doc["kind"], "kind")
    if kind not in KEY_KINDS:
        raise KeystoreUnsupported(path, f"key kind {kind!r} is not supported (expected {', '.join(KEY_KINDS)})")
    public = rd.as_hex(doc["public"], "public", _PUBLIC_SIZE[kind])
    if kind == "account":
        address = rd.as_hex(doc["address"], "address", 20)
        if address != address_of(public):
            raise rd.damaged("address does not match the public key")
    else:
        if doc["address"] is not None:
            raise rd.damaged("address must be null for a validator key")
        address = None

    kdf = rd.as_object(doc["kdf"], "kdf", _KDF_FIELDS)
    if rd.as_str(kdf["name"], "kdf.name") != "scrypt":
        raise KeystoreUnsupported(path, f"kdf {kdf['name']!r} is not supported (only 'scrypt')")
    n, r, p = (rd.as_int(kdf[k], f"kdf.{k}") for k in ("n", "r", "p"))
    problem = _scrypt_problem(n, r, p)
    if problem:
        raise rd.damaged(f"kdf parameters refused: {problem}")
    salt = rd.as_hex(kdf["salt"], "kdf.salt", MIN_SALT, MAX_SALT)

    cipher_doc = rd.as_object(doc["cipher"], "cipher", _CIPHER_FIELDS)
    if rd.as_str(cipher_doc["name"], "cipher.name") != "aes-256-gcm":
        raise KeystoreUnsupported(path, f"cipher {cipher_doc['name']!r} is not supported (only 'aes-256-gcm')")
    nonce = rd.as_hex(cipher_doc["nonce"], "cipher.nonce", NONCE_SIZE)
    ciphertext = rd.as_hex(cipher_doc["ciphertext"], "cipher.ciphertext", _SECRET_SIZE[kind])
    tag = rd.as_hex(cipher_doc["tag"], "cipher.tag", TAG_SIZE)
    stored_check = rd.as_hex(doc["check"], "check", CHECK_SIZE)

    enc_key, check = _derive(_passphrase_bytes(passphrase), salt, n, r, p)
    if not hmac.compare_digest(check, stored_check):
        raise WrongPassphrase(path, "wrong passphrase (or the file's salt, kdf parameters or check were altered)")
    cipher = AES.new(enc_key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
    cipher.update(_associated_data(version, kind, public, address))
    try:
        secret = cipher.decrypt_and_verify(ciphertext, tag)
    except ValueError:
        raise rd.damaged(
            "the passphrase is right but authentication failed: the ciphertext, nonce, tag "
            "or clear header (kind, public, address) was altered"
        ) from None

    typed_kind: KeyKind = "account" if kind == "account" else "validator"
    try:
        derived_public = public_of(typed_kind, secret)
    except (KeyMaterialError, bls.BLSKeyError) as exc:
        raise rd.damaged(f"the decrypted secret is not a {kind} key: {exc}") from exc
    if not hmac.compare_digest(derived_public, public):
        raise KeystoreKeyMismatch(path, f"public key {public.hex()} in the file does not belong to the secret inside it")
    return KeystoreContents(kind=typed_kind, secret=secret, public=public)


# --------------------------------------------------------------------------
# Files


def save_keystore(
    path: str | os.PathLike[str],
    secret: bytes,
    kind: KeyKind,
    public: bytes | None,
    passphrase: str | bytes,
    *,
    scrypt_n: int = DEFAULT_SCRYPT_N,
    scrypt_r: int = DEFAULT_SCRYPT_R,
    scrypt_p: int = DEFAULT_SCRYPT_P,
    overwrite: bool = False,
) -> None:
    """Encrypt ``secret`` and write it to ``path`` atomically with mode 0600.

    Either the complete new file is at ``path`` or nothing changed: the data
    goes to a temp file in the same directory, is fsynced, then linked (or,
    with ``overwrite``, renamed) into place, and the directory is fsynced.
    An existing file is kept and :class:`KeystoreExists` raised unless
    ``overwrite`` is true.
    """
    target = Path(path)
    document = seal_keystore(
        secret, kind, public, passphrase, scrypt_n=scrypt_n, scrypt_r=scrypt_r, scrypt_p=scrypt_p, path=target
    )
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    directory = target.parent
    if not directory.is_dir():
        raise KeystoreError(target, f"directory {directory} does not exist")
    if not overwrite and target.exists():
        raise KeystoreExists(target, "a file already exists there; refusing to replace a key (pass overwrite=True)")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            os.fchmod(tmp_file.fileno(), 0o600)
            tmp_file.write(data)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if target appeared meanwhile: never clobbers
            except FileExistsError:
                raise KeystoreExists(target, "a file already exists there; refusing to replace a key") from None
            tmp.unlink()
        sync_dir(directory)
    except OSError as exc:
        raise KeystoreError(target, f"could not write: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _ends_early(text: str, exc: json.JSONDecodeError) -> bool:
    """Whether a JSON error means the text stopped mid-document rather than holding wrong bytes.

    True when the parser ran off the end, or an unterminated string runs to
    the end (a keystore's strings never contain newlines, so a cut inside one
    reaches EOF), or the rest is a cut-off ``null``/``true``/``false``.
    """
    rest = text[exc.pos :].rstrip()
    return (
        exc.pos >= len(text.rstrip())
        or exc.msg.startswith("Unterminated string")
        or (rest != "" and any(word.startswith(rest) for word in ("null", "true", "false")))
    )


def load_keystore(path: str | os.PathLike[str], passphrase: str | bytes) -> KeystoreContents:
    """Read, check and decrypt the keystore at ``path``; every failure is a :class:`KeystoreError`."""
    target = Path(path)
    try:
        with open(target, "rb") as f:
            raw = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise KeystoreNotFound(target, "no such file") from None
    except IsADirectoryError:
        raise KeystoreError(target, "is a directory, not a keystore file") from None
    except OSError as exc:
        raise KeystoreError(target, f"could not read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_SIZE:
        raise KeystoreDamaged(target, f"file is larger than {MAX_FILE_SIZE} bytes; not a keystore")
    if not raw.strip():
        raise KeystoreTruncated(target, "file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeystoreDamaged(target, f"not UTF-8 text (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if _ends_early(text, exc):
            raise KeystoreTruncated(target, f"JSON ends early at line {exc.lineno}: the file is truncated") from None
        raise KeystoreDamaged(target, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return open_keystore(document, passphrase, target)
