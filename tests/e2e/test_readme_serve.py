"""The README's "Serve a Keras model in three commands", run as written.

The section's code blocks are the test's script: each is preceded by a
``<!-- readme-serve:STEP -->`` marker, and this module reads them from
``README.md`` instead of keeping its own copy, so the README and the test
cannot drift apart. The fast test checks the section's shape (every step
there, in order; the two ``curl`` payloads well-formed and asking the same
rows). The slow test runs the blocks in order, like a user in one terminal:

- ``sh`` blocks in ``bash`` with ``set -e``, each in the environment the
  previous ones left (so ``export API=...`` reaches later blocks);
- ``python`` blocks with ``.venv/bin/python``, as the README says.

They run in a temporary directory laid out like a checkout whose ``.venv``
is installed: ``scripts/`` and ``pyproject.toml`` link to this repository,
and ``.venv/bin/python`` and ``.venv/bin/p2pgpu`` run the interpreter that
runs the tests, on this checkout's code (``PYTHONPATH``), with the install
stamp ``scripts/setup-venv.sh`` checks already written, so it installs
nothing. The devnet's directory is therefore the temp dir's
``devnet-data``: the only thing substituted. The test checks both ``curl``
answers and the SDK's printout against ``model.predict`` of the model the
README's snippet saved, and stops every process it started (the README's own
``devnet down``, then SIGKILL to each node's process group, which holds its
kernel workers).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
STEPS = ("start", "model", "push", "infer-v2", "infer-tfserving", "sdk", "stop")
_BLOCK = re.compile(r"^<!-- readme-serve:(?P<step>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)\n```$",
                    re.MULTILINE | re.DOTALL)
RTOL, ATOL = 1e-4, 1e-5
START_TIMEOUT_S = 900.0  # 7 processes, 4 TensorFlow workers and the demo on 2 shared cores
STEP_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Block:
    step: str
    lang: str
    code: str


def readme_blocks() -> dict[str, Block]:
    """The section's marked blocks by step; fails naming what is missing, doubled or out of order."""
    found = [Block(m["step"], m["lang"], m["code"]) for m in _BLOCK.finditer(README.read_text(encoding="utf-8"))]
    steps = tuple(b.step for b in found)
    assert steps == STEPS, (f"README.md's marked blocks are {steps}, expected {STEPS}: each needs a "
                            "'<!-- readme-serve:STEP -->' line right above its fence")
    for b in found:
        assert b.lang in ("sh", "python"), f"block {b.step}: fence language {b.lang!r} is neither sh nor python"
    return {b.step: b for b in found}


def shell_words(code: str) -> list[str]:
    return shlex.split(code.replace("\\\n", " "), comments=True)


def option(words: list[str], name: str) -> str:
    assert name in words, f"{name} not in {words}"
    return words[words.index(name) + 1]


def v2_request(block: Block) -> tuple[str, np.ndarray]:
    """The model name in the v2 URL and the rows the curl sends, as the request's shape and datatype say."""
    words = shell_words(block.code)
    url = next(w for w in words if "/v2/models/" in w)
    name = url.split("/v2/models/", 1)[1].split("/", 1)[0]
    tensor = json.loads(option(words, "-d"))["inputs"][0]
    assert tensor["name"] == "x" and tensor["datatype"] == "FP32", tensor
    return name, np.array(tensor["data"], np.float32).reshape(tensor["shape"])


def tfserving_request(block: Block) -> tuple[str, np.ndarray]:
    words = shell_words(block.code)
    url = next(w for w in words if "/v1/models/" in w)
    name = url.split("/v1/models/", 1)[1].split(":", 1)[0]
    return name, np.array(json.loads(option(words, "-d"))["instances"], np.float32)


def sdk_request(block: Block) -> tuple[str, np.ndarray]:
    """The model name and the ``np.array(...)`` literal of the SDK snippet's ``infer`` call."""
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "infer":
            name = ast.literal_eval(node.args[0])
            array = node.args[1]
            assert isinstance(array, ast.Call) and isinstance(array.func, ast.Attribute), ast.dump(array)
            assert array.func.attr == "array", ast.dump(array)
            return name, np.array(ast.literal_eval(array.args[0]), np.float32)
    raise AssertionError(f"no .infer(NAME, np.array(...)) call in the sdk block:\n{block.code}")


def test_readme_section_has_every_step_and_consistent_requests() -> None:
    blocks = readme_blocks()
    assert "bash scripts/devnet.sh --detach" in blocks["start"].code  # the README's main command, detached
    assert "devnet url" in blocks["start"].code
    name = option(shell_words(blocks["push"].code), "--name")
    v2_name, v2_x = v2_request(blocks["infer-v2"])
    tf_name, tf_x = tfserving_request(blocks["infer-tfserving"])
    sdk_name, sdk_x = sdk_request(blocks["sdk"])
    assert v2_name == tf_name == sdk_name == name
    np.testing.assert_array_equal(v2_x, tf_x)
    np.testing.assert_array_equal(v2_x, sdk_x)
    assert "model.keras" in shell_words(blocks["push"].code) and '"model.keras"' in blocks["model"].code
    assert "devnet down" in blocks["stop"].code


