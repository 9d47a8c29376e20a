"""Read a few named members out of an untrusted zip, trusting none of its headers.

Python's :mod:`zipfile` parses the central directory for us; everything after
that is done here, from the raw bytes, so each hostile trick gets its own
refusal instead of a generic ``BadZipFile`` (or a full disk):

* a member name that is absolute, has ``..`` or empty components, a drive or
  a backslash, repeats, or is not one the caller expects
  (:class:`UnsafeArchiveMember`);
* declared uncompressed sizes over the caller's limits, per member and in
  total, refused before anything is inflated (:class:`ArchiveTooLarge`);
* members whose data ranges overlap (the "better zip bomb" that makes one
  compressed kernel count many times) (:class:`ArchiveTooLarge`);
* a member that inflates to more or fewer bytes than its header says; the
  inflater is stopped one byte past the declared size, so a lie costs at most
  that (:class:`ArchiveSizeMismatch`);
* a cut-short archive, a local header that disagrees with the directory, a
  bad CRC, encryption, or a compression method other than stored/deflate
  (:class:`TruncatedArchive`).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass

from kernels.errors import ArchiveSizeMismatch, ArchiveTooLarge, TruncatedArchive, UnsafeArchiveMember

__all__ = ["ZIP_MAGIC", "ZipLimits", "check_member_name", "is_zip", "member_names", "read_zip_members"]

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


@dataclass(frozen=True, slots=True)
class ZipLimits:
    """How much of an archive we are willing to inflate."""

    members: int = 16
    member_bytes: int = 1 << 30
    total_bytes: int = 1 << 30


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGIC


def check_member_name(name: str) -> None:
    """Refuse a member name that could point outside the archive's own namespace."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or (len(name) > 1 and name[1] == ":")
            or any(part in ("", ".", "..") for part in parts)):
        raise UnsafeArchiveMember(f"zip member name {name!r} escapes the archive (absolute, '..', or not a plain path)")


def _open_directory(data: bytes) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise TruncatedArchive(f"not a readable zip archive (truncated or corrupt): {exc}") from exc


def member_names(data: bytes) -> list[str]:
    """The names in the archive's central directory (nothing is inflated)."""
    return [info.filename for info in _open_directory(data)]


def _data_span(data: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(start, end) of a member's compressed bytes, read from its local header."""
    start = info.header_offset
    header = data[start:start + _LOCAL_HEADER.size]
    if len(header) < _LOCAL_HEADER.size:
        raise TruncatedArchive(f"zip member {info.filename!r}: local header cut short")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIGNATURE:
        raise TruncatedArchive(f"zip member {info.filename!r}: no local header at offset {start}")
    name_len, extra_len = fields[9], fields[10]
    name_at = start + _LOCAL_HEADER.size
    local_name = data[name_at:name_at + name_len]
    if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise UnsafeArchiveMember(f"zip member {info.filename!r}: local header names {local_name!r}")
    begin = name_at + name_len + extra_len
    end = begin + info.compress_size
    if end > len(data):
        raise TruncatedArchive(f"zip member {info.filename!r}: {info.compress_size} compressed bytes declared, "
                               f"the archive ends {end - len(data)} bytes early")
    return start, end


def _inflate(info: zipfile.ZipInfo, raw: bytes) -> bytes:
    declared = info.file_size
    if info.compress_type == zipfile.ZIP_STORED:
        out = raw
    else:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = inflater.decompress(raw, declared + 1)
        except zlib.error as exc:
            raise TruncatedArchive(f"zip member {info.filename!r}: corrupt deflate data: {exc}") from exc
        if len(out) <= declared and not inflater.eof:
            raise TruncatedArchive(f"zip member {info.filename!r}: deflate stream cut short")
    if len(out) != declared:
        more = "more" if len(out) > declared else "fewer"
        raise ArchiveSizeMismatch(f"zip member {info.filename!r} holds {more} bytes than the {declared} its header declares")
    if zlib.crc32(out) != info.CRC:
        raise TruncatedArchive(f"zip member {info.filename!r}: CRC mismatch (corrupt data)")
    return out


def read_zip_members(data: bytes, allowed: Collection[str], limits: ZipLimits) -> dict[str, bytes]:
    """Every member of the archive in ``data``, by name; each name must be in ``allowed``.

    The caller checks which members it needs; this refuses any it did not name.
    """
    infos = _open_directory(data)
    seen: set[str] = set()
    total = 0
    for info in infos:
        check_member_name(info.filename)
        if info.filename in seen:
            raise UnsafeArchiveMember(f"zip member {info.filename!r} appears twice")
        seen.add(info.filename)
        if info.filename not in allowed:
            raise UnsafeArchiveMember(f"unexpected zip member {info.filename!r} (expected only {sorted(allowed)})")
        if info.flag_bits & 0x1:
            raise TruncatedArchive(f"zip member {info.filename!r} is encrypted")
        if info.compress_type not in _METHODS:
            raise TruncatedArchive(f"zip member {info.filename!r}: compression method {info.compress_type} "
                                   "is not stored or deflate")
        if info.file_size > limits.member_bytes:
            raise ArchiveTooLarge(f"zip member {info.filename!r} declares {info.file_size} bytes, "
                                  f"limit is {limits.member_bytes}")
        total += info.file_size
        if total > limits.total_bytes:
            raise ArchiveTooLarge(f"zip members declare more than {limits.total_bytes} bytes in total")
    if len(infos) > limits.members:
        raise ArchiveTooLarge(f"zip archive has {len(infos)} members, limit is {limits.members}")
    spans = sorted((_data_span(data, info), info.filename) for info in infos)
    for (first, name), (second, other) in zip(spans, spans[1:]):
        if second[0] < first[1]:
            raise ArchiveTooLarge(f"zip members {name!r} and {other!r} overlap (a zip bomb reuses data this way)")
    out: dict[str, bytes] = {}
    for info in infos:
        start, end = _data_span(data, info)
        raw = data[end - info.compress_size:end]
        out[info.filename] = _inflate(info, raw)
    return out
