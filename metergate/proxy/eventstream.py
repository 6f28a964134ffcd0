"""The AWS event-stream framing (``application/vnd.amazon.eventstream``), read incrementally and written.

A message is::

    total length (uint32) | headers length (uint32) | prelude CRC32 (of the 8 bytes before it)
    headers               | payload                 | message CRC32 (of every byte before it)

all big-endian; each header is a 1-byte name length, the name, a 1-byte value type and the value
(strings and byte arrays carry a 2-byte length). Bedrock's ConverseStream sends one message per event,
named by its ``:event-type`` header (``messageStart``, ``contentBlockDelta``, ``messageStop``,
``metadata``...), with the event's JSON as payload; an error mid-stream is a message whose
``:message-type`` is ``exception``.

The upstream is hostile like any input: :class:`FrameBuffer` never holds more than one frame of at most
``max_frame_bytes``, checks both CRCs and every length before trusting it, and raises :class:`BadFrame`
(never anything else) on a frame it does not believe. Each frame it returns carries its exact bytes, so a
relay passes frames on unchanged.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

PRELUDE_BYTES = 12
_CRC_BYTES = 4
MIN_FRAME_BYTES = PRELUDE_BYTES + _CRC_BYTES
_HEADERS_MAX_BYTES = 128 * 1024  # the format's own bound on a message's headers
# Value type -> fixed size of its value (None: a 2-byte length, then the bytes).
_SIZES: dict[int, int | None] = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 6: None, 7: None, 8: 8, 9: 16}
HeaderValue = bool | int | bytes | str | uuid.UUID


class BadFrame(ValueError):
    """A frame that breaks the format: a CRC mismatch, a length out of bounds, malformed headers."""


@dataclass(frozen=True, slots=True)
class Frame:
    raw: bytes  # the whole message, exactly as it arrived
    headers: dict[str, HeaderValue]
    payload: bytes

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if isinstance(value, str) else None

    @property
    def event_type(self) -> str | None:
        return self.header(":event-type")

    @property
    def is_exception(self) -> bool:
        return self.header(":message-type") in ("exception", "error")


class FrameBuffer:
    """Bytes in, whole verified frames out; at most one frame (``max_frame_bytes``) is ever buffered."""

    def __init__(self, max_frame_bytes: int) -> None:
        if max_frame_bytes < MIN_FRAME_BYTES:
            raise ValueError("max_frame_bytes is smaller than the smallest frame")
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self.error: BadFrame | None = None  # the first bad frame: nothing after it is read

    def feed(self, chunk: bytes) -> list[Frame]:
        """The good frames ``chunk`` completes, up to the first bad one, which sets :attr:`error` (its prelude
        is judged as soon as it is whole, so an oversized length is refused before its bytes are waited for).
        After an error, every feed returns nothing."""
        if self.error is not None:
            return []
        self._buffer += chunk
        frames: list[Frame] = []
        try:
            while len(self._buffer) >= PRELUDE_BYTES:
                total, headers_length = _prelude(bytes(self._buffer[:PRELUDE_BYTES]), self._max)
                if len(self._buffer) < total:
                    break
                raw = bytes(self._buffer[:total])
                del self._buffer[:total]
                frames.append(_frame(raw, headers_length))
        except BadFrame as bad:
            self.error = bad
            self._buffer.clear()
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet whole (non-zero when a stream ends: the upstream cut a frame short)."""
        return len(self._buffer)


def _prelude(prelude: bytes, max_frame_bytes: int) -> tuple[int, int]:
    total, headers_length, crc = struct.unpack(">III", prelude)
    if zlib.crc32(prelude[:8]) != crc:
        raise BadFrame("prelude CRC mismatch")
    if not MIN_FRAME_BYTES <= total <= max_frame_bytes:
        raise BadFrame(f"frame length {total} outside [{MIN_FRAME_BYTES}, {max_frame_bytes}]")
    if headers_length > min(_HEADERS_MAX_BYTES, total - MIN_FRAME_BYTES):
        raise BadFrame(f"headers length {headers_length} does not fit the frame")
    return total, headers_length


def _frame(raw: bytes, headers_length: int) -> Frame:
    (crc,) = struct.unpack(">I", raw[-_CRC_BYTES:])
    if zlib.crc32(raw[:-_CRC_BYTES]) != crc:
        raise BadFrame("message CRC mismatch")
    headers = _headers(raw[PRELUDE_BYTES:PRELUDE_BYTES + headers_length])
    return Frame(raw, headers, raw[PRELUDE_BYTES + headers_length:-_CRC_BYTES])


def _headers(data: bytes) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    at = 0
    try:
        while at < len(data):
            name_length = data[at]
            name = data[at + 1:at + 1 + name_length].decode("utf-8")
            at += 1 + name_length
            kind = data[at]
            at += 1
            if kind not in _SIZES:
                raise BadFrame(f"unknown header value type {kind}")
            size = _SIZES[kind]
            if size is None:
                (size,) = struct.unpack(">H", data[at:at + 2])
                at += 2
            value = data[at:at + size]
            if len(value) != size or not name_length or len(name.encode()) != name_length:
                raise BadFrame("a header runs past the headers")
            at += size
            headers[name] = _value(kind, value)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise BadFrame("malformed headers") from None
    return headers


def _value(kind: int, value: bytes) -> HeaderValue:
    if kind in (0, 1):
        return kind == 0
    if kind in (2, 3, 4, 5, 8):
        return int.from_bytes(value, "big", signed=True)
    if kind == 6:
        return value
    if kind == 7:
        return value.decode("utf-8")
    return uuid.UUID(bytes=value)


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One message with string-valued ``headers`` and ``payload``, both CRCs computed."""
    encoded = bytearray()
    for name, value in headers.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        encoded += bytes([len(name_bytes)]) + name_bytes + b"\x07" + struct.pack(">H", len(value_bytes)) + value_bytes
    total = PRELUDE_BYTES + len(encoded) + len(payload) + _CRC_BYTES
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + bytes(encoded) + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, payload: bytes) -> bytes:
    """An event message as Bedrock sends them."""
    return encode_frame({":event-type": event_type, ":content-type": "application/json",
                         ":message-type": "event"}, payload)


def exception_frame(exception_type: str, payload: bytes) -> bytes:
    """An exception message (the AWS SDKs raise it as the stream's error)."""
    return encode_frame({":exception-type": exception_type, ":content-type": "application/json",
                         ":message-type": "exception"}, payload)
