"""Forged BLS signatures for tests, built with each backend's own point arithmetic."""

from __future__ import annotations


def split_pair(backend_name: str, sig_a: bytes, sig_b: bytes, offset: bytes) -> tuple[bytes, bytes]:
    """``(sig_a + P, sig_b - P)``, ``P`` being the G2 point ``offset`` encodes.

    Neither half is a signature, but the two sum to ``sig_a + sig_b``: a plain
    aggregate of them verifies exactly when the honest pair's does. ``P`` must
    be in the prime-order subgroup (any real signature is), so each half is
    too and passes every decoding check.
    """
    if backend_name == "blspy":
        from blspy import G2Element

        p = G2Element.from_bytes(offset)
        return bytes(G2Element.from_bytes(sig_a) + p), bytes(G2Element.from_bytes(sig_b) + p.negate())
    if backend_name == "py_ecc":
        from py_ecc.bls.g2_primitives import G2_to_signature, signature_to_G2
        from py_ecc.optimized_bls12_381 import add, neg

        p = signature_to_G2(offset)
        return (
            bytes(G2_to_signature(add(signature_to_G2(sig_a), p))),
            bytes(G2_to_signature(add(signature_to_G2(sig_b), neg(p)))),
        )
    raise ValueError(f"no point arithmetic for backend {backend_name!r}")
