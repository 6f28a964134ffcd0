"""OpenAI's audio and image endpoints: what a request is held for and what its answer is billed.

Endpoints: ``/audio/transcriptions`` and ``/audio/translations`` (a multipart upload), ``/audio/speech``
(JSON in, audio out, or events with ``stream_format: "sse"``), ``/images/generations`` (JSON) and
``/images/edits`` (multipart). Each request is priced on one of two bases, chosen by its price rule:

* **per unit**, when the rule names the request's unit (:mod:`metergate.metering.media_units`): seconds of the
  upload, rounded up; characters of the speech input; images at the request's size and quality. The hold is
  the request's own count (``n`` images, ``len(input)`` characters, the duration read from the file's header,
  :mod:`metergate.metering.audio`); the charge is the provider's reported seconds (whisper-1's
  ``usage.seconds``, or ``verbose_json``'s ``duration``), else the measured duration, the characters sent,
  and the images the answer holds (at most ``n``).
* **per token**, for the models the provider bills by token (gpt-4o-transcribe, gpt-4o-mini-tts, gpt-image-1)
  when the rule names no unit: held from the prompt's tokens plus bounds for audio and output tokens
  (:class:`metergate.config.media.MediaSettings`), charged from the provider's ``usage``.

A rule that names neither for a model billed by unit (whisper-1, tts-1, dall-e-*) is refused before anything
is held (400 ``unpriced_unit``): a catch-all rule written for tokens would otherwise give the audio away.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal

from metergate.config.media import MediaSettings
from metergate.errors import BadRequest
from metergate.metering.audio import audio_duration_us
from metergate.metering.media import MediaError
from metergate.metering.media_units import AUDIO_SECONDS, CHARACTERS, image_quantity
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_openai_audio, from_openai_images, reported_seconds
from metergate.proxy.adapters.base import believed, load_json
from metergate.proxy.adapters.schema import check_media, image_family, typed_form
from metergate.proxy.multipart import Form, invalid, parse_form

TRANSCRIPTIONS, TRANSLATIONS, SPEECH = "audio.transcriptions", "audio.translations", "audio.speech"
IMAGES, IMAGE_EDITS = "images.generations", "images.edits"
_SUFFIXES = (("/audio/transcriptions", TRANSCRIPTIONS), ("/audio/translations", TRANSLATIONS),
             ("/audio/speech", SPEECH), ("/images/generations", IMAGES), ("/images/edits", IMAGE_EDITS))
MULTIPART = frozenset({TRANSCRIPTIONS, TRANSLATIONS, IMAGE_EDITS})
ENDPOINTS = frozenset(endpoint for _, endpoint in _SUFFIXES)
Basis = Literal["unit", "tokens"]
_MAX_STREAM_TEXT = 1_000_000  # characters of a streamed transcript kept to estimate from
# gpt-image-1's output tokens per image by quality and size (OpenAI's image generation guide, "Cost and
# latency"); quality "auto" is held as "high", size "auto" as the largest.
GPT_IMAGE_OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}


def classify(path: str) -> str | None:
    for suffix, endpoint in _SUFFIXES:
        if path.endswith(suffix):
            return endpoint
    return None


@dataclass(frozen=True, slots=True)
class MediaRequest:
    """What one media request asks for, checked: everything its hold and its charge are computed from."""

    endpoint: str
    model: str
    stream: bool  # the answer is an event stream (speech stream_format "sse", transcription stream true)
    prompt_tokens: int  # text the model reads: the prompt, the speech input and instructions
    seconds: int | None = None  # an upload's duration, rounded up; None: its header could not be read
    held_seconds: int = 0  # what the upload is held for (its duration, or the bound)
    characters: int = 0
    speed: Decimal = Decimal(1)
    images: int = 0  # n
    image_unit: str | None = None  # images_<size>_<quality>, when size and quality are both concrete
    uploads: int = 0  # images uploaded to an edit
    named: str | None = None  # the body's own ``model`` (an Azure v1 request's deployment)

    @property
    def unit(self) -> str | None:
        """The quantity a per-unit price rule names for this request."""
        if self.endpoint in (TRANSCRIPTIONS, TRANSLATIONS):
            return AUDIO_SECONDS
        if self.endpoint == SPEECH:
            return CHARACTERS
        return self.image_unit

    @property
    def token_billed(self) -> bool:
        """Whether the provider bills this model by token (so a rule with only token rates prices it)."""
        if self.endpoint in (TRANSCRIPTIONS, TRANSLATIONS):
            return not self.model.startswith("whisper")
        if self.endpoint == SPEECH:
            return not self.model.startswith("tts-")
        return image_family(self.model) == "gpt-image-1"

    @property
    def exact(self) -> bool:
        return self.endpoint not in (TRANSCRIPTIONS, TRANSLATIONS) or self.seconds is not None


async def read_request(endpoint: str, body: bytes, content_type: str, media: MediaSettings,
                       priced_as: Callable[[dict[str, Any]], str] | None = None) -> MediaRequest:
    """Parse and check a media request; 400 (``invalid_multipart``, ``invalid_request``, ``invalid_audio``) or
    413 ``file_too_large`` before anything is held. ``priced_as``: the model a request is priced as, from its
    checked fields, when the upstream decides it (an Azure deployment's model); else the body's ``model``."""
    payload, request = await _read(endpoint, body, content_type, media, priced_as)
    named = payload.get("model")
    return replace(request, named=named) if isinstance(named, str) else request


async def _read(endpoint: str, body: bytes, content_type: str, media: MediaSettings,
                priced_as: Callable[[dict[str, Any]], str] | None) -> tuple[dict[str, Any], MediaRequest]:
    form: Form | None = None
    if endpoint in MULTIPART:
        files = {"file": media.upload_audio_max_bytes} if endpoint != IMAGE_EDITS else {
            "image": media.upload_image_max_bytes, "image[]": media.upload_image_max_bytes,
            "mask": media.upload_image_max_bytes}
        form = await parse_form(body, content_type, files=files,
                                repeated=frozenset({"image[]", "timestamp_granularities[]", "include[]"}))
        payload = typed_form({name: values[0] for name, values in form.text.items()})
    else:
        payload = _json_object(body)
    model = check_media(endpoint, payload, model=priced_as(payload) if priced_as is not None else None)
    count = counter_for(model).count_prompt
    if endpoint in (TRANSCRIPTIONS, TRANSLATIONS):
        assert form is not None
        uploads = form.files.get("file") or []
        if len(uploads) != 1:
            raise invalid("a transcription needs exactly one file in the field 'file'", "file")
        raw = uploads[0].data
        if not raw:
            raise MediaError("Unreadable audio: the uploaded file is empty.", code="invalid_audio", param="file")
        micros = audio_duration_us(raw)
        seconds = None if micros is None or micros > media.audio_max_s * 1_000_000 else -(-micros // 1_000_000)
        return payload, MediaRequest(endpoint, model, payload.get("stream") is True, count(payload.get("prompt") or ""),
                                     seconds=seconds,
                                     held_seconds=seconds if seconds is not None else (
                                         media.upload_audio_max_s if micros is None else media.audio_max_s))
    if endpoint == SPEECH:
        text = payload["input"]
        speed = payload.get("speed")
        return payload, MediaRequest(endpoint, model, payload.get("stream_format") == "sse",
                                     count(text) + count(payload.get("instructions") or ""), characters=len(text),
                                     speed=Decimal(str(speed)) if speed is not None else Decimal(1))
    if payload.get("stream") is True:
        raise BadRequest("Streamed image generation is not metered by metergate; send the request without "
                         "'stream'.", code="invalid_request", param="stream")
    family = image_family(model)
    size = payload.get("size") or ("auto" if family == "gpt-image-1" else "1024x1024")
    quality = payload.get("quality") or ("auto" if family == "gpt-image-1" else "standard")
    uploaded = 0
    if form is not None:
        uploaded = len(form.files.get("image", [])) + len(form.files.get("image[]", []))
        if not uploaded:
            raise invalid("an image edit needs at least one file in the field 'image' (or 'image[]')", "image")
        if len(form.files.get("mask", [])) > 1:
            raise invalid("an image edit takes at most one mask", "mask")
    return payload, ImageRequest(endpoint, model, False, count(payload["prompt"]), images=payload.get("n") or 1,
                                 image_unit=image_quantity(size, quality) if "auto" not in (size, quality) else None,
                                 uploads=uploaded, size=size, quality=quality)


@dataclass(frozen=True, slots=True)
class ImageRequest(MediaRequest):
    """An image request also keeps its size and quality, which bound a token-priced model's output."""

    size: str = "1024x1024"
    quality: str = "standard"


def estimate(request: MediaRequest, basis: Basis, media: MediaSettings) -> Usage:
    """What the request is held for on ``basis``."""
    if basis == "unit":
        unit = request.unit
        assert unit is not None
        count = {AUDIO_SECONDS: request.held_seconds, CHARACTERS: request.characters}.get(unit, request.images)
        return Usage(units=((unit, count),) if count else (), source="estimated")
    if request.endpoint in (TRANSCRIPTIONS, TRANSLATIONS):
        audio = request.held_seconds * media.audio_tokens_per_s
        return Usage(input_tokens=audio + request.prompt_tokens,
                     output_tokens=request.held_seconds * media.transcript_tokens_per_s,
                     audio_input_tokens=audio, source="estimated")
    if request.endpoint == SPEECH:
        output = (Decimal(request.characters * media.speech_tokens_per_char) / request.speed).to_integral_value(
            ROUND_CEILING)
        return Usage(input_tokens=request.prompt_tokens, output_tokens=int(output), source="estimated")
    assert isinstance(request, ImageRequest)
    images_in = request.uploads * media.edit_image_tokens
    return Usage(input_tokens=request.prompt_tokens + images_in, image_input_tokens=images_in,
                 output_tokens=request.images * _image_output_tokens(request.size, request.quality),
                 source="estimated")


def _image_output_tokens(size: str, quality: str) -> int:
    table = GPT_IMAGE_OUTPUT_TOKENS["high" if quality not in GPT_IMAGE_OUTPUT_TOKENS else quality]
    return table.get(size, max(table.values()))


def charged_usage(request: MediaRequest, basis: Basis, held: Usage, body: bytes | None, reported: Any,
                  text: str, anomalies: list[str]) -> Usage:
    """What a served request is billed: ``body`` is a whole JSON answer (None for audio or a stream),
    ``reported`` the usage object a stream's last event carried, ``text`` what a stream delivered as text."""
    payload = load_json(body) if body is not None else None
    payload = payload if isinstance(payload, dict) else {}
    usage_field = payload.get("usage", reported)
    if request.endpoint in (TRANSCRIPTIONS, TRANSLATIONS):
        if basis == "unit":
            seconds = believed(reported_seconds, usage_field, anomalies)
            if seconds is None and not anomalies:
                seconds = believed(_duration_field, payload, anomalies)
            if seconds is not None:
                return _units(AUDIO_SECONDS, seconds, "provider")
            if request.seconds is not None:
                return _units(AUDIO_SECONDS, request.seconds, "measured")
            return held
        usage = believed(from_openai_audio, usage_field, anomalies)
        if usage is not None:
            return usage
        said = payload.get("text")
        transcript = said if isinstance(said, str) else text
        if body is not None and not payload:
            transcript = body.decode("utf-8", "replace")  # response_format text, srt or vtt
        return Usage(input_tokens=held.input_tokens, audio_input_tokens=held.audio_input_tokens,
                     output_tokens=counter_for(request.model).count(transcript), source="estimated")
    if request.endpoint == SPEECH:
        if basis == "unit":
            return _units(CHARACTERS, request.characters, "measured")
        usage = believed(from_openai_audio, reported, anomalies)
        return usage if usage is not None else held
    data = payload.get("data")
    delivered = min(len(data), request.images) if isinstance(data, list) else request.images
    if basis == "unit":
        assert request.image_unit is not None
        return _units(request.image_unit, delivered, "measured")
    usage = believed(from_openai_images, usage_field, anomalies)
    if usage is not None:
        return usage
    return Usage(input_tokens=held.input_tokens, image_input_tokens=held.image_input_tokens,
                 output_tokens=held.output_tokens * delivered // max(request.images, 1), source="estimated")


def _duration_field(payload: Any) -> int | None:
    return reported_seconds(payload, field="duration")


def _units(quantity: str, count: int, source: Literal["provider", "measured"]) -> Usage:
    return Usage(units=((quantity, count),) if count else (), source=source)


def stream_report(data: bytes | None, meter: dict[str, Any]) -> None:
    """Note what one event of a media stream says: the last ``usage`` (``speech.audio.done``,
    ``transcript.text.done``) and the transcript's text deltas (the estimate without usage)."""
    event = load_json(data) if data else None
    if not isinstance(event, dict):
        return
    if event.get("usage") is not None:
        meter["usage"] = event["usage"]
    if event.get("type") == "transcript.text.delta" and isinstance(event.get("delta"), str):
        text = meter.get("text", "")
        if len(text) < _MAX_STREAM_TEXT:
            meter["text"] = text + event["delta"][:_MAX_STREAM_TEXT - len(text)]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return payload
