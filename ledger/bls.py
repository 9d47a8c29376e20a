"""BLS12-381 signatures for validators, behind one small interface.

Ciphersuite ``BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_`` (IETF
draft-irtf-cfrg-bls-signature, proof-of-possession scheme): secret keys are
32-byte big-endian scalars, public keys 48-byte compressed G1 points,
signatures 96-byte compressed G2 points. Commit certificates aggregate the
committee's precommit signatures over one message, so FastAggregateVerify is
the hot path; the PoP scheme makes that safe against rogue keys as long as
every registered key came with a valid proof of possession.

Two interchangeable backends produce byte-identical keys and signatures:

* ``blspy`` (Chia's native ``PopSchemeMPL``): ~600x faster, the default;
* ``py_ecc`` (``G2ProofOfPossession``, pure Python): the reference, used to
  cross-check the native one in tests and as a fallback where blspy is absent.

Everything takes and returns ``bytes``. The rules at the boundary are the same
for both backends, so a node's verdict never depends on which one it runs:

* verify-type functions (``verify``, ``fast_aggregate_verify``,
  ``aggregate_verify``, ``batch_verify``, ``pop_verify``, ``key_validate``)
  return ``False`` for any malformed input -- wrong type or length, not a
  curve point, not in the prime-order subgroup, the identity as a public key,
  empty key lists -- and never raise: their inputs come from peers;
* functions that take a secret key raise :class:`BLSKeyError` for a key that
  is not a 32-byte scalar in ``[1, r)``;
* ``aggregate``/``aggregate_pubkeys`` raise :class:`BLSInputError` for a
  malformed or out-of-subgroup element (both backends check the subgroup).

Key generation is done here, once, with the IETF KeyGen of draft 04 and later
(identical to EIP-2333's ``HKDF_mod_r``), and the scalar is imported into
either backend: blspy's ``key_gen`` implements the older draft-01 KeyGen
(unhashed salt, no length in ``info``) and derives a *different* key from the
same seed, which would make a validator's identity depend on the backend.

Batch verification (``batch_verify``) checks many signatures on one message
by a random linear combination, not by their plain aggregate: a plain
aggregate only proves the *sum* of the signatures is right, so ``S_A + P`` and
``S_B - P`` (each invalid) pass together. Each signature is weighted by a
fresh secret 64-bit scalar ``r_i`` from the OS CSPRNG and the check is
``e(sum r_i*pk_i, H(m)) == e(g1, sum r_i*S_i)`` (``r_0 = 1``): if any
``S_i`` with ``i > 0`` is wrong, at most one value of its ``r_i`` (given the
others) makes that hold, and if only ``S_0`` is, nothing does, so the batch
passes with probability at most 2^-64 whatever the sender chose.
blspy exposes point addition but no scalar multiplication, so the weighted
sums are computed here by double-and-add with the doublings shared by all
points (natively ~0.12 ms per extra signature on a ~1.4 ms base, against
~1.15 ms per single verify).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import operator
import os
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

if TYPE_CHECKING:
    from eth_typing import BLSPubkey, BLSSignature  # py_ecc's argument types; py_ecc is an optional backend

__all__ = [
    "BACKEND_ENV",
    "BACKEND_NAMES",
    "BATCH_SCALAR_BITS",
    "CIPHERSUITE",
    "CURVE_ORDER",
    "PUBLIC_KEY_SIZE",
    "SECRET_KEY_SIZE",
    "SIGNATURE_SIZE",
    "BLSBackend",
    "BLSBackendError",
    "BLSError",
    "BLSInputError",
    "BLSKeyError",
    "BlspyBackend",
    "PyEccBackend",
    "available_backends",
    "get_backend",
    "keygen",
]

CIPHERSUITE = b"BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_"
SECRET_KEY_SIZE = 32
PUBLIC_KEY_SIZE = 48
SIGNATURE_SIZE = 96
MIN_IKM_SIZE = 32
CURVE_ORDER = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001

BACKEND_ENV = "P2PGPU_BLS_BACKEND"
BACKEND_NAMES = ("blspy", "py_ecc")
"""Valid backend names, fastest first (the order :func:`get_backend` tries)."""

# Parsed-and-validated public keys, keyed by their bytes. Committee keys recur
# in every certificate of an epoch, and blspy's checked decompression costs
# ~0.13 ms per key (8 ms for 64 keys, more than the pairing itself).
_PUBKEY_CACHE_SIZE = 4096
# Decompressed, subgroup-checked signatures (blspy: ~0.09 ms each). A vote's
# signature is decoded for its batch check and again for the certificate
# that aggregates it; this holds a few heights of a 64-member committee.
_SIGNATURE_CACHE_SIZE = 16384

BATCH_SCALAR_BITS = 64
"""Bits of each random weight in :meth:`BLSBackend.batch_verify`: a forged batch passes with probability <= 2^-64."""


class BLSError(ValueError):
    """Base class of every error raised by this module."""


class BLSKeyError(BLSError):
    """A secret key or key-generation seed that cannot be used."""


class BLSInputError(BLSError):
    """A malformed public key or signature handed to an aggregation function."""


class BLSBackendError(BLSError):
    """An unknown or unavailable backend name."""


@runtime_checkable
class BLSBackend(Protocol):
    """The BLS operations the ledger needs; see the module docstring for the rules."""

    @property
    def name(self) -> str:
        """The backend's name, as ``$P2PGPU_BLS_BACKEND`` spells it."""
        ...

    def keygen(self, ikm: bytes, key_info: bytes = b"") -> bytes: ...

    def sk_to_pk(self, sk: bytes) -> bytes: ...

    def sign(self, sk: bytes, msg: bytes) -> bytes: ...

    def verify(self, pk: bytes, msg: bytes, sig: bytes) -> bool: ...

    def aggregate(self, sigs: Sequence[bytes]) -> bytes: ...

    def aggregate_pubkeys(self, pks: Sequence[bytes]) -> bytes: ...

    def fast_aggregate_verify(self, pks: Sequence[bytes], msg: bytes, sig: bytes) -> bool: ...

    def aggregate_verify(self, pks: Sequence[bytes], msgs: Sequence[bytes], sig: bytes) -> bool: ...

    def batch_verify(self, pks: Sequence[bytes], msg: bytes, sigs: Sequence[bytes]) -> bool: ...

    def pop_prove(self, sk: bytes) -> bytes: ...

    def pop_verify(self, pk: bytes, proof: bytes) -> bool: ...

    def key_validate(self, pk: bytes) -> bool: ...


