"""BLS checks for consensus, with remembered verdicts.

An engine sees each vote many times (gossip copies, rebroadcasts, the same
precommits inside a certificate) and a simulator runs many engines that see
the same votes: each distinct (public key, message, signature) is checked
once, and the votes on one message are checked with one batch check.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ledger import exceptions as ex
from ledger.bls import BLSBackend, get_backend
from ledger.codec import encode
from ledger.committee import verify_certificate
from ledger.state import Committee
from ledger.votes import CommitCertificate

__all__ = ["MAX_REMEMBERED_CERTIFICATES", "SignatureVerifier"]


MAX_REMEMBERED_CERTIFICATES = 4096
"""Certificate verdicts a :class:`SignatureVerifier` keeps (least recently used go first)."""


class SignatureVerifier:
    """BLS checks with a bounded LRU of verdicts per (public key, message, signature).

    ``verify_same_message`` is the hot path: one batch check for the votes on
    one message, individual checks only if it fails. A vote is cached as
    valid only on a verdict that speaks for its own signature: a single
    check, or a random-linear-combination batch (never a plain aggregate,
    which two invalid signatures summing to a valid one would pass).
    """

    def __init__(self, backend: BLSBackend | None = None, cache_size: int = 200_000) -> None:
        self.backend: BLSBackend = backend if backend is not None else get_backend()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[bytes, bytes, bytes], bool] = OrderedDict()
        self._certs: OrderedDict[bytes, bool] = OrderedDict()
        # committee hashes by object identity (the object is kept, so its id cannot be reused): hashing
        # a committee encodes every member, and each engine asks for the same few committees
        self._committee_hashes: OrderedDict[int, tuple[Committee, bytes]] = OrderedDict()
        self.single_checks = 0
        self.aggregate_checks = 0
        self.aggregate_failures = 0
        self.cache_hits = 0

    def _get(self, key: tuple[bytes, bytes, bytes]) -> bool | None:
        verdict = self._cache.get(key)
        if verdict is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
        return verdict

    def _put(self, key: tuple[bytes, bytes, bytes], verdict: bool) -> None:
        self._cache[key] = verdict
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def aggregate(self, sigs: Sequence[bytes]) -> bytes:
        """Aggregate signatures (for a certificate); raises :class:`ledger.bls.BLSInputError` on a malformed one.

        The blspy backend keeps decompressed signatures in a bounded cache, so
        a vote decoded for its batch check is not decoded again here.
        """
        return self.backend.aggregate(sigs)

    def verify(self, pk: bytes, msg: bytes, sig: bytes) -> bool:
        key = (pk, msg, sig)
        verdict = self._get(key)
        if verdict is None:
            self.single_checks += 1
            verdict = bool(self.backend.verify(pk, msg, sig))
            self._put(key, verdict)
        return verdict

    def verify_same_message(self, msg: bytes, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Verdicts for (pk, sig) pairs all signing ``msg``: one batch check, singles if it fails.

        The batch check is :meth:`ledger.bls.BLSBackend.batch_verify`, which
        weights each signature by a secret random 64-bit scalar: it passes
        only if every signature is valid on its own (except with probability
        2^-64), so a pass may be cached per vote. A plain FastAggregateVerify
        of the summed signatures could not be: ``S_A + P`` and ``S_B - P``
        sum to a valid aggregate while neither is a signature.
        """
        out: list[bool | None] = [self._get((pk, msg, sig)) for pk, sig in items]
        todo = [i for i, v in enumerate(out) if v is None]
        if len(todo) >= 2:
            self.aggregate_checks += 1
            ok = bool(self.backend.batch_verify(
                [items[i][0] for i in todo], msg, [items[i][1] for i in todo]))
            if ok:
                for i in todo:
                    out[i] = True
                    self._put((items[i][0], msg, items[i][1]), True)
                todo = []
            else:
                self.aggregate_failures += 1
        for i in todo:
            out[i] = self.verify(items[i][0], msg, items[i][1])
        return [bool(v) for v in out]

    def _committee_hash(self, committee: Committee) -> bytes:
        hit = self._committee_hashes.get(id(committee))
        if hit is not None and hit[0] is committee:
            return hit[1]
        digest = committee.committee_hash()
        self._committee_hashes[id(committee)] = (committee, digest)
        while len(self._committee_hashes) > 64:
            self._committee_hashes.popitem(last=False)
        return digest

    def _certificate_key(self, committee: Committee, chain_id: bytes, cert: CommitCertificate, height: int,
                         block_hash: bytes) -> bytes:
        return self._committee_hash(committee) + chain_id + encode(cert) + height.to_bytes(8, "big") + block_hash

    def note_valid_certificate(
        self, committee: Committee, chain_id: bytes, cert: CommitCertificate, *, height: int, block_hash: bytes
    ) -> None:
        """Remember a certificate the caller aggregated itself from signatures this verifier accepted."""
        self._remember_certificate(self._certificate_key(committee, chain_id, cert, height, block_hash), True)

    def _remember_certificate(self, key: bytes, valid: bool) -> None:
        self._certs[key] = valid
        self._certs.move_to_end(key)
        while len(self._certs) > MAX_REMEMBERED_CERTIFICATES:
            self._certs.popitem(last=False)

    def verify_certificate(
        self, committee: Committee, chain_id: bytes, cert: CommitCertificate, *, height: int, block_hash: bytes
    ) -> None:
        """:func:`ledger.committee.verify_certificate`, remembered (raises InvalidCertificate)."""
        key = self._certificate_key(committee, chain_id, cert, height, block_hash)
        if key in self._certs:
            self._certs.move_to_end(key)
            self.cache_hits += 1
            if not self._certs[key]:
                raise ex.InvalidCertificate(f"height {cert.height}: certificate already found invalid")
            return
        try:
            self.aggregate_checks += 1
            verify_certificate(committee, chain_id, cert, height=height, block_hash=block_hash)
        except ex.InvalidCertificate:
            self._remember_certificate(key, False)
            raise
        self._remember_certificate(key, True)
