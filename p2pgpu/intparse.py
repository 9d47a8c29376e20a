"""Integers typed by people: ASCII digits only, in a stated range, with the range in the error.

Python's ``int()`` (and so argparse's ``type=int``) takes more than digits:
full-width and other Unicode digits (``"１２"`` is 12), underscores
(``"1_000"``), surrounding whitespace and a ``+`` sign. A protocol value typed
that way is almost always a mistake, and a value past the wire field's width
(``--bid-window 4294967296``) used to surface as the codec's message about a
U32. :func:`parse_int` takes ASCII digits (and a ``-`` where the range allows
negatives) and says the allowed range when it refuses; the API's path and
query parsers and the CLIs' integer options share it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

__all__ = ["IntOutOfRange", "U32_MAX", "U64_MAX", "cli_int", "describe_range", "parse_int"]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

_DIGITS = re.compile(r"-?[0-9]+")


class IntOutOfRange(ValueError):
    """Not an ASCII integer in the allowed range; the message says which range."""


def describe_range(lo: int, hi: int) -> str:
    """``[1, 4294967295]`` -- the range as a user reads it (powers of two spelled out for big bounds)."""
    def show(n: int) -> str:
        for bits in (32, 63, 64):
            if n == 2**bits - 1:
                return f"2**{bits}-1"
        return str(n)

    return f"[{show(lo)}, {show(hi)}]"


def parse_int(text: str, lo: int, hi: int, what: str = "value") -> int:
    """``text`` as an integer in ``[lo, hi]``: ASCII digits only (a leading ``-`` only if ``lo < 0``)."""
    allowed = describe_range(lo, hi)
    if not isinstance(text, str) or not text.isascii() or not _DIGITS.fullmatch(text) \
            or (text.startswith("-") and lo >= 0):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise IntOutOfRange(f"{what} {shown!r} is not an integer in {allowed} (ASCII digits only)")
    # The length bound keeps int() off megabyte strings (and under Python's 4300-digit conversion limit);
    # leading zeros within it are fine.
    if len(text) > max(len(str(lo)), len(str(hi))) + 32 or not lo <= int(text) <= hi:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise IntOutOfRange(f"{what} {shown!r} is not an integer in {allowed}")
    return int(text)


def cli_int(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type=`` for an integer option in ``[lo, hi]`` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            return parse_int(text, lo, hi, "")
        except IntOutOfRange as exc:
            raise argparse.ArgumentTypeError(str(exc).lstrip()) from None

    parse.__name__ = "integer"  # argparse says "invalid integer value" if the type raises a plain ValueError
    return parse
