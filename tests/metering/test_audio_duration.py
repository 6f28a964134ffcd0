"""An upload's duration from its container header: what a transcription is held for.

Method: files built here byte by byte from each container's specification (RIFF/WAVE, FLAC STREAMINFO, Ogg
pages with Opus and Vorbis heads, an MP4 ``moov/mvhd``, a Matroska ``Segment/Info``), each with a known
duration; a container that does not say how long it is must come back as ``None`` (held at the bound), never
as a guess and never as an error.
"""

from __future__ import annotations

import struct

import pytest

from metergate.metering.audio import audio_duration_us


def wav(seconds: float, rate: int = 8000) -> bytes:
    data = b"\x00" * int(rate * seconds) * 2
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def flac(rate: int, samples: int) -> bytes:
    packed = rate << 44 | 0 << 41 | 15 << 36 | samples  # 20 bits rate, 3 channels-1, 5 bps-1, 36 samples
    info = struct.pack(">HH", 4096, 4096) + b"\x00" * 6 + packed.to_bytes(8, "big") + b"\x00" * 16
    return b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info + b"\xff\xf8" + b"\x00" * 32


def ogg_page(granule: int, packet: bytes, header_type: int = 0) -> bytes:
    return (b"OggS" + bytes([0, header_type]) + struct.pack("<qIII", granule, 1, 0, 0) + bytes([1, len(packet)])
            + packet)


def opus(seconds: int, pre_skip: int = 312) -> bytes:
    head = b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", pre_skip, 48_000, 0, 0)
    return ogg_page(0, head, 2) + ogg_page(0, b"OpusTags" + b"\x00" * 8) + ogg_page(
        48_000 * seconds + pre_skip, b"\x00" * 100, 4)


def vorbis(seconds: int, rate: int = 44_100) -> bytes:
    head = b"\x01vorbis" + struct.pack("<IBIiiiBB", 0, 2, rate, 0, 128_000, 0, 0xB8, 1)
    return ogg_page(0, head, 2) + ogg_page(rate * seconds, b"\x00" * 100, 4)


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def mp4(timescale: int, duration: int, version: int = 0) -> bytes:
    if version == 0:
        mvhd = bytes([0, 0, 0, 0]) + struct.pack(">IIII", 0, 0, timescale, duration) + b"\x00" * 80
    else:
        mvhd = bytes([1, 0, 0, 0]) + struct.pack(">QQIQ", 0, 0, timescale, duration) + b"\x00" * 80
    return box(b"ftyp", b"M4A \x00\x00\x00\x00isom") + box(b"moov", box(b"mvhd", mvhd)) + box(b"mdat", b"\x00" * 64)


def ebml(element: int, body: bytes) -> bytes:
    ident = element.to_bytes((element.bit_length() + 7) // 8, "big")
    return ident + (0x0100000000000000 | len(body)).to_bytes(8, "big") + body  # an 8-byte size


def webm(duration_ms: float | None, *, cluster_first: bool = False) -> bytes:
    header = ebml(0x1A45DFA3, ebml(0x4282, b"webm"))
    info = ebml(0x2AD7B1, (1_000_000).to_bytes(3, "big"))
    if duration_ms is not None:
        info += ebml(0x4489, struct.pack(">d", duration_ms))
    children = ebml(0x1549A966, info) + ebml(0x1F43B675, b"\x00" * 16)
    if cluster_first:
        children = b"\x1f\x43\xb6\x75\x01\xff\xff\xff\xff\xff\xff\xff" + b"\x00" * 16
    return header + b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff" + children  # a live segment's unknown size


@pytest.mark.parametrize(("raw", "micros"), [
    # containers that say how long they play
    (wav(2.5), 2_500_000),
    (flac(44_100, 44_100 * 3), 3_000_000),
    (flac(48_000, 1), 20),  # one sample, rounded down to whole microseconds
    (opus(2), 2_000_000),  # the granule counts 48 kHz samples, less the pre-skip
    (vorbis(4), 4_000_000),
    (mp4(1000, 12_345), 12_345_000),
    (mp4(44_100, 44_100 * 61, version=1), 61_000_000),
    (webm(5000.0), 5_000_000),
])
def test_a_container_that_says_its_duration_is_measured(raw: bytes, micros: int) -> None:
    assert audio_duration_us(raw) == micros


@pytest.mark.parametrize("raw", [
    # containers that do not know their length, or are not audio at all: held at the bound
    flac(44_100, 0),  # a stream written before its length was known
    flac(44_100, 100)[:20],  # truncated STREAMINFO
    webm(None),  # a MediaRecorder upload: no Duration element
    webm(5000.0, cluster_first=True),  # media before any Info
    ogg_page(0, b"\x80theora" + b"\x00" * 40, 2),  # an Ogg stream that is not Opus or Vorbis
    box(b"ftyp", b"M4A ") + box(b"mdat", b"\x00" * 64),  # an MP4 without moov
    b"RIFF\x00\x00\x00\x00WAVEdata",  # a WAV without fmt
    b"%PDF-1.7 not audio",
    b"\xff",
])
def test_a_container_that_does_not_is_unmeasured(raw: bytes) -> None:
    assert audio_duration_us(raw) is None
