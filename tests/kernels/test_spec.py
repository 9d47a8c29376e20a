"""Specs, blobs and tensors: round trips and every kind of bad input (no TensorFlow here)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Annotated

import msgpack
import numpy as np
import pytest

from kernels import (
    BlobHashMismatch,
    BlobRef,
    DisallowedDtype,
    DtypeMismatch,
    InputMismatch,
    InvalidParams,
    JobSpec,
    MalformedSpec,
    ShapeMismatch,
    Tensor,
    TensorTooLarge,
    TruncatedTensor,
    UnknownKernel,
    blob_hash,
    blob_ref,
    decode_blob,
    decode_spec,
    decode_tensor,
    encode_tensor,
    make_spec,
    spec_hash,
    validate_inputs,
    validate_spec,
)
from kernels.tensors import MAX_ELEMENTS, array_from_bytes, check_shape, tensor_bytes
from ledger.codec import DecodeError, Record, decode, encode, record


def mm_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal((4, 5)).astype(np.float32)}


def test_spec_round_trip_and_hash() -> None:
    spec = make_spec("matmul", 1, {}, mm_inputs(), seconds=5)
    data = spec.encode()
    assert decode_spec(data) == spec
    h = spec_hash(spec)
    assert len(h) == 32 and h == hashlib.sha256(data).digest()
    other = make_spec("matmul", 1, {}, mm_inputs(), seconds=6)
    assert spec_hash(other) != h


def test_blob_hash_is_sha256_of_element_bytes() -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert blob_hash(b"abc") == hashlib.sha256(b"abc").digest()
    ref = blob_ref(arr)
    assert ref.hash == hashlib.sha256(arr.astype("<i4").tobytes()).digest()
    assert (ref.dtype, ref.shape) == ("int32", (2, 3))
    # Fortran order and big-endian arrays hash as their canonical form
    assert blob_ref(np.asfortranarray(arr)).hash == ref.hash
    assert blob_ref(arr.astype(">i4")).hash == ref.hash


def test_decode_blob_accepts_good_and_rejects_truncated_and_tampered() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = blob_ref(arr)
    data = tensor_bytes(arr)
    assert np.array_equal(decode_blob(ref, data), arr)
    with pytest.raises(TruncatedTensor, match="truncated"):
        decode_blob(ref, data[:-1])
    with pytest.raises(TruncatedTensor, match="oversized"):
        decode_blob(ref, data + b"\0")
    tampered = bytearray(data)
    tampered[0] ^= 1
    with pytest.raises(BlobHashMismatch):
        decode_blob(ref, bytes(tampered))


def test_unknown_kernel_and_version() -> None:
    spec = make_spec("matmul", 1, {}, mm_inputs())
    with pytest.raises(UnknownKernel, match="unknown kernel 'fft'"):
        validate_spec(dataclasses.replace(spec, kernel="fft"))
    with pytest.raises(UnknownKernel, match="no version 7"):
        validate_spec(dataclasses.replace(spec, version=7))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"stride": 9}, "'stride': 9 is above the maximum 8"),
        ({"stride": 0}, "'stride': 0 is below the minimum 1"),
        ({"stride": 1.5}, "'stride': expected int"),
        ({"padding": "full"}, "'padding': 'full' is not one of"),
        ({"stride": 2, "dilation": 2}, "cannot both exceed 1"),
        ({"groups": 2}, r"unknown param\(s\) \['groups'\]"),
    ],
)
def test_conv2d_params_out_of_range(params: dict[str, object], match: str) -> None:
    x = np.zeros((1, 5, 5, 2), np.float32)
    w = np.zeros((3, 3, 2, 4), np.float32)
    with pytest.raises(InvalidParams, match=match):
        make_spec("conv2d", 1, params, {"x": x, "w": w})


def test_keras_train_params_checked_before_any_work() -> None:
    from tests.kernels.helpers import dense_model

    model, _ = dense_model(3, [(2, "linear")])
    data = {**model, "x": np.zeros((4, 3), np.float32), "y": np.zeros((4, 2), np.float32)}
    with pytest.raises(InvalidParams, match="'steps' is required"):
        make_spec("keras_train", 1, {}, data)
    with pytest.raises(InvalidParams, match="'steps': 0 is below"):
        make_spec("keras_train", 1, {"steps": 0}, data)
    with pytest.raises(InvalidParams, match="'learning_rate': 0.0 is below"):
        make_spec("keras_train", 1, {"steps": 1, "learning_rate": 0.0}, data)
    with pytest.raises(InvalidParams, match="'optimizer'"):
        make_spec("keras_train", 1, {"steps": 1, "optimizer": "lbfgs"}, data)
    with pytest.raises(ShapeMismatch, match="'x' has 4 rows"):
        make_spec("keras_train", 1, {"steps": 1}, {**data, "y": np.zeros((5, 2), np.float32)})


def test_wrong_dtype_and_shape_in_spec() -> None:
    a, b = mm_inputs()["a"], mm_inputs()["b"]
    with pytest.raises(DtypeMismatch, match="input 'a': dtype int32"):
        make_spec("matmul", 1, {}, {"a": a.astype(np.int32), "b": b})
    with pytest.raises(ShapeMismatch, match="inner dimensions differ"):
        make_spec("matmul", 1, {}, {"a": a, "b": b.T.copy()})
    with pytest.raises(ShapeMismatch, match="expected 2 dimensions"):
        make_spec("matmul", 1, {}, {"a": a[None], "b": b})
    with pytest.raises(InputMismatch, match=r"missing input\(s\) \['b'\]"):
        make_spec("matmul", 1, {}, {"a": a})


def test_inputs_checked_against_blob_refs() -> None:
    inputs = mm_inputs()
    spec = make_spec("matmul", 1, {}, inputs)
    assert set(validate_inputs(spec, inputs)) == {"a", "b"}
    with pytest.raises(DtypeMismatch, match="input 'a': dtype float64"):
        validate_inputs(spec, {**inputs, "a": inputs["a"].astype(np.float64)})
    with pytest.raises(ShapeMismatch, match=r"input 'b': shape \(4, 4\)"):
        validate_inputs(spec, {**inputs, "b": np.zeros((4, 4), np.float32)})
    changed = inputs["a"].copy()
    changed[0, 0] += 1
    with pytest.raises(BlobHashMismatch, match="input 'a'"):
        validate_inputs(spec, {**inputs, "a": changed})
    with pytest.raises(InputMismatch, match=r"unexpected \['c'\]"):
        validate_inputs(spec, {**inputs, "c": inputs["a"]})


def test_oversized_and_disallowed_tensors_in_spec() -> None:
    spec = make_spec("matmul", 1, {}, mm_inputs())
    huge = BlobRef(hash=b"\0" * 32, dtype="float32", shape=(1 << 16, 1 << 16))
    with pytest.raises(TensorTooLarge, match="limit is"):
        validate_spec(dataclasses.replace(spec, inputs=(("a", huge), spec.inputs[1])))
    odd = BlobRef(hash=b"\0" * 32, dtype="complex64", shape=(3, 4))
    with pytest.raises(DisallowedDtype, match="'complex64' is not allowed"):
        validate_spec(dataclasses.replace(spec, inputs=(("a", odd), spec.inputs[1])))
    with pytest.raises(DisallowedDtype):
        blob_ref(np.array(["x"], dtype=object))


def test_malformed_spec() -> None:
    spec = make_spec("matmul", 1, {}, mm_inputs())
    with pytest.raises(MalformedSpec, match="requirements.device 'tpu'"):
        validate_spec(dataclasses.replace(spec, requirements=dataclasses.replace(spec.requirements, device="tpu")))
    with pytest.raises(MalformedSpec, match="JobSpec.limits.seconds"):
        validate_spec(dataclasses.replace(spec, limits=dataclasses.replace(spec.limits, seconds=0.0)))
    with pytest.raises(MalformedSpec):
        decode_spec(spec.encode()[:-3])
    with pytest.raises(MalformedSpec, match="non-canonical"):
        decode_spec(_non_canonical(spec))


def _non_canonical(spec: JobSpec) -> bytes:
    # the same spec with its version (1) packed as a uint16 instead of a positive fixint
    data = spec.encode()
    obj = msgpack.unpackb(data)
    head = msgpack.packb(obj[0])
    rest = b"".join(msgpack.packb(o, use_bin_type=True) for o in obj[2:])
    return data[:1] + head + b"\xcd\x00\x01" + rest


@record
class Holder(Record):
    t: Annotated[np.ndarray, Tensor(max_elements=1000)]


def test_tensor_ext_round_trip() -> None:
    for arr in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([True, False]), np.zeros((0, 4), np.int64),
                np.array(3.5, dtype=np.float64)):
        payload = encode_tensor(arr)
        back = decode_tensor(payload)
        assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)
        data = encode(Holder(arr))
        assert msgpack.unpackb(data)[0].code == 1
        assert np.array_equal(decode(Holder, data).t, arr)


def test_tensor_ext_rejects_bad_payloads() -> None:
    good = encode_tensor(np.arange(4, dtype=np.int32))
    with pytest.raises(TruncatedTensor, match="truncated tensor data"):
        decode_tensor(good[:-1])
    with pytest.raises(TruncatedTensor, match="header"):
        decode_tensor(good[:1])
    with pytest.raises(DisallowedDtype, match="unknown tensor dtype code 99"):
        decode_tensor(bytes([99]) + good[1:])
    huge = struct.pack("<BB2I", 10, 2, 1 << 16, 1 << 16)
    with pytest.raises(TensorTooLarge, match=f"limit is {MAX_ELEMENTS}"):
        decode_tensor(huge)
    with pytest.raises(TruncatedTensor, match="bool tensor"):
        decode_tensor(struct.pack("<BBI", 1, 1, 2) + b"\x01\x02")
    # inside a record, tensor errors surface as the codec's DecodeError naming the field
    big = encode_tensor(np.zeros(2000, np.uint8))
    with pytest.raises(DecodeError, match=r"Holder.t: .*limit is 1000"):
        decode(Holder, msgpack.packb([msgpack.ExtType(1, big)], use_bin_type=True))
    with pytest.raises(DecodeError, match="Holder.t: truncated"):
        decode(Holder, msgpack.packb([msgpack.ExtType(1, good[:-2])], use_bin_type=True))


U32_MAX = 0xFFFFFFFF


def _header(code: int, *dims: int) -> bytes:
    return struct.pack(f"<BB{len(dims)}I", code, len(dims), *dims)


@pytest.mark.parametrize("dims", [(0, U32_MAX, U32_MAX), (U32_MAX, U32_MAX, 0), (0, 1 << 31, 1 << 31),
                                  (0,) + (U32_MAX,) * 7, (U32_MAX,) * 7 + (0,), (0, MAX_ELEMENTS + 1)],
                         ids=["0-max-max", "max-max-0", "0-2^31-2^31", "0-max^7", "max^7-0", "0-over-limit"])
@pytest.mark.parametrize("code", [1, 10, 11], ids=["bool", "float32", "float64"])
def test_an_empty_tensor_with_huge_other_dimensions_is_a_typed_error(code: int, dims: tuple[int, ...]) -> None:
    """A zero dimension makes the element count 0, so the count limit never saw the other dimensions; numpy
    then could not lay the shape out and raised a bare ValueError ("array is too big" / "cannot reshape")."""
    with pytest.raises(TensorTooLarge, match=r"empty tensor of shape .* dimensions other than 0 span \d+ elements"):
        decode_tensor(_header(code, *dims))
    with pytest.raises(TensorTooLarge, match="empty tensor of shape"):
        check_shape(dims)
    # the same shape from a job spec's blob ref, and inside a record (the codec names the field)
    with pytest.raises(TensorTooLarge, match="empty tensor of shape"):
        array_from_bytes("float32", dims, b"")
    with pytest.raises(DecodeError, match=r"Holder.t: empty tensor of shape"):
        decode(Holder, msgpack.packb([msgpack.ExtType(1, _header(code, *dims))], use_bin_type=True))


def test_zero_dimensions_decode_when_the_shape_is_sane_and_the_bytes_match() -> None:
    for dims in [(0,), (0, 5), (5, 0), (3, 0, 7), (0, MAX_ELEMENTS)]:
        arr = decode_tensor(_header(10, *dims))
        assert arr.shape == dims and arr.size == 0 and arr.dtype == np.float32
    with pytest.raises(TruncatedTensor, match=r"oversized tensor data: float32\[0\] needs 0 bytes, got 4"):
        decode_tensor(_header(10, 0) + b"\x00" * 4)
    with pytest.raises(TruncatedTensor, match=r"oversized tensor data: int64\[5, 0\] needs 0 bytes, got 40"):
        decode_tensor(_header(8, 5, 0) + b"\x00" * 40)
    with pytest.raises(TruncatedTensor, match=r"truncated tensor data: float32\[\] needs 4 bytes, got 0"):
        decode_tensor(_header(10))  # no dimensions: a scalar, which has one element


def test_odd_shapes_raise_typed_errors_naming_the_problem() -> None:
    # a product that overflows any machine integer: Python counts it exactly and the limit refuses it
    with pytest.raises(TensorTooLarge, match=rf"has {U32_MAX ** 8} elements, limit is {MAX_ELEMENTS}"):
        decode_tensor(_header(11, *(U32_MAX,) * 8))
    with pytest.raises(TensorTooLarge, match="9 dimensions, limit is 8"):
        decode_tensor(_header(10, *(1,) * 9))
    with pytest.raises(TruncatedTensor, match="header needs 14 bytes, got 10"):
        decode_tensor(_header(10, 2, 2, 2)[:10])
    with pytest.raises(TruncatedTensor, match=r"truncated tensor data: uint8\[2, 3\] needs 6 bytes, got 5"):
        decode_tensor(_header(2, 2, 3) + b"\x00" * 5)
    # the wire format cannot carry a negative dimension (u32), but a spec's shape can
    for bad in [(-1,), (2, -3), (0, -1), (1.5,), (True,), (1 << 32,)]:
        with pytest.raises(TensorTooLarge, match="bad dimension"):
            check_shape(bad)  # type: ignore[arg-type]
        with pytest.raises(TensorTooLarge, match="bad dimension"):
            array_from_bytes("uint8", bad, b"")  # type: ignore[arg-type]
