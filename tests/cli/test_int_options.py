"""Integer options of the user-facing CLIs take ASCII digits in the wire field's range, and say the range.

argparse's ``type=int`` took full-width digits (``"１２"`` as 12), ``"1_000"``, spaces and ``+``, and a
``--bid-window`` past 2**32 reached the codec, whose message was about a U32 field.
"""

from __future__ import annotations

import argparse

import pytest

from p2pgpu.cli import build_parser
from p2pgpu.intparse import U32_MAX, U64_MAX, IntOutOfRange, cli_int, describe_range, parse_int

NOT_ASCII_INTEGERS = ["１２", "1_000", " 12", "12 ", "+12", "0x10", "1e3", "", "١٢", "12.0"]


@pytest.mark.parametrize("text", NOT_ASCII_INTEGERS)
def test_only_ascii_digits_are_an_integer(text: str) -> None:
    int(text) if text not in ("", "0x10", "1e3", "12.0") else None  # what int() took (where it did)
    with pytest.raises(IntOutOfRange, match=r"is not an integer in \[0, 2\*\*64-1\] \(ASCII digits only\)"):
        parse_int(text, 0, U64_MAX, "height")


def test_the_range_is_stated_and_enforced_at_both_ends() -> None:
    assert parse_int("0", 0, 10) == 0 and parse_int("10", 0, 10) == 10 and parse_int("007", 0, 10) == 7
    assert parse_int("-3", -5, 5) == -3
    with pytest.raises(IntOutOfRange, match=r"^bid window '4294967296' is not an integer in \[1, 2\*\*32-1\]$"):
        parse_int(str(2**32), 1, U32_MAX, "bid window")
    with pytest.raises(IntOutOfRange, match=r"'0' is not an integer in \[1, 10\]"):
        parse_int("0", 1, 10)
    with pytest.raises(IntOutOfRange, match=r"'-1' is not an integer in \[0, 10\]"):
        parse_int("-1", 0, 10)
    with pytest.raises(IntOutOfRange):  # bounded before int(): no 4300-digit conversion error, no big work
        parse_int("9" * 100_000, 0, U64_MAX)
    assert describe_range(0, 2**63 - 1) == "[0, 2**63-1]"


def test_the_cli_type_reports_through_argparse() -> None:
    parse = cli_int(1, 10)
    assert parse("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'11' is not an integer in \[1, 10\]$"):
        parse("11")


# Every integer option that carries a protocol value: (argv before the option, option, range text).
OPTIONS = [
    (["submit", "--model", "m", "--out", "o"], "--max-price", "[1, 2**64-1]"),
    (["submit", "--model", "m", "--out", "o"], "--units", "[1, 2**32-1]"),
    (["submit", "--model", "m", "--out", "o"], "--bid-window", "[1, 2**32-1]"),
    (["task", "dispute", "ab", "--reason", "r"], "--item", "[0, 2**64-1]"),
    (["model", "push", "f.npz", "--name", "m"], "--royalty", "[0, 2**64-1]"),
    (["api", "token", "new", "--name", "a", "--scopes", "submit"], "--spend-per-hour", "[0, 2**63-1]"),
    (["devnet", "load", "--tasks", "1"], "--max-price", "[1, 2**64-1]"),
    (["devnet", "load", "--tasks", "1"], "--bid-window", "[1, 2**32-1]"),
]


@pytest.mark.parametrize(("argv", "option", "allowed"), OPTIONS, ids=[f"{a[0]}{o}" for a, o, _ in OPTIONS])
def test_every_protocol_integer_option_refuses_what_is_not_an_ascii_integer_in_range(
        argv: list[str], option: str, allowed: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert getattr(parser.parse_args([*argv, option, "12"]), option.lstrip("-").replace("-", "_")) == 12
    too_big = str(2**64) if "64" in allowed else str(2**63) if "63" in allowed else str(2**32)
    for bad in ("１２", "1_000", too_big):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*argv, option, bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exited.value.code == 2 and f"argument {option}: {bad!r} is not an integer in {allowed}" in err, err


def test_a_stream_with_no_items_is_refused_before_anything_is_sent(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """--units is checked by argparse; the units a stream's items imply are not, and zero of them is no task."""
    import numpy as np

    from p2pgpu.cli import main

    items = tmp_path / "items.npy"
    np.save(items, np.zeros((0, 4), np.float32))
    code = main(["submit", "--api", "http://127.0.0.1:9", "--model", "m", "--stream", str(items),
                 "--max-price", "5", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and "--stream holds no items" in err.strip().splitlines()[-1]
