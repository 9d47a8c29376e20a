"""Canonical MessagePack records: the one schema layer for every signed object.

A record is a frozen, slotted dataclass whose fields carry their wire type in
``typing.Annotated`` metadata. It encodes as a MessagePack array in field
order; a tagged record (one member of a :class:`RecordUnion`) is prefixed with
its ``TYPE_ID``. Decoding is strict, because signatures cover bytes and two
encodings of one value would let a peer replay a message under a new id:

* input over the record's ``MAX_BYTES`` is refused before it is parsed;
* every field is checked against its wire type and bounds;
* unknown type ids, missing and extra fields are refused;
* the decoded value is re-encoded and must equal the input byte for byte.

Every failure raises :class:`DecodeError` naming the field path, e.g.
``Transfer.amount: expected an integer in [0, 2**64), got str``.

The layer is pure: no I/O, no global registries. Schemas are explicit
:class:`RecordUnion` values built by the modules that own the records.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import msgpack

__all__ = [
    "Bool",
    "CheckedField",
    "Bytes",
    "DecodeError",
    "EncodeError",
    "array_header",
    "encode_with_encoded_list",
    "FieldType",
    "FixedBytes",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "Nested",
    "Ext",
    "Scalar",
    "record",
    "Maybe",
    "Record",
    "RecordUnion",
    "Text",
    "OneOf",
    "decode",
    "encode",
    "U8",
    "U16",
    "U32",
    "U64",
    "I64",
    "Hash32",
    "Address",
]

DEFAULT_MAX_BYTES = 1 << 20
MAX_DEPTH = 16


class DecodeError(ValueError):
    """Bytes that are not the canonical encoding of a valid record.

    ``path`` names the offending field (``Record.field[3].inner``) so a user or
    a peer-score log can tell exactly what was wrong.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class EncodeError(ValueError):
    """A local value that does not fit its declared wire type (our own bug)."""


# --------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


