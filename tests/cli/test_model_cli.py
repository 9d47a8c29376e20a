"""``p2pgpu model inspect``: the id and summary of a good file, exit 2 naming the problem for a bad one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernels.bundle import load_model_file, model_id
from p2pgpu.cli import main
from tests.kernels.helpers import dense_model


def npz_model(tmp_path: Path) -> Path:
    inputs, _ = dense_model(4, [(3, "relu"), (2, "softmax")])
    np.savez(tmp_path / "m.npz", **inputs)
    return tmp_path / "m.npz"


def test_inspect_prints_id_signature_and_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = npz_model(tmp_path)
    assert main(["model", "inspect", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["id"] == model_id(load_model_file(path)).hex()
    assert facts["input"] == {"dtype": "float32", "shape": [4]}
    assert facts["output"] == {"dtype": "float32", "shape": [2]}
    assert facts["parameters"] == 23
    assert [layer["class"] for layer in facts["layers"]] == ["Dense", "Dense"]
    assert main(["model", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "float32 (4) per item" in text and "parameters  23" in text


def test_inspect_bad_file_exits_2_naming_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.keras").write_bytes(b"PK\x03\x04truncated")
    assert main(["model", "inspect", str(tmp_path / "x.keras")]) == 2
    assert "TruncatedArchive" in capsys.readouterr().err
    assert main(["model", "inspect", str(tmp_path / "missing.keras")]) == 2
    assert "No such file" in capsys.readouterr().err
