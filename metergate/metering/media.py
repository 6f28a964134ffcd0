"""Input tokens of a prompt's images, audio and documents, by each provider's own rules.

A media part is read from its header only, with bounded work: image dimensions from the PNG, GIF, WebP or
JPEG header of the base64 data (only a prefix is decoded, except a JPEG whose frame header comes late),
an audio clip's duration from its WAV chunks or MP3 frame headers, a PDF's page count from its page
objects. Nothing declared is believed beyond sane limits: a WAV's data size is capped by the bytes
present, a clip by ``audio_max_s``, a PDF by ``pdf_max_pages``.

Decisions on hostile or unreadable input (stable codes, answered 400 before any hold):

* inline data that is not base64, or whose header is not the format it claims or one the API accepts:
  ``invalid_image``, ``invalid_audio``, ``invalid_document`` — the provider would refuse it too;
* media metergate cannot read without fetching it (an http(s) image URL, a file id, a PDF URL) or whose
  size it cannot see (a PDF whose pages hide in compressed object streams): held for the configured
  upper bound and the estimate marked inexact (``MediaTally.exact``).

Invariant: every estimate is a non-negative int, and no input makes the work exceed a constant number of
header reads plus one linear pass over the part's own bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

from metergate.config.media import MediaSettings
from metergate.errors import BadRequest

Provider = Literal["openai", "anthropic"]

# OpenAI's image rule (platform.openai.com/docs/guides/images-vision, "Calculating costs"): detail "low"
# costs the base tokens; "high" (and "auto", held as high) scales the image to fit 2048x2048, then its
# shortest side to 768, and adds the per-tile tokens for each 512 px tile. The base and tile tokens depend on
# the model (longest prefix wins; unknown models get gpt-4o's).
OPENAI_IMAGE_TOKENS: dict[str, tuple[int, int]] = {
    "gpt-4o-mini": (2833, 5667),
    "o1": (75, 150), "o3": (75, 150),
    "computer-use-preview": (65, 129),
}
OPENAI_DEFAULT_IMAGE_TOKENS = (85, 170)  # gpt-4o, gpt-4.1, gpt-4.5
# Anthropic's image rule (docs.anthropic.com/en/docs/build-with-claude/vision, "Evaluate image size"):
# tokens = width * height / 750, after an image whose long edge passes 1568 px, or whose cost passes ~1,600
# tokens (about 1.15-1.2 megapixels), is scaled down keeping its aspect ratio.
ANTHROPIC_MAX_EDGE_PX = 1568
ANTHROPIC_MAX_IMAGE_TOKENS = 1600
ANTHROPIC_PIXELS_PER_TOKEN = 750

MAX_DIMENSION_PX = 1 << 20  # no real image is a million pixels wide; anything larger is a lie
_PREFIX_BYTES = 64  # enough for the PNG, GIF and WebP headers
_JPEG_MAX_SEGMENTS = 1024  # markers walked before a JPEG without a frame header is refused
_WAV_MAX_CHUNKS = 64
_MP3_MAX_FRAMES = 200_000  # about 87 minutes at 1152 samples and 44.1 kHz: past it, estimate from the bitrate
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


class MediaError(BadRequest):
    """A media part metergate refuses (its code says which kind: invalid_image, invalid_audio, ...)."""


@dataclass(slots=True)
class MediaTally:
    """The media of one request: the rules it is estimated by, and whether every estimate was exact."""

    settings: MediaSettings
    provider: Provider
    model: str
    tokens: int = 0  # media tokens counted so far, in the provider's own units
    exact: bool = True  # False once any part was held for a configured bound instead of read

    def part(self, part: dict[str, Any]) -> int | None:
        """The tokens of a content part when it is media (and add them to :attr:`tokens`), else None."""
        tokens = self._part(part)
        if tokens is not None:
            assert tokens >= 0
            self.tokens += tokens
        return tokens

    def _part(self, part: dict[str, Any]) -> int | None:
        kind = part.get("type")
        if kind == "image_url":  # chat completions
            image = part.get("image_url")
            if isinstance(image, str):
                return self.image(image, None)
            if isinstance(image, dict):
                return self.image(image.get("url"), image.get("detail"))
            raise _invalid("image", "an image_url part needs image_url.url")
        if kind == "input_image":  # Responses
            if part.get("image_url") is None and part.get("file_id") is not None:
                return self.unread_image()
            return self.image(part.get("image_url"), part.get("detail"))
        if kind == "image":  # Anthropic
            return self._anthropic_source(part.get("source"), "image")
        if kind == "document":  # Anthropic
            return self._anthropic_source(part.get("source"), "document")
        if kind == "input_audio":  # chat completions
            audio = part.get("input_audio")
            if not isinstance(audio, dict):
                raise _invalid("audio", "an input_audio part needs input_audio.data and input_audio.format")
            return self.audio(audio.get("data"), audio.get("format"))
        if kind == "file":  # chat completions
            file = part.get("file")
            if not isinstance(file, dict):
                raise _invalid("document", "a file part needs file.file_data or file.file_id")
            return self._file(file.get("file_data"))
        if kind == "input_file":  # Responses
            return self._file(part.get("file_data"))
        return None

    # ------------------------------------------------------------------ images

    def image(self, url: Any, detail: Any) -> int:
        if not isinstance(url, str):
            raise _invalid("image", "an image needs a URL or a base64 data URL")
        if not url.startswith("data:"):
            return self.unread_image()
        media_type, data = _data_url(url, "image")
        return self.image_tokens(*image_size(data, media_type), detail)

    def image_tokens(self, width: int, height: int, detail: Any = None) -> int:
        if self.provider == "anthropic":
            return anthropic_image_tokens(width, height)
        return openai_image_tokens(width, height, detail, self.model)

    def unread_image(self) -> int:
        self.exact = False
        if self.settings.image_url_tokens is not None:
            return self.settings.image_url_tokens
        if self.provider == "anthropic":
            return ANTHROPIC_MAX_IMAGE_TOKENS
        base, tile = openai_image_rates(self.model)
        return base + 8 * tile  # the most tiles an image can have: 768 x 2048 is 2 x 4 tiles

    def _anthropic_source(self, source: Any, kind: Literal["image", "document"]) -> int:
        if not isinstance(source, dict):
            raise _invalid(kind, f"an {kind} block needs a source")
        how = source.get("type")
        if how == "base64":
            data = source.get("data")
            media_type = source.get("media_type")
            if not isinstance(data, str) or not isinstance(media_type, str):
                raise _invalid(kind, f"a base64 {kind} source needs data and media_type strings")
            if kind == "image":
                return self.image_tokens(*image_size(data, media_type))
            if media_type != "application/pdf":
                raise _invalid(kind, "a base64 document must be application/pdf")
            return self.pdf(data)
        if how in ("url", "file"):
            return self.unread_image() if kind == "image" else self.unread_pdf()
        if kind == "document" and how == "content":
            return self.unread_pdf()
        raise _invalid(kind, f"unsupported {kind} source type {how!r}")

    # ------------------------------------------------------------------ audio

    def audio(self, data: Any, audio_format: Any) -> int:
        """OpenAI ``input_audio``: ``audio_tokens_per_s`` for each second of the clip, rounded up."""
        if not isinstance(data, str) or audio_format not in ("wav", "mp3"):
            raise _invalid("audio", "input_audio needs base64 data and a format of 'wav' or 'mp3'")
        raw = _b64(data, "audio")
        micros = wav_duration_us(raw) if audio_format == "wav" else mp3_duration_us(raw)
        micros = min(micros, self.settings.audio_max_s * 1_000_000)
        return -(-micros * self.settings.audio_tokens_per_s // 1_000_000)

    # ------------------------------------------------------------------ documents

    def _file(self, file_data: Any) -> int:
        if file_data is None:
            return self.unread_pdf()  # a file id or URL: its pages are not here to count
        if not isinstance(file_data, str):
            raise _invalid("document", "file_data must be a base64 data URL")
        if file_data.startswith("data:"):
            media_type, data = _data_url(file_data, "document")
            if media_type != "application/pdf":
                raise _invalid("document", "file_data must be a PDF (data:application/pdf;base64,...)")
        else:
            data = file_data
        return self.pdf(data)

    def pdf(self, data: str) -> int:
        """``pdf_tokens_per_page`` for each page (always an estimate: what a page holds varies)."""
        self.exact = False
        pages = pdf_pages(_b64(data, "document"))
        if pages is None:
            return self.unread_pdf()
        return min(pages, self.settings.pdf_max_pages) * self.settings.pdf_tokens_per_page

    def unread_pdf(self) -> int:
        self.exact = False
        return self.settings.pdf_max_pages * self.settings.pdf_tokens_per_page


# ---------------------------------------------------------------------- provider rules


def openai_image_rates(model: str) -> tuple[int, int]:
    matches = [prefix for prefix in OPENAI_IMAGE_TOKENS if model.startswith(prefix)]
    return OPENAI_IMAGE_TOKENS[max(matches, key=len)] if matches else OPENAI_DEFAULT_IMAGE_TOKENS


def openai_image_tokens(width: int, height: int, detail: Any, model: str) -> int:
    """OpenAI's tile rule: low = base; otherwise fit in 2048x2048, shortest side to 768, 512 px tiles."""
    base, tile = openai_image_rates(model)
    if detail == "low":
        return base
    w, h = _fit(width, height, 2048)
    if min(w, h) > 768:
        # Integer ceiling division keeps the result exact and the same on every platform.
        w, h = (768, -(-h * 768 // w)) if w <= h else (-(-w * 768 // h), 768)
    return base + tile * (-(-w // 512)) * (-(-h // 512))


def anthropic_image_tokens(width: int, height: int) -> int:
    """Anthropic's rule: long edge at most 1568 px, at most ~1,600 tokens, then width * height / 750."""
    w, h = _fit(width, height, ANTHROPIC_MAX_EDGE_PX)
    return min(-(-w * h // ANTHROPIC_PIXELS_PER_TOKEN), ANTHROPIC_MAX_IMAGE_TOKENS)


def _fit(width: int, height: int, box: int) -> tuple[int, int]:
    """Scale down (never up) so that both sides are at most ``box``, keeping the aspect ratio."""
    if max(width, height) <= box:
        return width, height
    if width >= height:
        return box, max(1, height * box // width)
    return max(1, width * box // height), box


# ---------------------------------------------------------------------- headers


def image_size(data: str, media_type: str) -> tuple[int, int]:
    """(width, height) from the header of base64 image data, decoding only a prefix where the format allows."""
    head = _b64(data[:4 * (_PREFIX_BYTES // 3 + 1)], "image", prefix=True)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        size = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        size = struct.unpack("<HH", head[6:10])
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        size = _webp_size(head)
    elif head[:2] == b"\xff\xd8":
        size = _jpeg_size(_b64(data, "image"))
    else:
        raise _invalid("image", "the image is not a PNG, JPEG, GIF or WebP")
    width, height = size
    if not (1 <= width <= MAX_DIMENSION_PX and 1 <= height <= MAX_DIMENSION_PX):
        raise _invalid("image", f"the image header declares an impossible size ({width}x{height})")
    if media_type not in ("image/png", "image/jpeg", "image/gif", "image/webp"):
        raise _invalid("image", f"unsupported image type {media_type!r}")
    return width, height


def _webp_size(head: bytes) -> tuple[int, int]:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and head[20:21] == b"\x2f":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    raise _invalid("image", "the WebP header is not VP8, VP8L or VP8X")


def _jpeg_size(raw: bytes) -> tuple[int, int]:
    """Walk the JPEG's marker segments (bounded) to the first frame header (SOF0-SOF15 but DHT, JPG, DAC)."""
    at = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        while at < len(raw) and raw[at] == 0xFF and at + 1 < len(raw) and raw[at + 1] == 0xFF:
            at += 1  # fill bytes
        if at + 4 > len(raw) or raw[at] != 0xFF:
            break
        marker = raw[at + 1]
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            at += 2
            continue
        (length,) = struct.unpack(">H", raw[at + 2:at + 4])
        if length < 2:
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(raw):
                break
            height, width = struct.unpack(">HH", raw[at + 5:at + 9])
            return width, height
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        at += 2 + length
    raise _invalid("image", "the JPEG has no readable frame header")


def wav_duration_us(raw: bytes) -> int:
    """A WAV clip's duration in microseconds: its data chunk's size (capped by the bytes present) over the
    fmt chunk's byte rate."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise _invalid("audio", "the clip is not a RIFF WAVE file")
    at, byte_rate = 12, 0
    for _ in range(_WAV_MAX_CHUNKS):
        if at + 8 > len(raw):
            break
        chunk, size = raw[at:at + 4], struct.unpack("<I", raw[at + 4:at + 8])[0]
        if chunk == b"fmt " and size >= 16 and at + 24 <= len(raw):
            byte_rate = struct.unpack("<I", raw[at + 16:at + 20])[0]
        elif chunk == b"data":
            if byte_rate <= 0:
                break
            present: int = min(size, len(raw) - at - 8)  # a streamed WAV declares 0xFFFFFFFF
            return present * 1_000_000 // byte_rate
        at += 8 + size + (size & 1)
    raise _invalid("audio", "the WAV clip has no fmt chunk with a byte rate before its data chunk")


# MPEG audio frame header tables: bitrates (kbit/s) by version and layer, sample rates by version.
_MP3_BITRATES = {
    (1, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {1: (44100, 48000, 32000), 2: (22050, 24000, 16000), 25: (11025, 12000, 8000)}


def _mp3_frame(raw: bytes, at: int) -> tuple[int, int, int, int] | None:
    """(frame bytes, samples, sample rate, bitrate bit/s) of the frame header at ``at``, or None."""
    if at + 4 > len(raw) or raw[at] != 0xFF or raw[at + 1] & 0xE0 != 0xE0:
        return None
    version = {3: 1, 2: 2, 0: 25}.get((raw[at + 1] >> 3) & 3)
    layer = {3: 1, 2: 2, 1: 3}.get((raw[at + 1] >> 1) & 3)
    bitrate_index, rate_index = raw[at + 2] >> 4, (raw[at + 2] >> 2) & 3
    if version is None or layer is None or bitrate_index in (0, 15) or rate_index == 3:
        return None
    table = _MP3_BITRATES[(1, layer)] if version == 1 else _MP3_BITRATES[(2, 1 if layer == 1 else 2)]
    bitrate, rate, padding = table[bitrate_index] * 1000, _MP3_RATES[version][rate_index], (raw[at + 2] >> 1) & 1
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384, rate, bitrate
    samples = 1152 if layer == 2 or version == 1 else 576
    return samples // 8 * bitrate // rate + padding, samples, rate, bitrate


def mp3_duration_us(raw: bytes) -> int:
    """An MP3 clip's duration in microseconds: its frames walked from header to header (bounded), and any
    rest past the walk at the first frame's bitrate."""
    at = 0
    if raw[:3] == b"ID3" and len(raw) >= 10:  # ID3v2 tag: a syncsafe size
        size = (raw[6] & 0x7F) << 21 | (raw[7] & 0x7F) << 14 | (raw[8] & 0x7F) << 7 | (raw[9] & 0x7F)
        at = 10 + size
    first = _mp3_frame(raw, at)
    if first is None:
        raise _invalid("audio", "the MP3 clip has no frame header where its audio starts")
    micros = 0
    for _ in range(_MP3_MAX_FRAMES):
        frame = _mp3_frame(raw, at)
        if frame is None or frame[0] <= 0:
            break
        length, samples, rate, _ = frame
        micros += samples * 1_000_000 // rate
        at += length
    rest = max(0, len(raw) - at)
    if rest > 128:  # more than an ID3v1 tag left unwalked: estimate it from the first frame's bitrate
        micros += rest * 8 * 1_000_000 // first[3]
    return micros


def pdf_pages(raw: bytes) -> int | None:
    """A PDF's page count: its ``/Type /Page`` objects (one linear scan), else the largest ``/Count`` of a
    ``/Type /Pages`` node; None when neither is visible (pages inside compressed object streams)."""
    if not raw.startswith(b"%PDF-"):
        raise _invalid("document", "the document is not a PDF (no %PDF- header)")
    pages = len(_PDF_PAGE.findall(raw))
    if pages:
        return pages
    counts: list[int] = [int(m) for m in re.findall(rb"/Type\s*/Pages\b[^>]{0,200}?/Count\s+(\d{1,7})", raw)]
    return max(counts) if counts else None


# ---------------------------------------------------------------------- data


def _data_url(url: str, kind: str) -> tuple[str, str]:
    """(media type, base64 payload) of a ``data:<type>;base64,<data>`` URL."""
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64") or len(header) > 200:
        raise _invalid(kind, "a data URL must be data:<media type>;base64,<data>")
    return header[5:-7].lower(), data


def _b64(data: str, kind: str, *, prefix: bool = False) -> bytes:
    if prefix:
        data = data[:len(data) // 4 * 4] if len(data) >= 4 else data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(kind, f"the {kind} data is not valid base64") from None


def _invalid(kind: str, message: str) -> MediaError:
    return MediaError(f"Unreadable {kind}: {message}.", code=f"invalid_{kind}")
