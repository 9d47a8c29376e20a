"""Model bundles from files, without TensorFlow: canonical ids, and a specific refusal for each hostile file.

The archives are written here with zipfile and h5py in the layouts Keras 3
writes (checked against stock Keras in test_bundle_keras.py), so these
tests stay fast and need no Keras.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.bundle import (
    BundleLimits,
    bundle_to_inputs,
    decode_bundle,
    encode_bundle,
    load_model_file,
    model_id,
    parameter_count,
)
from kernels.errors import (
    ArchiveSizeMismatch,
    ArchiveTooLarge,
    DisallowedLayer,
    MalformedModelConfig,
    ModelWeightsMismatch,
    TooManyTensors,
    TruncatedArchive,
    UnknownModelFormat,
    UnsafeArchiveMember,
)
from tests.kernels.helpers import dense_model, sequential_config

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [(3, "relu"), (2, "softmax")]
METADATA = b'{"keras_version": "3.15.1", "date_saved": "2026-12-03@12:50:00"}'


def weights_h5(groups: dict[str, list[np.ndarray]], extra: Any = None) -> bytes:
    """A Keras 3 ``model.weights.h5``: ``layers/<key>/vars/<i>`` per layer."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        h5.create_group("vars")
        layers = h5.create_group("layers")
        for key, tensors in groups.items():
            var = layers.create_group(key).create_group("vars")
            for i, t in enumerate(tensors):
                var.create_dataset(str(i), data=t)
        if extra is not None:
            extra(h5)
    return buf.getvalue()


def dense_weights(seed: int = 0) -> list[np.ndarray]:
    return dense_model(4, LAYERS, seed)[1]


def standard_members(config: dict | None = None, weights: list[np.ndarray] | None = None) -> dict[str, bytes]:
    w = dense_weights() if weights is None else weights
    return {
        "metadata.json": METADATA,
        "config.json": json.dumps(config or sequential_config(4, LAYERS)).encode(),
        "model.weights.h5": weights_h5({"dense": w[:2], "dense_1": w[2:]}),
    }


