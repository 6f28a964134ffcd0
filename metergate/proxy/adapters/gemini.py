"""Google Gemini's native API (``models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse``), for
the official ``google-genai`` SDK unchanged.

The model and whether the answer streams come from the path (:mod:`metergate.config.gemini`), never from the
body. Usage is ``usageMetadata`` (:func:`metergate.metering.usage.from_gemini`): in a whole answer, the body's;
in a stream, every chunk carries the *cumulative* counts so far, so the last one wins (never summed), and only
a chunk that finishes the answer (a candidate's ``finishReason``, or a blocked prompt) makes them final. A
stream cut before that is billed from the last counts seen and the text delivered, as any cut stream.

Gemini's tokenizer is not public: the prompt estimate is a tiktoken count inflated by
:data:`GEMINI_TOKEN_FACTOR`, plus images by Gemini's own rule (:func:`image_tokens`), and is marked inexact.
Thinking tokens never stream as text unless the client asks for thought summaries, so a budget over the
delivered text cannot bound them: a Gemini request's output is bounded upstream instead, through
``generationConfig.maxOutputTokens`` (:mod:`metergate.proxy.bounding`), which Gemini applies to thinking and
answer together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from metergate.config import gemini
from metergate.errors import google_error
from metergate.metering.media import image_size
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_gemini
from metergate.proxy.adapters.base import (
    Prepared,
    StreamMeter,
    Verdict,
    believed,
    load_json,
    looks_like_sse,
    meter_whole_stream,
)
from metergate.proxy.adapters.schema import check, check_model

GENERATE = gemini.GENERATE
GEMINI_TOKEN_FACTOR = 1.2  # Gemini's tokenizer, next to o200k, on mixed text: a margin, not a measurement
_PER_CONTENT_TOKENS = 4
# Gemini's image rule (ai.google.dev, "Image understanding", token calculation): an image with both sides
# at most 384 px is 258 tokens; a larger one is cropped and scaled into 768x768 tiles of 258 tokens each.
IMAGE_TOKENS = 258
_SMALL_IMAGE_PX = 384
_TILE_PX = 768
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


class GeminiEndpoint(str):
    """The endpoint name (``generate_content``) carrying the target it was classified from: the model and
    the stream flag reach :meth:`GeminiAdapter.prepare` this way, as an Azure deployment does."""

    target: gemini.Target

    def __new__(cls, target: gemini.Target) -> GeminiEndpoint:
        endpoint = super().__new__(cls, GENERATE)
        endpoint.target = target
        return endpoint


def image_tokens(width: int, height: int) -> int:
    if width <= _SMALL_IMAGE_PX and height <= _SMALL_IMAGE_PX:
        return IMAGE_TOKENS
    return IMAGE_TOKENS * -(-width // _TILE_PX) * -(-height // _TILE_PX)


def _part_tokens(part: dict[str, Any], count: Any) -> tuple[int, int]:
    """(text tokens, media tokens) of one part: text, an inline image, or anything else as its JSON."""
    if isinstance(part.get("text"), str):
        return count(part["text"]), 0
    inline = part.get("inlineData")
    if isinstance(inline, dict) and inline.get("mimeType") in _IMAGE_TYPES and isinstance(inline.get("data"), str):
        return 0, image_tokens(*image_size(inline["data"], inline["mimeType"]))
    return count(json.dumps(part, ensure_ascii=False)), 0  # audio, video, documents, files, function parts


def prepare(body: bytes, payload: dict[str, Any], default_max_output: int, *, model: str | None = None,
            stream: bool = False) -> Prepared:
    model = model or check_model(payload)
    request = check(GENERATE, payload, model=model)  # every field read below has its API's type
    count = counter_for(model).count_prompt
    text = media = 0
    contents = list(payload["contents"])
    if payload.get("systemInstruction") is not None:
        contents.append(payload["systemInstruction"])
    for content in contents:
        text += _PER_CONTENT_TOKENS
        for part in content["parts"]:
            part_text, part_media = _part_tokens(part, count)
            text, media = text + part_text, media + part_media
    for extra in ("tools", "toolConfig"):
        if payload.get(extra) is not None:
            text += count(json.dumps(payload[extra], ensure_ascii=False))
    estimate = int(text * GEMINI_TOKEN_FACTOR) + 1 + media
    per_answer = request.max_output or default_max_output
    return Prepared(GENERATE, model, stream, estimate, per_answer * request.choices, False, body,
                    output_capped=request.max_output is not None)


def _texts(candidates: Any, collect: Any) -> bool:
    """Collect the output text of ``candidates`` (answer, thought summaries, function calls); True if any."""
    found = False
    for candidate in candidates if isinstance(candidates, list) else ():
        content = candidate.get("content") if isinstance(candidate, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                collect(part["text"])
                found = True
            elif part.get("functionCall") is not None:
                collect(json.dumps(part["functionCall"], ensure_ascii=False))
                found = True
    return found


def _finishes(chunk: dict[str, Any]) -> bool:
    """A chunk that ends the answer: a candidate with its finish reason, or a prompt refused as blocked."""
    candidates = chunk.get("candidates")
    if isinstance(candidates, list) and any(isinstance(c, dict) and c.get("finishReason") is not None
                                            for c in candidates):
        return True
    feedback = chunk.get("promptFeedback")
    return isinstance(feedback, dict) and feedback.get("blockReason") is not None


def usage_from_body(prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        return None, ""
    usage = believed(from_gemini, payload.get("usageMetadata"), prepared.anomalies)
    if usage is not None:
        return usage, ""
    pieces: list[str] = []
    _texts(payload.get("candidates"), pieces.append)
    return None, "".join(pieces)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"  # Gemini's own framing


@dataclass(slots=True)
class GeminiStreamMeter(StreamMeter):
    finished: bool = False  # a chunk finished the answer: it and everything after wait for the settlement

    def on_event(self, data: bytes | None) -> Verdict:
        chunk = load_json(data) if data is not None else None
        if isinstance(chunk, dict):
            if _texts(chunk.get("candidates"), self.collect):
                self.content_events += 1
            self.finished = self.finished or _finishes(chunk)
            if chunk.get("usageMetadata") is not None:
                usage = self.believed(from_gemini, chunk["usageMetadata"])
                if usage is not None:
                    self.partial = usage  # cumulative so far: the last one wins
                    if self.finished:
                        self.usage = usage
        # Once the answer is finished every later event is held back too, so that the client gets them in order.
        return "final" if self.finished else "forward"

    def stop_events(self, usage: Usage, notice: dict[str, Any]) -> bytes:
        """A last chunk finishing the answer at ``MAX_TOKENS``, with the delivered counts and the notice."""
        return _sse({"candidates": [{"finishReason": "MAX_TOKENS", "index": 0}],
                     "usageMetadata": {"promptTokenCount": usage.input_tokens,
                                       "candidatesTokenCount": usage.output_tokens,
                                       "totalTokenCount": usage.total_tokens},
                     "metergate": notice})

    def error_event(self, code: str, message: str, status: int) -> bytes:
        return _sse(google_error(code, message, status))


class GeminiAdapter:
    name = "gemini"

    def __init__(self, *, upstream: str | None = None) -> None:
        self._with_version = gemini.versioned(upstream) if upstream is not None else True

    def classify(self, path: str) -> str | None:
        found = gemini.target(tuple(path[1:].split("/")), with_version=self._with_version)
        return GeminiEndpoint(found) if found is not None else None

    def prepare(self, endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared:
        # Without a target (a price quote naming the endpoint alone) the body's model is priced, unstreamed.
        target = endpoint.target if isinstance(endpoint, GeminiEndpoint) else None
        return prepare(body, payload, default_max_output, model=target.model if target else None,
                       stream=target.stream if target else False)

    def usage_from_body(self, prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
        if looks_like_sse(body):  # streamed although not asked to: metered as the stream it is
            return meter_whole_stream(self.stream_meter(prepared, len(body)), body)
        return usage_from_body(prepared, body)

    def stream_meter(self, prepared: Prepared, max_text_chars: int) -> StreamMeter:
        return GeminiStreamMeter(max_text_chars, anomalies=prepared.anomalies)

    def auth_header(self, key: str) -> tuple[str, str]:
        return "x-goog-api-key", key
