"""How long an uploaded audio file plays, read from its container's header: what a transcription is held for.

The container is recognised by its magic bytes, never by the file name or the declared type: WAV (RIFF
chunks), MP3 (frame headers; :mod:`metergate.metering.media`), FLAC (STREAMINFO's sample count), Ogg
Vorbis and Opus (the last page's granule position), MP4/M4A (the ``mvhd`` box) and WebM/Matroska (the
segment's ``Info`` duration). Every walk is bounded in steps and bytes. A file none of these can measure
(an unknown container, a live-recorded WebM without a duration, a truncated header) has no duration here:
the caller holds it at its bound and marks the estimate inexact, and never refuses it for that alone,
since the provider may still read it.
"""

from __future__ import annotations

import struct

from metergate.metering.media import MediaError, mp3_duration_us, wav_duration_us

_MAX_BOXES = 256  # MP4 boxes walked at one level
_MAX_ELEMENTS = 512  # Matroska elements walked before the Info element is given up on
_OGG_TAIL = 65_536 + 282  # the last Ogg page starts within its maximum size of the end


def audio_duration_us(raw: bytes) -> int | None:
    """The file's duration in microseconds, or ``None`` when its container cannot be measured."""
    try:
        if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
            return wav_duration_us(raw)
        if raw[:4] == b"fLaC":
            return _flac(raw)
        if raw[:4] == b"OggS":
            return _ogg(raw)
        if raw[4:8] == b"ftyp":
            return _mp4(raw)
        if raw[:4] == b"\x1a\x45\xdf\xa3":
            return _matroska(raw)
        if raw[:3] == b"ID3" or (len(raw) > 1 and raw[0] == 0xFF and raw[1] & 0xE0 == 0xE0):
            return mp3_duration_us(raw)
    except (MediaError, struct.error, IndexError, ValueError, OverflowError):
        return None
    return None


def _flac(raw: bytes) -> int | None:
    """STREAMINFO is the first metadata block: 20 bits of sample rate, then 36 bits of total samples."""
    if len(raw) < 8 + 34 or raw[4] & 0x7F != 0:
        return None
    info = raw[8:8 + 34]
    rate = info[10] << 12 | info[11] << 4 | info[12] >> 4
    samples: int = (info[13] & 0x0F) << 32 | struct.unpack(">I", info[14:18])[0]
    if rate <= 0 or samples <= 0:
        return None  # a stream that did not know its length when it was written
    return samples * 1_000_000 // rate


def _ogg(raw: bytes) -> int | None:
    """The last page's granule position, in samples at the codec's rate (Opus: 48 kHz, less its pre-skip)."""
    segments = raw[26] if len(raw) > 26 else 0
    packet = raw[27 + segments:27 + segments + 32]
    rate: int
    skip: int
    if packet[:8] == b"OpusHead" and len(packet) >= 12:
        rate, skip = 48_000, struct.unpack("<H", packet[10:12])[0]
    elif packet[:7] == b"\x01vorbis" and len(packet) >= 16:
        rate, skip = struct.unpack("<I", packet[12:16])[0], 0
    else:
        return None
    last = raw.rfind(b"OggS", max(0, len(raw) - _OGG_TAIL))
    if last < 0 or last + 14 > len(raw):
        return None
    granule: int = struct.unpack("<q", raw[last + 6:last + 14])[0]
    if rate <= 0 or granule <= skip:
        return None
    return (granule - skip) * 1_000_000 // rate


def _mp4_boxes(raw: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, body start, body end) of the boxes in ``raw[start:end]``, bounded."""
    boxes: list[tuple[bytes, int, int]] = []
    at = start
    while at + 8 <= end and len(boxes) < _MAX_BOXES:
        size, kind = struct.unpack(">I", raw[at:at + 4])[0], raw[at + 4:at + 8]
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", raw[at + 8:at + 16])[0], 16
        elif size == 0:
            size = end - at
        if size < header:
            break
        boxes.append((kind, at + header, min(at + size, end)))
        at += size
    return boxes


def _mp4(raw: bytes) -> int | None:
    """``moov/mvhd``: the movie's duration over its timescale."""
    for kind, start, end in _mp4_boxes(raw, 0, len(raw)):
        if kind != b"moov":
            continue
        for inner, body, _ in _mp4_boxes(raw, start, end):
            if inner != b"mvhd":
                continue
            if raw[body] == 1:
                scale, duration = struct.unpack(">IQ", raw[body + 20:body + 32])
            else:
                scale, duration = struct.unpack(">II", raw[body + 12:body + 20])
            return duration * 1_000_000 // scale if scale > 0 and duration > 0 else None
    return None


def _vint(raw: bytes, at: int, *, keep_marker: bool) -> tuple[int, int]:
    """A Matroska variable-length integer at ``at``: (value, length); an ID keeps its marker bit."""
    first = raw[at]
    length = 9 - first.bit_length() if first else 9
    if length > 8:
        raise ValueError("invalid EBML variable-length integer")
    value = first if keep_marker else first & (0xFF >> length)
    for byte in raw[at + 1:at + length]:
        value = value << 8 | byte
    if len(raw) < at + length:
        raise ValueError("truncated EBML integer")
    return value, length


_UNKNOWN_SIZE = {(1 << (7 * n)) - 1 for n in range(1, 9)}
_SEGMENT, _INFO, _CLUSTER = 0x18538067, 0x1549A966, 0x1F43B675
_TIMECODE_SCALE, _DURATION = 0x2AD7B1, 0x4489


def _matroska(raw: bytes) -> int | None:
    """``Segment/Info/Duration`` (a float, in units of ``TimecodeScale`` nanoseconds, by default 1 ms)."""
    at, walked = 0, 0
    while at < len(raw) and walked < _MAX_ELEMENTS:
        walked += 1
        element, id_length = _vint(raw, at, keep_marker=True)
        size, size_length = _vint(raw, at + id_length, keep_marker=False)
        body = at + id_length + size_length
        if element == _SEGMENT:
            at = body  # descend: the Info element is among the segment's first children
            continue
        if element == _CLUSTER or size in _UNKNOWN_SIZE:
            return None  # media before any Info: nothing says how long it is
        if element == _INFO:
            return _matroska_info(raw[body:body + size])
        at = body + size
    return None


def _matroska_info(info: bytes) -> int | None:
    at, scale, duration = 0, 1_000_000, None
    while at < len(info):
        element, id_length = _vint(info, at, keep_marker=True)
        size, size_length = _vint(info, at + id_length, keep_marker=False)
        value = info[at + id_length + size_length:at + id_length + size_length + size]
        if element == _TIMECODE_SCALE and 1 <= size <= 8:
            scale = int.from_bytes(value, "big")
        elif element == _DURATION and size in (4, 8):
            duration = struct.unpack(">f" if size == 4 else ">d", value)[0]
        at += id_length + size_length + size
    if duration is None or not 0 < duration < 1e15 or scale <= 0:
        return None
    # The header stores a float; it is a measurement, turned into whole microseconds once, here.
    return int(duration * scale) // 1000