def write_zip(path: Path, members: dict[str, bytes], order: list[str] | None = None,
              times: dict[str, tuple[int, ...]] | None = None, method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in order or list(members):
            info = zipfile.ZipInfo(name, date_time=(times or {}).get(name, (1980, 1, 1, 0, 0, 0)))  # type: ignore[arg-type]
            info.compress_type = method
            zf.writestr(info, members[name])
    return path


def keras_file(tmp_path: Path, **kw: Any) -> Path:
    return write_zip(tmp_path / "m.keras", standard_members(**kw))


# --- good files --------------------------------------------------------------------------------------------


def test_keras_archive_bundles_with_weights_in_model_order(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    want = dense_weights()
    assert [w.tobytes() for w in bundle.weights] == [w.tobytes() for w in want]
    assert (bundle.input.dtype, bundle.input.shape) == ("float32", (4,))
    assert (bundle.output.dtype, bundle.output.shape) == ("float32", (2,))
    assert parameter_count(bundle) == 4 * 3 + 3 + 3 * 2 + 2
    inputs = bundle_to_inputs(bundle)
    assert sorted(inputs) == ["model", "weight_000", "weight_001", "weight_002", "weight_003"]
    assert json.loads(inputs["model"].tobytes()) == json.loads(bundle.config)


def test_npz_of_todays_inputs_gives_the_same_id_as_the_keras_archive(tmp_path: Path) -> None:
    inputs, _ = dense_model(4, LAYERS)
    np.savez(tmp_path / "m.npz", **inputs)
    assert model_id(load_model_file(tmp_path / "m.npz")) == model_id(load_model_file(keras_file(tmp_path)))


def test_round_trip_encode_decode(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    data = encode_bundle(bundle)
    again = decode_bundle(data)
    assert encode_bundle(again) == data
    assert model_id(again) == model_id(bundle)


def test_decode_refuses_a_bundle_whose_signature_lies(tmp_path: Path) -> None:
    bundle = load_model_file(keras_file(tmp_path))
    forged = type(bundle)(bundle.format, bundle.config, bundle.weights, bundle.input,
                          type(bundle.output)("float32", (7,)))
    with pytest.raises(MalformedModelConfig, match="signature does not match"):
        decode_bundle(encode_bundle(forged))
    with pytest.raises(MalformedModelConfig, match="not a model bundle"):
        decode_bundle(encode_bundle(bundle) + b"\x00")


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(["metadata.json", "config.json", "model.weights.h5"]),
       years=st.lists(st.integers(1980, 2107), min_size=3, max_size=3),
       deflate=st.booleans(),
       saved=st.text(alphabet="0123456789-@:", max_size=20))
def test_id_is_invariant_under_member_order_timestamps_and_compression(
        tmp_path_factory: pytest.TempPathFactory, order: list[str], years: list[int], deflate: bool, saved: str) -> None:
    base = tmp_path_factory.mktemp("id")
    reference = model_id(load_model_file(keras_file(base)))
    members = standard_members()
    members["metadata.json"] = json.dumps({"keras_version": "3.0.0", "date_saved": saved}).encode()
    times = {name: (year, 6, 1, 12, 0, 0) for name, year in zip(order, years)}
    path = write_zip(base / "shuffled.keras", members, order, times,
                     zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    assert model_id(load_model_file(path)) == reference


def test_different_weights_give_a_different_id(tmp_path: Path) -> None:
    a = model_id(load_model_file(keras_file(tmp_path)))
    b = model_id(load_model_file(write_zip(tmp_path / "b.keras", standard_members(weights=dense_weights(1)))))
    assert a != b


def test_bundle_module_does_not_import_tensorflow(tmp_path: Path) -> None:
    path = keras_file(tmp_path)
    script = (f"import sys\nfrom kernels.bundle import load_model_file, encode_bundle\n"
              f"encode_bundle(load_model_file({str(path)!r}))\n"
              "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


# --- hostile configs ---------------------------------------------------------------------------------------


def test_lambda_layer_refused(tmp_path: Path) -> None:
    cfg = sequential_config(4, LAYERS)
    cfg["config"]["layers"].append({"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
                                    "config": {"name": "lambda", "function": {"class_name": "__lambda__",
                                                                              "config": {"code": "4wEAAAAA"}}}})
    with pytest.raises(DisallowedLayer, match=r"Lambda\) is not on the layer allowlist"):
        load_model_file(keras_file(tmp_path, config=cfg))


def test_custom_object_refused(tmp_path: Path) -> None:
    cfg = sequential_config(4, LAYERS)
    cfg["config"]["layers"][1]["registered_name"] = "my_package>MyDense"
    with pytest.raises(DisallowedLayer, match="registered_name 'my_package>MyDense'"):
        load_model_file(keras_file(tmp_path, config=cfg))
    cfg = sequential_config(4, LAYERS)
    cfg["config"]["layers"][1]["module"] = "my_package.layers"
    with pytest.raises(DisallowedLayer, match="module 'my_package.layers'"):
        load_model_file(keras_file(tmp_path, config=cfg))


def test_nested_bracket_bomb_refused(tmp_path: Path) -> None:
    members = standard_members()
    members["config.json"] = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MalformedModelConfig, match="nested deeper than"):
        load_model_file(write_zip(tmp_path / "m.keras", members))


def test_shared_object_ids_on_dtype_policies_are_dropped_from_the_canonical_config(tmp_path: Path) -> None:
    cfg = sequential_config(4, LAYERS)
    cfg["config"]["dtype"]["shared_object_id"] = 140434962826192
    cfg["config"]["layers"][1]["config"]["dtype"]["shared_object_id"] = 140434962826192
    cfg["compile_config"] = {"optimizer": {"module": "keras.optimizers", "class_name": "Adam", "config": {}}}
    shared = model_id(load_model_file(keras_file(tmp_path, config=cfg)))
    assert shared == model_id(load_model_file(write_zip(tmp_path / "plain.keras", standard_members())))
    cfg["config"]["layers"][1]["shared_object_id"] = 1  # on a layer it would mean a shared layer: refused
    with pytest.raises(DisallowedLayer, match="shared_object_id"):
        load_model_file(keras_file(tmp_path, config=cfg))


# --- hostile archives --------------------------------------------------------------------------------------


def test_truncated_zip_refused(tmp_path: Path) -> None:
    data = keras_file(tmp_path).read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 40):
        (tmp_path / "cut.keras").write_bytes(data[:cut])
        with pytest.raises((TruncatedArchive, UnknownModelFormat)):
            load_model_file(tmp_path / "cut.keras")
    # cut inside the data, with the directory intact: the member's data runs past the end
    (tmp_path / "cut.keras").write_bytes(data[:60])
    with pytest.raises(TruncatedArchive):
        load_model_file(tmp_path / "cut.keras")


def test_zip_bomb_refused_by_declared_size_before_inflating(tmp_path: Path) -> None:
    members = standard_members()
    members["metadata.json"] = b"\x00" * (4 << 20)  # 4 MiB of zeros deflate to a few KiB
    path = write_zip(tmp_path / "bomb.keras", members, method=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 64 << 10
    with pytest.raises(ArchiveTooLarge, match="declares|in total"):
        load_model_file(path, BundleLimits(weight_bytes=1 << 20, config_bytes=1 << 16))


def _patch_sizes(data: bytes, name: str, size: int) -> bytes:
    """Rewrite a member's uncompressed size in both its local header and the central directory."""
    out = bytearray(data)
    encoded = name.encode()
    local = out.find(b"PK\x03\x04" + b"", 0)
    while local != -1:
        if out[local + 30:local + 30 + len(encoded)] == encoded:
            struct.pack_into("<I", out, local + 22, size)
        local = out.find(b"PK\x03\x04", local + 4)
    central = out.find(b"PK\x01\x02")
    while central != -1:
        if out[central + 46:central + 46 + len(encoded)] == encoded:
            struct.pack_into("<I", out, central + 24, size)
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


def test_zip_bomb_whose_header_understates_its_size_stops_at_the_declared_size(tmp_path: Path) -> None:
    members = standard_members()
    members["metadata.json"] = b"\x00" * (4 << 20)
    path = write_zip(tmp_path / "bomb.keras", members, method=zipfile.ZIP_DEFLATED)
    path.write_bytes(_patch_sizes(path.read_bytes(), "metadata.json", 64))
    with pytest.raises(ArchiveSizeMismatch, match="more bytes than the 64 its header declares"):
        load_model_file(path)


def test_sizes_that_lie_refused(tmp_path: Path) -> None:
    path = keras_file(tmp_path)
    path.write_bytes(_patch_sizes(path.read_bytes(), "metadata.json", 10))  # stored: data longer than declared
    with pytest.raises((ArchiveSizeMismatch, TruncatedArchive)):
        load_model_file(path)
    members = standard_members()
    path = write_zip(tmp_path / "d.keras", members, method=zipfile.ZIP_DEFLATED)
    path.write_bytes(_patch_sizes(path.read_bytes(), "config.json", len(members["config.json"]) + 100))
    with pytest.raises(ArchiveSizeMismatch, match="fewer bytes than"):
        load_model_file(path)


def test_overlapping_members_refused(tmp_path: Path) -> None:
    path = keras_file(tmp_path)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    offsets = []
    while central != -1:
        offsets.append(central)
        central = data.find(b"PK\x01\x02", central + 4)
    # point the second member's directory entry at the first member's local header
    first_offset = struct.unpack_from("<I", data, offsets[0] + 42)[0]
    struct.pack_into("<I", data, offsets[1] + 42, first_offset)
    path.write_bytes(bytes(data))
    with pytest.raises((ArchiveTooLarge, UnsafeArchiveMember), match="overlap|local header names"):
        load_model_file(path)


@pytest.mark.parametrize("name", ["../config.json", "/etc/passwd", "a/../../b", "C:/x", "dir\\..\\x", "./config.json"])
def test_member_names_that_escape_refused(tmp_path: Path, name: str) -> None:
    members = standard_members()
    members[name] = b"x"
    with pytest.raises(UnsafeArchiveMember, match="escapes the archive"):
        load_model_file(write_zip(tmp_path / "m.keras", members))


def test_unexpected_member_refused(tmp_path: Path) -> None:
    members = standard_members()
    members["assets/run.py"] = b"import os"
    with pytest.raises(UnsafeArchiveMember, match="unexpected zip member 'assets/run.py'"):
        load_model_file(write_zip(tmp_path / "m.keras", members))


def test_not_a_model_file_refused(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(UnknownModelFormat):
        load_model_file(tmp_path / "x.bin")
    (tmp_path / "big.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ArchiveTooLarge, match="limit"):
        load_model_file(tmp_path / "big.bin", BundleLimits(file_bytes=50))


# --- weights that do not fit the config --------------------------------------------------------------------


def _with_weights(tmp_path: Path, groups: dict[str, list[np.ndarray]], extra: Any = None) -> Path:
    members = standard_members()
    members["model.weights.h5"] = weights_h5(groups, extra)
    return write_zip(tmp_path / "w.keras", members)


def test_missing_tensor_refused(tmp_path: Path) -> None:
    w = dense_weights()
    with pytest.raises(ModelWeightsMismatch, match="missing weight tensors for dense_1"):
        load_model_file(_with_weights(tmp_path, {"dense": w[:2], "dense_1": w[2:3]}))
    with pytest.raises(ModelWeightsMismatch, match="missing weights for dense_1"):
        load_model_file(_with_weights(tmp_path, {"dense": w[:2]}))


def test_extra_tensor_refused(tmp_path: Path) -> None:
    w = dense_weights()
    with pytest.raises(ModelWeightsMismatch, match="extra weight tensors for dense"):
        load_model_file(_with_weights(tmp_path, {"dense": [*w[:2], w[1]], "dense_1": w[2:]}))
    with pytest.raises(ModelWeightsMismatch, match="layers the config does not have"):
        load_model_file(_with_weights(tmp_path, {"dense": w[:2], "dense_1": w[2:], "dense_2": w[2:]}))


def test_mis_shaped_tensor_refused(tmp_path: Path) -> None:
    w = dense_weights()
    with pytest.raises(ModelWeightsMismatch, match=r"weight tensor 0 has shape \(3, 4\), the config needs \(4, 3\)"):
        load_model_file(_with_weights(tmp_path, {"dense": [w[0].T.copy(), w[1]], "dense_1": w[2:]}))


def test_too_many_tensors_refused(tmp_path: Path) -> None:
    with pytest.raises(TooManyTensors, match="more than 3 tensors"):
        load_model_file(keras_file(tmp_path), BundleLimits(tensors=3))
    inputs, _ = dense_model(4, LAYERS)
    np.savez(tmp_path / "m.npz", **inputs)
    with pytest.raises(TooManyTensors, match="limit is 2"):
        load_model_file(tmp_path / "m.npz", BundleLimits(tensors=2))


def test_links_out_of_the_weights_file_refused(tmp_path: Path) -> None:
    w = dense_weights()

    def external(h5: h5py.File) -> None:
        del h5["layers/dense_1/vars/1"]
        h5["layers/dense_1/vars/1"] = h5py.ExternalLink("/etc/hostname", "/x")

    with pytest.raises(UnsafeArchiveMember, match="ExternalLink"):
        load_model_file(_with_weights(tmp_path, {"dense": w[:2], "dense_1": w[2:]}, external))


def test_npz_with_a_pickled_member_refused(tmp_path: Path) -> None:
    inputs, _ = dense_model(4, LAYERS)
    inputs["weight_001"] = np.array([object()], dtype=object)  # type: ignore[assignment]
    np.savez(tmp_path / "m.npz", **inputs)
    with pytest.raises(Exception, match="dtype object is not allowed"):
        load_model_file(tmp_path / "m.npz")
