"""Length-prefixed frames for request/response streams: sans-I/O.

Wire format of one frame::

    u32 big-endian length L | u8 kind | L-1 bytes of payload

``L`` counts the kind byte plus the payload, so an empty DATA frame is
``00 00 00 01 00``. Kinds:

* ``DATA`` carries an opaque payload (a request, a response, one item of a
  stream);
* ``END`` says the sender will send nothing more on this stream (a
  graceful end, distinct from a reset or a dropped connection, which a
  half-close alone cannot tell apart from a crash);
* ``ERROR`` carries a UTF-8 reason: the remote handler failed.

A fixed u32 header (rather than a varint) lets the decoder check the size
limit after exactly four bytes, before buffering anything.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import FrameTooLarge, ProtocolError

HEADER = struct.Struct(">IB")
MAX_ERROR_TEXT = 512


class Kind(enum.IntEnum):
    DATA = 0
    END = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    payload: bytes = b""


def encode_frame(kind: Kind, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def encode_error(reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    return encode_frame(Kind.ERROR, text)


class FrameDecoder:
    """Feed bytes as they arrive; take complete frames out.

    ``where`` (e.g. ``"peer 12D3… on /p2pgpu/status/1"``) is put in every
    error message so a failure names who sent the bad bytes.
    """

    def __init__(self, max_frame_size: int, where: str = "") -> None:
        if max_frame_size < 1:
            raise ValueError(f"max_frame_size must be >= 1, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self.where = where
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from(">I", self._buffer)
            if length == 0:
                raise ProtocolError(f"empty frame (no kind byte) from {self.where}")
            if length - 1 > self.max_frame_size:
                raise FrameTooLarge(
                    f"frame of {length - 1} bytes from {self.where} exceeds the limit of {self.max_frame_size}"
                )
            if len(self._buffer) < 4 + length:
                break
            kind_byte = self._buffer[4]
            try:
                kind = Kind(kind_byte)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind_byte} from {self.where}") from None
            payload = bytes(self._buffer[5 : 4 + length])
            del self._buffer[: 4 + length]
            if kind is Kind.END and payload:
                raise ProtocolError(f"END frame with a payload from {self.where}")
            frames.append(Frame(kind, payload))
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)
