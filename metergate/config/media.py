"""The settings of multimodal estimates: what a prompt's images, audio and documents are held for.

The rules themselves (OpenAI's tiles, Anthropic's pixels, audio seconds, PDF pages) live in
:mod:`metergate.metering.media`; these are the numbers a deployment may change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MULTIMODAL_PATH_SUFFIXES = ("/chat/completions", "/responses", "/messages", "/messages/count_tokens",
                            "/responses/input_tokens", "/converse", "/converse-stream")


class MediaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    audio_tokens_per_s: int = Field(
        10, ge=1, le=10_000,
        description="Input tokens per second of an input_audio clip. OpenAI bills gpt-4o audio input at one "
                    "token per 100 ms (10 a second, the Realtime and audio-preview models' rule).")
    pdf_tokens_per_page: int = Field(
        4600, ge=1, le=1_000_000,
        description="Input tokens per PDF page. Anthropic sends each page as text and as an image: 1,500-3,000 "
                    "text tokens a page (its PDF support docs) plus a page image at its ~1,600-token cap; the "
                    "default takes the upper end, 3,000 + 1,600. OpenAI's file inputs also send text and an "
                    "image per page.")
    pdf_max_pages: int = Field(
        100, ge=1, le=100_000,
        description="Most pages a PDF is held for (Anthropic accepts up to 100 pages a request); also the "
                    "estimate of a PDF whose pages cannot be counted (a file id, a URL, compressed object "
                    "streams), marked inexact.")
    image_url_tokens: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Tokens an image given by http(s) URL or file id is held for (metergate never fetches it), "
                    "marked inexact. Unset: the provider's largest image for the model (OpenAI gpt-4o: 8 tiles, "
                    "1,445 tokens; Anthropic: 1,600).")
    audio_max_s: int = Field(
        3600, ge=1, le=86_400,
        description="Longest clip believed: a clip whose header or bytes say more is held "
                    "for this many seconds.")
    upload_audio_max_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="Largest audio file a transcription or translation may upload (OpenAI's limit: 25 MB); "
                    "a larger one is refused with 413 file_too_large.")
    upload_audio_max_s: int = Field(
        1500, ge=1, le=86_400,
        description="What an upload whose duration cannot be read from its header is held for, in seconds "
                    "(marked inexact); 25 minutes is about what OpenAI's 25 MB limit holds at a low bitrate. "
                    "A readable upload is held for its own duration, up to audio_max_s.")
    upload_image_max_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="Largest image (or mask) an image edit may upload (gpt-image-1: 50 MB; dall-e-2: 4 MB).")
    transcript_tokens_per_s: int = Field(
        8, ge=1, le=10_000,
        description="Output tokens a token-priced transcription (gpt-4o-transcribe) is held for per second of "
                    "audio: speech runs at 2-4 words a second.")
    speech_tokens_per_char: int = Field(
        2, ge=1, le=10_000,
        description="Output (audio) tokens a token-priced speech request (gpt-4o-mini-tts) is held for per "
                    "input character, at speed 1 (a slower speed holds proportionally more).")
    edit_image_tokens: int = Field(
        1600, ge=1, le=1_000_000,
        description="Input tokens each uploaded image of a token-priced image edit (gpt-image-1) is held for.")


def is_multimodal_path(path: str) -> bool:
    """True for the endpoints whose requests may carry images, audio or documents inline (base64)."""
    return path.endswith(MULTIMODAL_PATH_SUFFIXES)
