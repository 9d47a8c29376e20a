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


# ------------------------------------------------------------------ push, ls, show (against a FakeNode's API)

from tests.api.fake_node import ALICE  # noqa: E402
from tests.cli.test_submit_cli import api, cli, one_line  # noqa: E402,F401 - the api fixture


async def test_push_waits_for_registration_and_prints_the_id(api, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    path = npz_model(tmp_path)
    code, out, err = await cli(capsys, "model", "push", str(path), "--name", "mnist", "--royalty", "3", "--api", url)
    assert code == 0, err
    mid = model_id(load_model_file(path)).hex()
    assert out.splitlines() == [f"registered mnist@1 at height {node.height}", f"id {mid}"]
    assert "waiting for its registration" in err
    (pushed,) = node.model_pushes
    assert (pushed.name, pushed.version, pushed.royalty_per_unit) == ("mnist", "1", 3)
    code, out, _ = await cli(capsys, "model", "ls", "--api", url)
    assert code == 0 and "mnist@1*" in out and mid[:16] in out
    code, out, _ = await cli(capsys, "model", "show", "mnist", "--api", url)
    assert code == 0 and f"id          {mid}" in out and "royalty     3 per unit" in out
    assert "warm at     no provider advertises it warm" in out
    code, out, _ = await cli(capsys, "model", "show", mid, "--json", "--api", url)
    assert code == 0 and json.loads(out)["name"] == "mnist" and json.loads(out)["warm_providers"] == []


async def test_show_lists_the_providers_that_advertise_the_model_warm(api, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from p2pgpu.api.types import WarmProviderView

    node, url = api
    path = npz_model(tmp_path)
    assert (await cli(capsys, "model", "push", str(path), "--name", "mnist", "--api", url))[0] == 0
    mid = model_id(load_model_file(path))
    node.warm[mid] = [WarmProviderView(b"\x07" * 20, "12D3KooWpeer", 2, 40, 3.5, 9, 120)]
    code, out, _ = await cli(capsys, "model", "show", "mnist", "--api", url)
    assert code == 0
    assert "warm at     1 provider(s), best first:" in out
    assert f"  {'07' * 8}        40 per unit    2 free slot(s)  advert 4 s old  peer 12D3KooWpeer" in out
    code, out, _ = await cli(capsys, "model", "show", "mnist", "--json", "--api", url)
    (warm,) = json.loads(out)["warm_providers"]
    assert warm["unit_price"] == 40 and warm["peer"] == "12D3KooWpeer"
    node.follows_market = False  # a validator-only node: the entry still shows, and why no providers do
    code, out, _ = await cli(capsys, "model", "show", "mnist", "--api", url)
    assert code == 0 and f"id          {mid.hex()}" in out
    assert "warm at     (not known here: this node does not follow the market's gossip (no_market))" in out


@pytest.mark.parametrize(("argv", "says"), [
    (["--name", "Bad Name"], "--name 'Bad Name'"),
    (["--name", "m", "--version", "v@1"], "--version 'v@1'"),
])
async def test_push_bad_arguments_exit_2_before_contacting_the_node(api, tmp_path: Path, argv: list[str], says: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    code, _, err = await cli(capsys, "model", "push", str(npz_model(tmp_path)), *argv, "--api", url)
    assert code == 2 and says in one_line(err)
    assert node.model_pushes == []


def test_push_refuses_a_royalty_that_is_not_an_ascii_integer_in_range(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("-1", "１２", "1_000", str(2**64)):  # argparse, before the file is read or the node contacted
        with pytest.raises(SystemExit) as exited:
            main(["model", "push", str(tmp_path / "absent.npz"), "--name", "m", "--royalty", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exited.value.code == 2 and f"argument --royalty: {bad!r} is not an integer in [0, 2**64-1]" in err


async def test_push_bad_file_exits_2_and_posts_nothing(api, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    (tmp_path / "x.keras").write_bytes(b"PK\x03\x04truncated")
    code, _, err = await cli(capsys, "model", "push", str(tmp_path / "x.keras"), "--name", "m", "--api", url)
    assert code == 2 and "TruncatedArchive" in one_line(err)
    assert node.model_pushes == []


async def test_push_refused_by_the_node_exits_2_with_its_words(api, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    node.balances[ALICE] = 0
    code, _, err = await cli(capsys, "model", "push", str(npz_model(tmp_path)), "--name", "m", "--api", url)
    assert code == 2 and "insufficient_funds" in one_line(err)
    node.balances[ALICE] = 1000
    node.models_registered[b"\x01" * 32] = taken_model_view()
    code, _, err = await cli(capsys, "model", "push", str(npz_model(tmp_path)), "--name", "taken", "--api", url)
    assert code == 2 and "name_taken" in one_line(err)
    assert node.model_pushes == []
    code, _, err = await cli(capsys, "model", "show", "nothing", "--api", url)
    assert code == 2 and "unknown_model" in one_line(err)


def taken_model_view():
    """A model another account registered as ``taken@1``."""
    from p2pgpu.api.types import ModelView, SignatureView

    sig = SignatureView("float32", (4,))
    return ModelView(b"\x01" * 32, b"\x02" * 20, "taken", "1", 0, sig, sig, 10, 1, True)


# ------------------------------------------------------------------ submit --model (a task by model)


async def test_submit_by_model_name_sends_the_model_id_and_only_x(api, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    path = npz_model(tmp_path)
    code, _, err = await cli(capsys, "model", "push", str(path), "--name", "mnist", "--api", url)
    assert code == 0, err
    np.save(tmp_path / "x.npy", np.ones((5, 4), np.float32))
    code, out, err = await cli(capsys, "submit", "--api", url, "--model", "mnist@1", "--input",
                               f"x={tmp_path / 'x.npy'}", "--max-price", "9", "--out", str(tmp_path / "out"),
                               "--poll-interval", "0")
    assert code == 0, err
    (req,) = node.submitted
    mid = model_id(load_model_file(path)).hex()
    assert req.spec.kernel == "keras_infer" and req.spec.param_dict()["model_id"] == mid
    assert set(req.inputs) == {"x"} and set(req.spec.input_dict()) == {"x"}
    assert mid in out and (tmp_path / "out" / "y.npy").exists()


async def test_submit_by_model_with_stream_sends_a_stream_infer_spec_with_no_inputs(
        api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    path = npz_model(tmp_path)
    code, _, err = await cli(capsys, "model", "push", str(path), "--name", "mnist", "--api", url)
    assert code == 0, err
    np.save(tmp_path / "items.npy", np.ones((3, 4), np.float32))
    code, out, err = await cli(capsys, "submit", "--api", url, "--model", "mnist", "--stream",
                               str(tmp_path / "items.npy"), "--max-price", "9", "--out", str(tmp_path / "out"),
                               "--poll-interval", "0")
    assert code == 0, err
    (req,) = node.submitted
    mid = model_id(load_model_file(path)).hex()
    assert req.kind == "stream" and req.units == 3
    assert req.spec.kernel == "stream_infer" and req.spec.param_dict()["model_id"] == mid
    assert set(req.inputs) == {"items"} and req.spec.input_dict() == {}
    assert mid in out


async def test_submit_by_model_with_stream_and_an_input_exits_2_and_posts_nothing(
        api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    code, _, err = await cli(capsys, "model", "push", str(npz_model(tmp_path)), "--name", "mnist", "--api", url)
    assert code == 0, err
    np.save(tmp_path / "items.npy", np.ones((3, 4), np.float32))
    code, _, err = await cli(capsys, "submit", "--api", url, "--model", "mnist", "--stream",
                             str(tmp_path / "items.npy"), "--input", f"x={tmp_path / 'items.npy'}",
                             "--max-price", "9", "--out", str(tmp_path / "out"))
    assert code == 2 and "takes no --input" in one_line(err)
    assert node.submitted == []


@pytest.mark.parametrize("ref, extra, says", [
    ("nosuch", [], "unknown_model"),
    ("Bad Name", [], "is not a model id"),
    ("mnist", ["--input", "w=W"], "--model takes one input"),
])
async def test_submit_by_model_refusals_exit_2_and_post_nothing(api, tmp_path: Path, ref: str, extra: list[str],
                                                                says: str, capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    code, _, err = await cli(capsys, "model", "push", str(npz_model(tmp_path)), "--name", "mnist", "--api", url)
    assert code == 0, err
    np.save(tmp_path / "x.npy", np.ones((5, 4), np.float32))
    extra = [e.replace("W", str(tmp_path / "x.npy")) for e in extra]
    code, _, err = await cli(capsys, "submit", "--api", url, "--model", ref, "--input", f"x={tmp_path / 'x.npy'}",
                             *extra, "--max-price", "9", "--out", str(tmp_path / "out"))
    assert code == 2 and says in one_line(err)
    assert node.submitted == []