# --------------------------------------------------------------------------
# Backend-independent pieces


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def keygen(ikm: bytes, key_info: bytes = b"") -> bytes:
    """Derive a secret key from at least 32 bytes of input keying material.

    IETF KeyGen (draft 04+): the salt is re-hashed until the scalar is
    non-zero, ``L = 48`` bytes of HKDF output are reduced mod r. The result
    equals py_ecc's ``KeyGen`` and EIP-2333's ``derive_master_SK``.
    """
    if not isinstance(ikm, bytes) or len(ikm) < MIN_IKM_SIZE:
        got = f"{len(ikm)} bytes" if isinstance(ikm, bytes) else type(ikm).__name__
        raise BLSKeyError(f"keygen: input keying material must be at least {MIN_IKM_SIZE} bytes, got {got}")
    if not isinstance(key_info, bytes):
        raise BLSKeyError(f"keygen: key_info must be bytes, got {type(key_info).__name__}")
    length = 48  # ceil(3 * ceil(log2(r)) / 16)
    salt = b"BLS-SIG-KEYGEN-SALT-"
    scalar = 0
    while scalar == 0:
        salt = hashlib.sha256(salt).digest()
        prk = _hkdf_extract(salt, ikm + b"\x00")
        okm = _hkdf_expand(prk, key_info + length.to_bytes(2, "big"), length)
        scalar = int.from_bytes(okm, "big") % CURVE_ORDER
    return scalar.to_bytes(SECRET_KEY_SIZE, "big")


def _secret_scalar(sk: object) -> int:
    """The scalar of a 32-byte big-endian secret key, or BLSKeyError."""
    if not isinstance(sk, bytes):
        raise BLSKeyError(f"secret key must be bytes, got {type(sk).__name__}")
    if len(sk) != SECRET_KEY_SIZE:
        raise BLSKeyError(f"secret key must be {SECRET_KEY_SIZE} bytes, got {len(sk)}")
    scalar = int.from_bytes(sk, "big")
    if not 0 < scalar < CURVE_ORDER:
        raise BLSKeyError("secret key is not a scalar in [1, r) of BLS12-381")
    return scalar