# ----------------------------------------------------------------- running the blocks


class Session:
    """One terminal: blocks run in ``cwd``, each in the environment the previous sh block exported."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.envdump = cwd / ".readme-serve-env"

    def run(self, block: Block, timeout: float) -> str:
        if block.lang == "sh":
            script = f"set -eo pipefail\n{block.code}\nenv -0 > {shlex.quote(str(self.envdump))}\n"
            argv = ["bash", "-c", script]
            stdin = None
        else:
            argv = [str(self.cwd / ".venv" / "bin" / "python"), "-"]
            stdin = block.code
        proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE if stdin else None,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"block {block.step} did not finish within {timeout:g} s\n"
                                 f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}") from None
        assert proc.returncode == 0, (f"block {block.step} exited {proc.returncode}\n{block.code}\n"
                                      f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
        if block.lang == "sh":
            pairs = (item.split("=", 1) for item in self.envdump.read_text().split("\0") if "=" in item)
            self.env = {k: v for k, v in pairs}
        return out


def checkout_like(root: Path) -> dict[str, str]:
    """Lay out ``root`` as a checkout with an installed ``.venv`` (see the module docstring); returns the env."""
    (root / "scripts").symlink_to(REPO / "scripts", target_is_directory=True)
    (root / "pyproject.toml").symlink_to(REPO / "pyproject.toml")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name, tail in (("python", ""), ("p2pgpu", " -m p2pgpu.cli")):
        path = venv_bin / name
        path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{tail} "$@"\n', encoding="utf-8")
        path.chmod(0o755)
    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    (root / ".venv" / ".p2pgpu-installed").write_text(stamp + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("P2PGPU_DEVNET_DIR", "P2PGPU_API", "API")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    env["PYTHON"] = sys.executable  # setup-venv.sh's version check, should `python3` be older than 3.11
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def node_pids(devnet_dir: Path) -> set[int]:
    with contextlib.suppress(OSError, ValueError, KeyError):
        manifest = json.loads((devnet_dir / "devnet.json").read_text(encoding="utf-8"))
        return {int(n["pid"]) for n in manifest["nodes"] if n.get("pid")}
    return set()


def close_to(got: Any, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(want.shape), want, rtol=RTOL, atol=ATOL,
                               err_msg=what)


@pytest.mark.slow
def test_readme_serve_section_runs_as_written(tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    blocks = readme_blocks()
    session = Session(tmp_path, checkout_like(tmp_path))
    devnet_dir = tmp_path / "devnet-data"
    pids: set[int] = set()
    try:
        session.run(blocks["start"], START_TIMEOUT_S)
        pids |= node_pids(devnet_dir)
        assert session.env.get("API", "").startswith("http://127.0.0.1:"), session.env.get("API")
        session.run(blocks["model"], STEP_TIMEOUT_S)
        model = keras.saving.load_model(tmp_path / "model.keras")
        session.run(blocks["push"], STEP_TIMEOUT_S)

        name, x = v2_request(blocks["infer-v2"])
        want = model.predict(x, verbose=0)
        v2 = json.loads(session.run(blocks["infer-v2"], STEP_TIMEOUT_S))
        assert v2["model_name"] == name and v2["outputs"][0]["name"] == "y", v2
        assert v2["outputs"][0]["shape"] == list(want.shape), v2
        close_to(v2["outputs"][0]["data"], want, "KServe v2 answer vs model.predict")

        _, x_tf = tfserving_request(blocks["infer-tfserving"])
        tf = json.loads(session.run(blocks["infer-tfserving"], STEP_TIMEOUT_S))
        close_to(tf["predictions"], model.predict(x_tf, verbose=0), "TF Serving answer vs model.predict")

        _, x_sdk = sdk_request(blocks["sdk"])
        printed = session.run(blocks["sdk"], STEP_TIMEOUT_S)  # numpy's printout of the answer
        numbers = [float(t) for t in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", printed)]
        close_to(numbers, model.predict(x_sdk, verbose=0), "the SDK's printed answer vs model.predict")
    finally:
        pids |= node_pids(devnet_dir)
        with contextlib.suppress(AssertionError):
            session.run(blocks["stop"], STEP_TIMEOUT_S)
        for pid in pids:  # a node's kernel workers live in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    assert node_pids(devnet_dir) == set(), "devnet down left pids in the manifest"
