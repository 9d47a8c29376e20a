"""Account keys (Ed25519) and validator keys (BLS12-381).

An account key is a node's identity everywhere: it signs transactions, bids
and receipts, its SHA-256 prefix is the ledger address, and the same 32-byte
seed is the node's libp2p identity, so a peer id can be matched to an account
without a separate binding. Ed25519 goes through ``cryptography`` (OpenSSL),
which verifies about three times faster than pycryptodome here.

A validator adds a BLS key for votes, whose signatures aggregate into commit
certificates; see :mod:`ledger.bls`.

Secrets never appear in ``repr`` so a logged key object leaks nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import nacl.bindings as _sodium
import nacl.exceptions as _sodium_exc

from ledger import bls

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

__all__ = [
    "ADDRESS_SIZE",
    "ED25519_PUBLIC_KEY_SIZE",
    "ED25519_SEED_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "AccountKey",
    "KeyMaterialError",
    "ValidatorKey",
    "address_of",
    "verify_ed25519",
]

ED25519_SEED_SIZE = 32
ED25519_PUBLIC_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
ADDRESS_SIZE = 20


class KeyMaterialError(ValueError):
    """Bytes that cannot be a key of the kind asked for."""


def address_of(pubkey: bytes) -> bytes:
    """The 20-byte ledger address of an Ed25519 public key: SHA-256(pubkey)[:20]."""
    if not isinstance(pubkey, bytes) or len(pubkey) != ED25519_PUBLIC_KEY_SIZE:
        got = f"{len(pubkey)} bytes" if isinstance(pubkey, bytes) else type(pubkey).__name__
        raise KeyMaterialError(f"an Ed25519 public key is {ED25519_PUBLIC_KEY_SIZE} bytes, got {got}")
    return hashlib.sha256(pubkey).digest()[:ADDRESS_SIZE]


def verify_ed25519(pubkey: bytes, msg: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is ``pubkey``'s Ed25519 signature of ``msg``; False for any malformed input.

    Verification goes through libsodium (PyNaCl): measured here at ~120-140 us
    against ~270 us for ``cryptography``'s OpenSSL path (bench/bls.py), and it
    rejects non-canonical encodings and small-order keys. Every node must use
    the same verifier, since Ed25519 libraries disagree on such edge cases;
    signing stays with ``cryptography`` (signatures are deterministic, so
    identical either way).
    """
    if not (
        isinstance(pubkey, bytes)
        and len(pubkey) == ED25519_PUBLIC_KEY_SIZE
        and isinstance(sig, bytes)
        and len(sig) == ED25519_SIGNATURE_SIZE
        and isinstance(msg, bytes)
    ):
        return False
    try:
        _sodium.crypto_sign_open(sig + msg, pubkey)
    except (_sodium_exc.BadSignatureError, _sodium_exc.ValueError, _sodium_exc.TypeError):
        return False
    return True


class AccountKey:
    """An Ed25519 key pair with its ledger address."""

    __slots__ = ("_private", "public_key", "address")

    _private: Ed25519PrivateKey
    public_key: bytes
    address: bytes

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = private.public_key().public_bytes_raw()
        self.address = address_of(self.public_key)

    @classmethod
    def generate(cls) -> AccountKey:
        """A new key from the operating system's CSPRNG."""
        return cls.from_seed(os.urandom(ED25519_SEED_SIZE))

    @classmethod
    def from_seed(cls, seed: bytes) -> AccountKey:
        """The key whose RFC 8032 private key (the 32-byte seed) is ``seed``."""
        if not isinstance(seed, bytes) or len(seed) != ED25519_SEED_SIZE:
            got = f"{len(seed)} bytes" if isinstance(seed, bytes) else type(seed).__name__
            raise KeyMaterialError(f"an Ed25519 seed is {ED25519_SEED_SIZE} bytes, got {got}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> AccountKey:
        """Load a 32-byte seed, or the 64-byte ``seed || public key`` form of NaCl and libp2p.

        The 64-byte form is accepted only if its public half matches the
        seed, so a corrupted export is caught instead of yielding a key whose
        address differs from the one its owner wrote down.
        """
        if isinstance(data, bytes) and len(data) == 2 * ED25519_SEED_SIZE:
            key = cls.from_seed(data[:ED25519_SEED_SIZE])
            if not hmac.compare_digest(key.public_key, data[ED25519_SEED_SIZE:]):
                raise KeyMaterialError("64-byte Ed25519 private key: the public half does not match the seed")
            return key
        if isinstance(data, bytes) and len(data) == ED25519_SEED_SIZE:
            return cls.from_seed(data)
        got = f"{len(data)} bytes" if isinstance(data, bytes) else type(data).__name__
        raise KeyMaterialError(f"an Ed25519 private key is 32 bytes (seed) or 64 bytes (seed || public key), got {got}")

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed (what a keystore stores)."""
        return self._private.private_bytes_raw()

    def sign(self, msg: bytes) -> bytes:
        """A 64-byte Ed25519 signature; callers pass :func:`ledger.signing.signing_bytes` output."""
        if not isinstance(msg, bytes):
            raise TypeError(f"message must be bytes, got {type(msg).__name__}")
        return self._private.sign(msg)

    def verify(self, msg: bytes, sig: bytes) -> bool:
        return verify_ed25519(self.public_key, msg, sig)

    def libp2p_key_pair(self) -> KeyPair:
        """The same key as a py-libp2p identity, so the node's peer id is derived from its account key.

        libp2p is imported here, not at module level: the ledger must stay
        importable (and fast to import) without the networking stack.
        """
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.seed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccountKey):
            return NotImplemented
        return self.public_key == other.public_key

    def __hash__(self) -> int:
        return hash(self.public_key)

    def __repr__(self) -> str:
        return f"AccountKey(address={self.address.hex()})"


@dataclass(frozen=True, slots=True, repr=False)
class ValidatorKey:
    """A BLS secret key with its public key, bound to the backend that signs with it.

    BLS signing is deterministic and both backends produce identical bytes,
    so the backend only decides speed, never what is signed.
    """

    secret: bytes
    public_key: bytes
    backend: bls.BLSBackend = field(compare=False)

    @classmethod
    def generate(cls, backend: bls.BLSBackend | None = None) -> ValidatorKey:
        return cls.from_ikm(os.urandom(32), backend)

    @classmethod
    def from_ikm(cls, ikm: bytes, backend: bls.BLSBackend | None = None) -> ValidatorKey:
        """Derive the key from >= 32 bytes of keying material (IETF KeyGen)."""
        return cls.from_secret(bls.keygen(ikm), backend)

    @classmethod
    def from_secret(cls, secret: bytes, backend: bls.BLSBackend | None = None) -> ValidatorKey:
        """Load a 32-byte BLS secret key; raises :class:`ledger.bls.BLSKeyError` if it is not one."""
        chosen = backend if backend is not None else bls.get_backend()
        return cls(secret=secret, public_key=chosen.sk_to_pk(secret), backend=chosen)

    def __post_init__(self) -> None:
        if not hmac.compare_digest(self.backend.sk_to_pk(self.secret), self.public_key):
            raise KeyMaterialError("BLS public key does not belong to the secret key")

    def sign(self, msg: bytes) -> bytes:
        return self.backend.sign(self.secret, msg)

    def proof_of_possession(self) -> bytes:
        """The PopProve proof a RegisterValidator transaction carries (rogue-key defence)."""
        return self.backend.pop_prove(self.secret)

    def __repr__(self) -> str:
        return f"ValidatorKey(public_key={self.public_key.hex()}, backend={self.backend.name})"