def _is_bytes(value: object, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _is_byte_list(values: object, size: int) -> bool:
    return (
        isinstance(values, Sequence)
        and not isinstance(values, (bytes, str))
        and len(values) > 0
        and all(_is_bytes(v, size) for v in values)
    )


def _is_message_list(values: object) -> bool:
    return (
        isinstance(values, Sequence)
        and not isinstance(values, (bytes, str))
        and all(isinstance(v, bytes) for v in values)
    )


def _is_batch(pks: object, msg: object, sigs: object) -> bool:
    """Well-formed ``batch_verify`` arguments: equal-length, non-empty lists of keys and signatures."""
    return (
        _is_byte_list(pks, PUBLIC_KEY_SIZE)
        and _is_byte_list(sigs, SIGNATURE_SIZE)
        and len(pks) == len(sigs)  # type: ignore[arg-type]
        and isinstance(msg, bytes)
    )


def _batch_scalars(count: int) -> list[int]:
    """Weights for a batch of ``count``: 1, then independent uniform ones in ``[1, 2^BATCH_SCALAR_BITS)``.

    The random ones come from the OS CSPRNG, fresh per call and never
    revealed, so a sender cannot choose signatures whose errors cancel under
    them; zero is excluded because it would drop a signature from the check.
    The first weight can be 1 (one scalar multiplication saved): if only the
    first signature is wrong the check fails outright, and if any other one
    is wrong its own random weight is what must miss.
    """
    bound = (1 << BATCH_SCALAR_BITS) - 1
    return [1] + [1 + secrets.randbelow(bound) for _ in range(count - 1)]


_Point = TypeVar("_Point")


def _weighted_sum(points: Sequence[_Point], scalars: Sequence[int], zero: _Point,
                  add: Callable[[_Point, _Point], _Point]) -> _Point:
    """``sum(scalars[i] * points[i])`` by interleaved double-and-add, from point addition alone.

    The doublings are shared by all points (one per scalar bit), so n points
    with b-bit scalars cost b doublings plus ~n*b/2 additions, not n*b of each.
    """
    total = zero
    for bit in reversed(range(max((s.bit_length() for s in scalars), default=0))):
        total = add(total, total)
        for point, scalar in zip(points, scalars):
            if scalar >> bit & 1:
                total = add(total, point)
    return total


def _check_sig_list(sigs: object) -> Sequence[bytes]:
    if not isinstance(sigs, Sequence) or isinstance(sigs, (bytes, str)):
        raise BLSInputError(f"aggregate: expected a sequence of signatures, got {type(sigs).__name__}")
    if len(sigs) == 0:
        raise BLSInputError("aggregate: no signatures to aggregate")
    for i, sig in enumerate(sigs):
        if not _is_bytes(sig, SIGNATURE_SIZE):
            raise BLSInputError(f"aggregate: signature {i} is not {SIGNATURE_SIZE} bytes")
    return sigs


def _check_pk_list(pks: object) -> Sequence[bytes]:
    if not isinstance(pks, Sequence) or isinstance(pks, (bytes, str)):
        raise BLSInputError(f"aggregate_pubkeys: expected a sequence of public keys, got {type(pks).__name__}")
    if len(pks) == 0:
        raise BLSInputError("aggregate_pubkeys: no public keys to aggregate")
    for i, pk in enumerate(pks):
        if not _is_bytes(pk, PUBLIC_KEY_SIZE):
            raise BLSInputError(f"aggregate_pubkeys: public key {i} is not {PUBLIC_KEY_SIZE} bytes")
    return pks


# --------------------------------------------------------------------------
# blspy (native)


@functools.lru_cache(maxsize=_PUBKEY_CACHE_SIZE)
def _blspy_pubkey(pk: bytes) -> Any:
    """A validated blspy G1Element for ``pk`` (KeyValidate), or None.

    Pure in its argument, so a bounded cache is safe; invalid keys are cached
    as None too, which bounds the cost of a peer replaying the same junk.
    """
    from blspy import G1Element

    try:
        point = G1Element.from_bytes(pk)  # checks encoding, curve and subgroup
    except (ValueError, RuntimeError):
        return None
    if point == G1Element():
        return None
    return point


@functools.lru_cache(maxsize=_SIGNATURE_CACHE_SIZE)
def _blspy_signature(sig: bytes) -> Any:
    """A subgroup-checked blspy G2Element for ``sig``, or None; pure in its argument, like :func:`_blspy_pubkey`."""
    from blspy import G2Element

    try:
        return G2Element.from_bytes(sig)  # checks encoding, curve and subgroup
    except (ValueError, RuntimeError):
        return None


class BlspyBackend:
    """Chia's ``blspy.PopSchemeMPL`` (C++ over blst/relic), the fast backend."""

    name: ClassVar[str] = "blspy"

    def __init__(self) -> None:
        import blspy

        self._scheme = blspy.PopSchemeMPL
        self._G1 = blspy.G1Element
        self._G2 = blspy.G2Element
        self._PrivateKey = blspy.PrivateKey

    def __repr__(self) -> str:
        return "BlspyBackend()"

    def _secret(self, sk: bytes) -> Any:
        _secret_scalar(sk)
        try:
            return self._PrivateKey.from_bytes(sk)
        except (ValueError, RuntimeError) as exc:  # pragma: no cover - range already checked
            raise BLSKeyError(f"secret key rejected by blspy: {exc}") from exc

    @staticmethod
    def _signature(sig: object) -> Any:
        """A subgroup-checked G2Element, or None."""
        if not _is_bytes(sig, SIGNATURE_SIZE):
            return None
        return _blspy_signature(sig)

    @staticmethod
    def _pubkey(pk: object) -> Any:
        if not _is_bytes(pk, PUBLIC_KEY_SIZE):
            return None
        return _blspy_pubkey(pk)

    def keygen(self, ikm: bytes, key_info: bytes = b"") -> bytes:
        return keygen(ikm, key_info)

    def sk_to_pk(self, sk: bytes) -> bytes:
        return bytes(self._secret(sk).get_g1())

    def sign(self, sk: bytes, msg: bytes) -> bytes:
        if not isinstance(msg, bytes):
            raise TypeError(f"message must be bytes, got {type(msg).__name__}")
        return bytes(self._scheme.sign(self._secret(sk), msg))

    def verify(self, pk: bytes, msg: bytes, sig: bytes) -> bool:
        point = self._pubkey(pk)
        signature = self._signature(sig)
        if point is None or signature is None or not isinstance(msg, bytes):
            return False
        return bool(self._scheme.verify(point, msg, signature))

    def aggregate(self, sigs: Sequence[bytes]) -> bytes:
        points = []
        for i, sig in enumerate(_check_sig_list(sigs)):
            point = self._signature(sig)
            if point is None:
                raise BLSInputError(f"aggregate: signature {i} is not a G2 point in the prime-order subgroup")
            points.append(point)
        return bytes(self._scheme.aggregate(points))

    def aggregate_pubkeys(self, pks: Sequence[bytes]) -> bytes:
        total = self._G1()
        for i, pk in enumerate(_check_pk_list(pks)):
            point = _blspy_pubkey(pk)
            if point is None:
                raise BLSInputError(f"aggregate_pubkeys: public key {i} is not a valid BLS public key")
            total = total + point
        return bytes(total)

    def fast_aggregate_verify(self, pks: Sequence[bytes], msg: bytes, sig: bytes) -> bool:
        if not _is_byte_list(pks, PUBLIC_KEY_SIZE) or not isinstance(msg, bytes):
            return False
        points = [_blspy_pubkey(pk) for pk in pks]
        signature = self._signature(sig)
        if signature is None or any(p is None for p in points):
            return False
        return bool(self._scheme.fast_aggregate_verify(points, msg, signature))

    def aggregate_verify(self, pks: Sequence[bytes], msgs: Sequence[bytes], sig: bytes) -> bool:
        if not _is_byte_list(pks, PUBLIC_KEY_SIZE) or not _is_message_list(msgs) or len(msgs) != len(pks):
            return False
        points = [_blspy_pubkey(pk) for pk in pks]
        signature = self._signature(sig)
        if signature is None or any(p is None for p in points):
            return False
        return bool(self._scheme.aggregate_verify(points, list(msgs), signature))

    def batch_verify(self, pks: Sequence[bytes], msg: bytes, sigs: Sequence[bytes]) -> bool:
        """Whether every ``sigs[i]`` is ``pks[i]``'s signature on ``msg``, by a random linear combination.

        Unlike FastAggregateVerify of the summed signatures, this cannot be
        fooled by invalid signatures whose errors cancel (see the module
        docstring); a True verdict speaks for each signature on its own.
        """
        if not _is_batch(pks, msg, sigs):
            return False
        points = [_blspy_pubkey(pk) for pk in pks]
        signatures = [self._signature(sig) for sig in sigs]
        if any(p is None for p in points) or any(s is None for s in signatures):
            return False
        if len(points) == 1:
            return bool(self._scheme.verify(points[0], msg, signatures[0]))
        scalars = _batch_scalars(len(points))
        weighted_pk = _weighted_sum(points, scalars, self._G1(), operator.add)
        weighted_sig = _weighted_sum(signatures, scalars, self._G2(), operator.add)
        return bool(self._scheme.verify(weighted_pk, msg, weighted_sig))

    def pop_prove(self, sk: bytes) -> bytes:
        return bytes(self._scheme.pop_prove(self._secret(sk)))

    def pop_verify(self, pk: bytes, proof: bytes) -> bool:
        point = self._pubkey(pk)
        signature = self._signature(proof)
        if point is None or signature is None:
            return False
        return bool(self._scheme.pop_verify(point, signature))

    def key_validate(self, pk: bytes) -> bool:
        return self._pubkey(pk) is not None


# --------------------------------------------------------------------------
# py_ecc (pure-Python reference)


class PyEccBackend:
    """``py_ecc.bls.G2ProofOfPossession``, the pure-Python reference backend.

    Slow (~0.3 s per sign, ~1 s per verify, ~2 s for a 64-key
    FastAggregateVerify), so it is for cross-checks and for machines without
    blspy, not for a busy validator.
    """

    name: ClassVar[str] = "py_ecc"

    def __init__(self) -> None:
        import sys

        # py_ecc raises the interpreter's recursion limit to 100,000 on import, which disarms
        # Python's guard against deeply nested input: json.loads on a hostile document then
        # overflows the C stack and kills the process. Its BLS code does not need the raise.
        limit = sys.getrecursionlimit()
        try:
            from eth_utils import ValidationError
            from py_ecc.bls import G2ProofOfPossession
            from py_ecc.bls import g2_primitives
        finally:
            sys.setrecursionlimit(limit)

        self._scheme = G2ProofOfPossession
        self._prims = g2_primitives
        self._errors: tuple[type[Exception], ...] = (ValidationError, ValueError, AssertionError)

    def __repr__(self) -> str:
        return "PyEccBackend()"

    def keygen(self, ikm: bytes, key_info: bytes = b"") -> bytes:
        return keygen(ikm, key_info)

    def sk_to_pk(self, sk: bytes) -> bytes:
        return bytes(self._scheme.SkToPk(_secret_scalar(sk)))

    def sign(self, sk: bytes, msg: bytes) -> bytes:
        scalar = _secret_scalar(sk)
        if not isinstance(msg, bytes):
            raise TypeError(f"message must be bytes, got {type(msg).__name__}")
        return bytes(self._scheme.Sign(scalar, msg))

    def verify(self, pk: bytes, msg: bytes, sig: bytes) -> bool:
        if not (_is_bytes(pk, PUBLIC_KEY_SIZE) and _is_bytes(sig, SIGNATURE_SIZE) and isinstance(msg, bytes)):
            return False
        return self._call_bool(self._scheme.Verify, pk, msg, sig)

    def aggregate(self, sigs: Sequence[bytes]) -> bytes:
        prims = self._prims
        for i, sig in enumerate(_check_sig_list(sigs)):
            # py_ecc's Aggregate only decompresses; check the subgroup too so
            # both backends refuse exactly the same inputs.
            try:
                valid = prims.subgroup_check(prims.signature_to_G2(sig))
            except self._errors:
                valid = False
            if not valid:
                raise BLSInputError(f"aggregate: signature {i} is not a G2 point in the prime-order subgroup")
        return bytes(self._scheme.Aggregate([cast("BLSSignature", s) for s in sigs]))

    def aggregate_pubkeys(self, pks: Sequence[bytes]) -> bytes:
        for i, pk in enumerate(_check_pk_list(pks)):
            if not self.key_validate(pk):
                raise BLSInputError(f"aggregate_pubkeys: public key {i} is not a valid BLS public key")
        from py_ecc.optimized_bls12_381 import Z1, add

        total = Z1
        for pk in pks:
            total = add(total, self._prims.pubkey_to_G1(cast("BLSPubkey", pk)))
        return bytes(self._prims.G1_to_pubkey(total))

    def fast_aggregate_verify(self, pks: Sequence[bytes], msg: bytes, sig: bytes) -> bool:
        if not (_is_byte_list(pks, PUBLIC_KEY_SIZE) and _is_bytes(sig, SIGNATURE_SIZE) and isinstance(msg, bytes)):
            return False
        return self._call_bool(self._scheme.FastAggregateVerify, list(pks), msg, sig)

    def aggregate_verify(self, pks: Sequence[bytes], msgs: Sequence[bytes], sig: bytes) -> bool:
        if not (_is_byte_list(pks, PUBLIC_KEY_SIZE) and _is_message_list(msgs) and _is_bytes(sig, SIGNATURE_SIZE)):
            return False
        if len(msgs) != len(pks):
            return False
        return self._call_bool(self._scheme.AggregateVerify, list(pks), list(msgs), sig)

    def batch_verify(self, pks: Sequence[bytes], msg: bytes, sigs: Sequence[bytes]) -> bool:
        """Random-linear-combination batch check, as :meth:`BlspyBackend.batch_verify` (same verdicts)."""
        if not _is_batch(pks, msg, sigs):
            return False
        if not all(self.key_validate(pk) for pk in pks):
            return False
        prims = self._prims
        signatures = []
        for sig in sigs:
            try:
                point = prims.signature_to_G2(sig)
                valid = prims.subgroup_check(point)
            except self._errors:
                valid = False
            if not valid:
                return False
            signatures.append(point)
        if len(sigs) == 1:
            return self.verify(pks[0], msg, sigs[0])
        from py_ecc.optimized_bls12_381 import Z1, Z2, add

        scalars = _batch_scalars(len(sigs))
        weighted_pk = _weighted_sum([prims.pubkey_to_G1(pk) for pk in pks], scalars, Z1, add)
        weighted_sig = _weighted_sum(signatures, scalars, Z2, add)
        return self._call_bool(
            self._scheme.Verify, bytes(prims.G1_to_pubkey(weighted_pk)), msg, bytes(prims.G2_to_signature(weighted_sig))
        )

    def pop_prove(self, sk: bytes) -> bytes:
        return bytes(self._scheme.PopProve(_secret_scalar(sk)))

    def pop_verify(self, pk: bytes, proof: bytes) -> bool:
        if not (_is_bytes(pk, PUBLIC_KEY_SIZE) and _is_bytes(proof, SIGNATURE_SIZE)):
            return False
        return self._call_bool(self._scheme.PopVerify, pk, proof)

    def key_validate(self, pk: bytes) -> bool:
        if not _is_bytes(pk, PUBLIC_KEY_SIZE):
            return False
        return self._call_bool(self._scheme.KeyValidate, pk)

    def _call_bool(self, fn: Any, *args: Any) -> bool:
        # py_ecc already maps its own validation failures to False; this
        # catches the few decode paths that still raise.
        try:
            return bool(fn(*args))
        except self._errors:
            return False


# --------------------------------------------------------------------------
# Selection

_CONSTRUCTORS: dict[str, type[BlspyBackend] | type[PyEccBackend]] = {
    "blspy": BlspyBackend,
    "py_ecc": PyEccBackend,
}


@functools.cache
def _backend_named(name: str) -> BLSBackend:
    """Construct a backend once per process; construction is pure (imports only)."""
    constructor = _CONSTRUCTORS.get(name)
    if constructor is None:
        raise BLSBackendError(f"unknown BLS backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}")
    try:
        return constructor()
    except ImportError as exc:
        raise BLSBackendError(f"BLS backend {name!r} is not available: {exc}") from exc


def available_backends() -> tuple[str, ...]:
    """Names of the backends importable here, fastest first."""
    names = []
    for name in BACKEND_NAMES:
        try:
            _backend_named(name)
        except BLSBackendError:
            continue
        names.append(name)
    return tuple(names)


def get_backend(name: str | None = None) -> BLSBackend:
    """The backend called ``name``, else the one named by ``$P2PGPU_BLS_BACKEND``, else the fastest.

    A forced backend that is unknown or not importable raises
    :class:`BLSBackendError` rather than silently falling back, so an operator
    who asked for the reference backend never runs another one.
    """
    if name is None:
        name = os.environ.get(BACKEND_ENV, "").strip() or None
    if name is not None:
        return _backend_named(name)
    errors = []
    for candidate in BACKEND_NAMES:
        try:
            return _backend_named(candidate)
        except BLSBackendError as exc:
            errors.append(str(exc))
    raise BLSBackendError("no BLS backend is available: " + "; ".join(errors))