class FieldType:
    """How one field looks on the wire. Subclasses validate both directions."""

    def to_wire(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def from_wire(self, obj: Any, path: str) -> Any:
        raise NotImplementedError


class CheckedField(FieldType):
    """A field whose wire form is its local value, checked the same way in both directions."""

    __slots__ = ()

    def _check(self, value: Any, path: str, error: type[ValueError]) -> Any:
        raise NotImplementedError

    def to_wire(self, value: Any, path: str) -> Any:
        return self._check(value, path, EncodeError)

    def from_wire(self, obj: Any, path: str) -> Any:
        return self._check(obj, path, DecodeError)


@dataclass(frozen=True, slots=True)
class Int(CheckedField):
    lo: int
    hi: int  # inclusive

    def _check(self, value: Any, path: str, error: type[ValueError]) -> int:
        if type(value) is not int:
            raise _err(error, path, f"expected an integer in [{self.lo}, {self.hi}], got {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise _err(error, path, f"integer {value} out of range [{self.lo}, {self.hi}]")
        return value

    def to_wire(self, value: Any, path: str) -> Any:
        # IntEnum members are ints locally; on the wire they are plain integers.
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)
        return self._check(value, path, EncodeError)


@dataclass(frozen=True, slots=True)
class Float(CheckedField):
    """A finite IEEE-754 double. NaN and infinities have no canonical meaning."""

    lo: float = -math.inf
    hi: float = math.inf

    def _check(self, value: Any, path: str, error: type[ValueError]) -> float:
        if type(value) is not float:
            raise _err(error, path, f"expected a float, got {_type_name(value)}")
        if not math.isfinite(value):
            raise _err(error, path, f"float {value} is not finite")
        if not self.lo <= value <= self.hi:
            raise _err(error, path, f"float {value} out of range [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True, slots=True)
class Bool(FieldType):
    def to_wire(self, value: Any, path: str) -> Any:
        if type(value) is not bool:
            raise EncodeError(f"{path}: expected a bool, got {_type_name(value)}")
        return value

    def from_wire(self, obj: Any, path: str) -> Any:
        if type(obj) is not bool:
            raise DecodeError(path, f"expected a bool, got {_type_name(obj)}")
        return obj


@dataclass(frozen=True, slots=True)
class Bytes(CheckedField):
    max_len: int
    min_len: int = 0

    def _check(self, value: Any, path: str, error: type[ValueError]) -> bytes:
        if type(value) is not bytes:
            raise _err(error, path, f"expected bytes, got {_type_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len == self.max_len:
                raise _err(error, path, f"expected exactly {self.max_len} bytes, got {len(value)}")
            raise _err(error, path, f"expected {self.min_len}..{self.max_len} bytes, got {len(value)}")
        return value



def FixedBytes(length: int) -> Bytes:  # noqa: N802 - reads as a type
    return Bytes(max_len=length, min_len=length)


@dataclass(frozen=True, slots=True)
class Text(CheckedField):
    max_len: int
    min_len: int = 0

    def _check(self, value: Any, path: str, error: type[ValueError]) -> str:
        if type(value) is not str:
            raise _err(error, path, f"expected a string, got {_type_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise _err(error, path, f"expected {self.min_len}..{self.max_len} characters, got {len(value)}")
        return value



@dataclass(frozen=True, slots=True)
class ListOf(FieldType):
    """A homogeneous list, held as a tuple so records stay hashable."""

    item: FieldType
    max_items: int
    min_items: int = 0

    def to_wire(self, value: Any, path: str) -> Any:
        if not isinstance(value, (tuple, list)):
            raise EncodeError(f"{path}: expected a tuple, got {_type_name(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise EncodeError(f"{path}: expected {self.min_items}..{self.max_items} items, got {len(value)}")
        return [self.item.to_wire(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def from_wire(self, obj: Any, path: str) -> Any:
        if type(obj) is not list:
            raise DecodeError(path, f"expected a list, got {_type_name(obj)}")
        if not self.min_items <= len(obj) <= self.max_items:
            raise DecodeError(path, f"expected {self.min_items}..{self.max_items} items, got {len(obj)}")
        return tuple(self.item.from_wire(v, f"{path}[{i}]") for i, v in enumerate(obj))


@dataclass(frozen=True, slots=True)
class MapOf(FieldType):
    """A map with string keys, encoded with keys in sorted order (canonical).

    Held as a tuple of ``(key, value)`` pairs sorted by key, so records stay
    hashable and equal values have equal encodings.
    """

    value: FieldType
    max_items: int
    max_key_len: int = 64

    def to_wire(self, value: Any, path: str) -> Any:
        pairs = _pairs(value)
        if pairs is None:
            raise EncodeError(f"{path}: expected a mapping or sorted pairs, got {_type_name(value)}")
        if len(pairs) > self.max_items:
            raise EncodeError(f"{path}: expected at most {self.max_items} entries, got {len(pairs)}")
        out: dict[str, Any] = {}
        for key, item in sorted(pairs):
            if type(key) is not str or not 0 < len(key) <= self.max_key_len:
                raise EncodeError(f"{path}: bad key {key!r}")
            out[key] = self.value.to_wire(item, f"{path}.{key}")
        return out

    def from_wire(self, obj: Any, path: str) -> Any:
        if type(obj) is not dict:
            raise DecodeError(path, f"expected a map, got {_type_name(obj)}")
        if len(obj) > self.max_items:
            raise DecodeError(path, f"expected at most {self.max_items} entries, got {len(obj)}")
        pairs = []
        for key, item in obj.items():
            if type(key) is not str or not 0 < len(key) <= self.max_key_len:
                raise DecodeError(path, f"bad key {key!r}: expected a string of 1..{self.max_key_len} characters")
            pairs.append((key, self.value.from_wire(item, f"{path}.{key}")))
        if [k for k, _ in pairs] != sorted(k for k, _ in pairs):
            raise DecodeError(path, "map keys are not in sorted order (non-canonical)")
        return tuple(pairs)


def _pairs(value: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (tuple, list)) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return list(value)
    return None


@dataclass(frozen=True, slots=True)
class Maybe(FieldType):
    """A value or nil."""

    item: FieldType

    def to_wire(self, value: Any, path: str) -> Any:
        return None if value is None else self.item.to_wire(value, path)

    def from_wire(self, obj: Any, path: str) -> Any:
        return None if obj is None else self.item.from_wire(obj, path)


@dataclass(frozen=True, slots=True)
class Scalar(CheckedField):
    """One of int (signed 64-bit), finite float, bool, or short string.

    For open-ended parameter maps (kernel params), where the schema is owned
    by the consumer, not the wire layer.
    """

    max_str_len: int = 256


    def _check(self, value: Any, path: str, error: type[ValueError]) -> Any:
        if type(value) is bool:
            return value
        if type(value) is int:
            return Int(-(2**63), 2**63 - 1)._check(value, path, error)
        if type(value) is float:
            return Float()._check(value, path, error)
        if type(value) is str:
            return Text(self.max_str_len)._check(value, path, error)
        raise _err(error, path, f"expected int, float, bool or string, got {_type_name(value)}")


@dataclass(frozen=True, slots=True)
class Nested(FieldType):
    """An untagged nested record of a known class."""

    cls: type[Record]

    def to_wire(self, value: Any, path: str) -> Any:
        if type(value) is not self.cls:
            raise EncodeError(f"{path}: expected {self.cls.__name__}, got {_type_name(value)}")
        return value._to_wire(path)

    def from_wire(self, obj: Any, path: str) -> Any:
        return self.cls._from_wire(obj, path)


@dataclass(frozen=True, slots=True)
class OneOf(FieldType):
    """A nested tagged record: one of a :class:`RecordUnion`'s members."""

    union: RecordUnion[Any]

    def to_wire(self, value: Any, path: str) -> Any:
        return self.union._to_wire(value, path)

    def from_wire(self, obj: Any, path: str) -> Any:
        return self.union._from_wire(obj, path)


@dataclass(frozen=True, slots=True)
class Ext(FieldType):
    """A MessagePack extension value, converted by a pair of functions.

    ``pack`` turns a value into the ext payload bytes; ``unpack`` turns
    payload bytes back into a value and raises ``ValueError`` naming the
    problem when they are malformed.
    """

    code: int
    pack: Callable[[Any], bytes]
    unpack: Callable[[bytes], Any]
    max_len: int

    def to_wire(self, value: Any, path: str) -> Any:
        try:
            data = self.pack(value)
        except (TypeError, ValueError) as exc:
            raise EncodeError(f"{path}: {exc}") from exc
        return msgpack.ExtType(self.code, data)

    def from_wire(self, obj: Any, path: str) -> Any:
        if not isinstance(obj, msgpack.ExtType) or obj.code != self.code:
            raise DecodeError(path, f"expected extension type {self.code}, got {_type_name(obj)}")
        if len(obj.data) > self.max_len:
            raise DecodeError(path, f"extension payload of {len(obj.data)} bytes exceeds {self.max_len}")
        try:
            return self.unpack(obj.data)
        except (TypeError, ValueError) as exc:
            raise DecodeError(path, str(exc)) from exc


def _err(error: type[ValueError], path: str, reason: str) -> ValueError:
    if error is DecodeError:
        return DecodeError(path, reason)
    return error(f"{path}: {reason}")


# Common aliases, in the spirit of consensus-specs' small named types.
U8 = Annotated[int, Int(0, 2**8 - 1)]
U16 = Annotated[int, Int(0, 2**16 - 1)]
U32 = Annotated[int, Int(0, 2**32 - 1)]
U64 = Annotated[int, Int(0, 2**64 - 1)]
I64 = Annotated[int, Int(-(2**63), 2**63 - 1)]
Hash32 = Annotated[bytes, FixedBytes(32)]
Address = Annotated[bytes, FixedBytes(20)]


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


class Record:
    """Base of every wire record. Subclass with ``@record`` (frozen, slotted).

    Class attributes:
      ``TYPE_ID`` -- tag used when the record is a member of a union.
      ``MAX_BYTES`` -- largest encoding accepted by :func:`decode`.
    """

    TYPE_ID: ClassVar[int] = -1
    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_BYTES
    _fields_: ClassVar[tuple[tuple[str, FieldType], ...]] = ()

    def _to_wire(self, path: str = "") -> list[Any]:
        name = type(self).__name__
        prefix = f"{path}." if path else f"{name}."
        return [ftype.to_wire(getattr(self, fname), prefix + fname) for fname, ftype in self._fields_]

    @classmethod
    def _from_wire(cls, obj: Any, path: str = "") -> Any:
        path = path or cls.__name__
        if type(obj) is not list:
            raise DecodeError(path, f"expected an array of {len(cls._fields_)} fields, got {_type_name(obj)}")
        if len(obj) != len(cls._fields_):
            want = len(cls._fields_)
            if len(obj) < want:
                missing = cls._fields_[len(obj)][0]
                raise DecodeError(path, f"missing field '{missing}' ({len(obj)} of {want} fields)")
            raise DecodeError(path, f"{len(obj) - want} extra field(s) ({len(obj)} given, {want} expected)")
        values = {fname: ftype.from_wire(item, f"{path}.{fname}") for (fname, ftype), item in zip(cls._fields_, obj)}
        return cls(**values)

    def encode(self) -> bytes:
        return encode(self)


R = TypeVar("R", bound=Record)


@typing.dataclass_transform(frozen_default=True)
def record(cls: type[R]) -> type[R]:
    """Class decorator: make ``cls`` a frozen slotted dataclass with a wire schema."""
    dc = dataclass(frozen=True, slots=True)(cls)
    hints = typing.get_type_hints(dc, include_extras=True)
    fields: list[tuple[str, FieldType]] = []
    for f in dataclasses.fields(typing.cast(Any, dc)):  # a dataclass now; mypy sees only type[R]
        if not f.init:  # a memo the record keeps of itself (e.g. a hash), not part of its value
            continue
        fields.append((f.name, _field_type_of(hints[f.name], f"{dc.__name__}.{f.name}")))
    dc._fields_ = tuple(fields)
    return dc


def _field_type_of(hint: Any, where: str) -> FieldType:
    if typing.get_origin(hint) is Annotated:
        for meta in hint.__metadata__:
            if isinstance(meta, FieldType):
                return meta
    if isinstance(hint, type) and issubclass(hint, Record):
        return Nested(hint)
    if hint is bool:
        return Bool()
    raise TypeError(f"{where}: field needs a wire type, e.g. Annotated[int, Int(0, 10)]")


_PACKER_OPTS: dict[str, Any] = {"use_bin_type": True, "strict_types": True}


def _unpack(data: bytes, max_bytes: int) -> Any:
    if type(data) not in (bytes, bytearray, memoryview):
        raise DecodeError("", f"expected bytes, got {_type_name(data)}")
    if len(data) > max_bytes:
        raise DecodeError("", f"input of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except msgpack.ExtraData as exc:
        raise DecodeError("", "trailing bytes after the record") from exc
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise DecodeError("", f"malformed MessagePack: {exc}") from exc


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, **_PACKER_OPTS)
    return packed


def encode(value: Record) -> bytes:
    """Canonical bytes of an untagged record."""
    return _pack(value._to_wire())


def encode_with_encoded_list(value: Record, field_name: str, encoded_items: Sequence[bytes]) -> bytes:
    """Canonical bytes of ``value`` with its list field ``field_name`` (left empty in ``value``) holding the
    records whose canonical bytes are ``encoded_items``: byte for byte what :func:`encode` gives for the record
    with those items, without encoding them again (a MessagePack array is its header and its packed items).
    For a large record re-encoded often whose items mostly did not change (the ledger state, for its root)."""
    names = [fname for fname, _ in value._fields_]
    index = names.index(field_name)
    ftype = value._fields_[index][1]
    if not isinstance(ftype, ListOf):
        raise EncodeError(f"{type(value).__name__}.{field_name}: not a list field")
    if getattr(value, field_name):
        raise EncodeError(f"{type(value).__name__}.{field_name}: must be empty; its items are passed encoded")
    if not ftype.min_items <= len(encoded_items) <= ftype.max_items:
        raise EncodeError(f"{type(value).__name__}.{field_name}: expected {ftype.min_items}..{ftype.max_items} "
                          f"items, got {len(encoded_items)}")
    pieces = [_pack(w) for w in value._to_wire()]
    pieces[index] = array_header(len(encoded_items)) + b"".join(encoded_items)
    return array_header(len(pieces)) + b"".join(pieces)


def array_header(n: int) -> bytes:
    """The MessagePack header of an array of ``n`` items, in its shortest form (what ``encode`` writes):
    for splicing already-encoded items behind it (``encode_with_encoded_list``, ``/tx`` batches)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def decode(cls: type[R], data: bytes) -> R:
    """Decode canonical bytes of an untagged ``cls`` record, strictly."""
    obj = _unpack(data, cls.MAX_BYTES)
    value: R = cls._from_wire(obj)
    if encode(value) != bytes(data):
        raise DecodeError(cls.__name__, "non-canonical encoding (re-encoding differs)")
    return value


class RecordUnion(Generic[R]):
    """A closed set of tagged records: ``[TYPE_ID, field, ...]`` on the wire."""

    def __init__(self, name: str, members: Iterable[type[Record]], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.name = name
        self.max_bytes = max_bytes
        by_id: dict[int, type[Record]] = {}
        for cls in members:
            if cls.TYPE_ID < 0 or cls.TYPE_ID > 255:
                raise TypeError(f"{cls.__name__} needs a TYPE_ID in 0..255 to join union {name}")
            if cls.TYPE_ID in by_id:
                raise TypeError(f"{name}: TYPE_ID {cls.TYPE_ID} used by {by_id[cls.TYPE_ID].__name__} and {cls.__name__}")
            by_id[cls.TYPE_ID] = cls
        self._by_id: Mapping[int, type[Record]] = dict(by_id)
        self._members = frozenset(by_id.values())

    @property
    def members(self) -> tuple[type[Record], ...]:
        return tuple(self._by_id[k] for k in sorted(self._by_id))

    def __contains__(self, cls: object) -> bool:
        return cls in self._members

    def _to_wire(self, value: Any, path: str) -> list[Any]:
        if type(value) not in self._members:
            raise EncodeError(f"{path or self.name}: {_type_name(value)} is not a member of {self.name}")
        return [value.TYPE_ID, *value._to_wire(path)]

    def _from_wire(self, obj: Any, path: str) -> Any:
        path = path or self.name
        if type(obj) is not list or not obj:
            raise DecodeError(path, f"expected a tagged array [type, ...], got {_type_name(obj)}")
        tag = obj[0]
        if type(tag) is not int:
            raise DecodeError(path, f"type tag must be an integer, got {_type_name(tag)}")
        cls = self._by_id.get(tag)
        if cls is None:
            raise DecodeError(path, f"unknown {self.name} type {tag}")
        inner = f"{path}<{cls.__name__}>" if path != self.name else cls.__name__
        return cls._from_wire(obj[1:], inner)

    def encode(self, value: Record) -> bytes:
        return _pack(self._to_wire(value, ""))

    def decode(self, data: bytes) -> Any:
        obj = _unpack(data, self.max_bytes)
        value = self._from_wire(obj, "")
        if self.encode(value) != bytes(data):
            raise DecodeError(type(value).__name__, "non-canonical encoding (re-encoding differs)")
        return value
