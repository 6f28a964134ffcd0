"""Anthropic Messages (``/v1/messages``), JSON and streaming, for the official ``anthropic`` SDK unchanged.

Usage: the JSON body's ``usage``; in a stream, ``message_start`` carries the input counts and
``message_delta`` events carry *cumulative* counts — the last one wins, they are never summed, and
``message_start`` is the fallback when a stream is cut before any ``message_delta``. Cache-creation and
cache-read tokens are priced on their own. Claude's tokenizer is not public, so the estimate is a
tiktoken count inflated by :data:`CLAUDE_TOKEN_FACTOR` and marked approximate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from metergate.config.media import MediaSettings
from metergate.metering.media import MediaTally
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_anthropic
from metergate.proxy.adapters.base import (
    Prepared,
    StreamMeter,
    Verdict,
    believed,
    content_tokens,
    load_json,
    looks_like_sse,
    meter_whole_stream,
)
from metergate.proxy.adapters.schema import check

MESSAGES = "messages"
CLAUDE_TOKEN_FACTOR = 1.3  # Claude tokenizers produce more tokens than o200k for the same text
_PER_MESSAGE_TOKENS = 5


def prepare(body: bytes, payload: dict[str, Any], default_max_output: int,
            media_settings: MediaSettings | None = None) -> Prepared:
    request = check(MESSAGES, payload)  # every field read below has its API's type
    count = counter_for(request.model).count_prompt
    media = MediaTally(media_settings or MediaSettings(), "anthropic", request.model)
    tokens = content_tokens(payload.get("system"), count, media)
    for message in payload["messages"]:
        tokens += _PER_MESSAGE_TOKENS + content_tokens(message["content"], count, media)
    for extra in ("tools", "tool_choice"):
        if extra in payload:
            tokens += count(json.dumps(payload[extra], ensure_ascii=False))
    # Text is counted with tiktoken and inflated to Claude's tokenizer; images and pages are already in
    # Claude's own units (width x height / 750, tokens per page).
    estimate = int((tokens - media.tokens) * CLAUDE_TOKEN_FACTOR) + 1 + media.tokens
    return Prepared(MESSAGES, request.model, request.stream, estimate, request.max_output or default_max_output,
                    False, body, output_capped=request.max_output is not None)


def usage_from_body(prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        return None, ""
    usage = believed(from_anthropic, payload.get("usage"), prepared.anomalies)
    if usage is not None:
        return usage, ""
    texts = [block.get("text", "") for block in payload.get("content") or []
             if isinstance(block, dict) and isinstance(block.get("text"), str)]
    return None, "".join(texts)


@dataclass(slots=True)
class AnthropicStreamMeter(StreamMeter):
    started: Any = None  # message_start's usage, as reported
    latest: Any = None  # the last message_delta's cumulative usage, as reported
    open_block: int | None = None  # the content block being streamed, to be closed on a stop

    def on_event(self, data: bytes | None) -> Verdict:
        event = load_json(data) if data is not None else None
        if not isinstance(event, dict):
            return "forward"
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict) and message.get("usage") is not None:
                self.started = message["usage"]
                self.partial = self.believed(from_anthropic, self.started)
        elif kind == "message_delta":
            if event.get("usage") is not None:
                self.latest = event["usage"]
                delta = event.get("delta")
                self._update(final=not isinstance(delta, dict) or delta.get("stop_reason") is not None)
        elif kind == "content_block_delta":
            self.content_events += 1
            delta = event.get("delta")
            if isinstance(delta, dict):
                self.collect(delta.get("text"))
                self.collect(delta.get("partial_json"))
                self.collect(delta.get("thinking"))
        elif kind == "content_block_start":
            self.content_events += 1
            self.open_block = event.get("index") if isinstance(event.get("index"), int) else 0
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "message_stop":
            return "final"
        return "forward"

    def stop_events(self, usage: Usage, notice: dict[str, Any]) -> bytes:
        """Close the open content block, then ``stop_reason: "max_tokens"`` with the delivered output
        count and the notice, then ``message_stop``: the end of a message the SDKs accept."""
        events: list[tuple[str, dict[str, Any]]] = []
        if self.open_block is not None:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": self.open_block}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                         "usage": {"output_tokens": usage.output_tokens}, "metergate": notice}))
        events.append(("message_stop", {"type": "message_stop"}))
        return b"".join(f"event: {name}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"
                        for name, data in events)

    def _update(self, *, final: bool) -> None:
        # message_delta's counts are cumulative and, in newer API versions, repeat the input counts;
        # fields it leaves out keep their message_start values. Until the message_delta that names the
        # stop reason arrives the usage is only partial (message_start's output count is a placeholder, an
        # earlier delta's count is what was produced by then): a stream cut before it bills at least the
        # text delivered.
        if not isinstance(self.latest, dict):
            self.believed(from_anthropic, self.latest)  # not an object: an anomaly
            return
        started = self.started if isinstance(self.started, dict) else {}
        merged = {**started, **{k: v for k, v in self.latest.items() if v is not None}}
        usage = self.believed(from_anthropic, merged)
        if final:
            self.usage = usage
        else:
            self.partial = usage


class AnthropicAdapter:
    name = "anthropic"

    def __init__(self, *, media: MediaSettings | None = None) -> None:
        self._media = media or MediaSettings()

    def classify(self, path: str) -> str | None:
        return MESSAGES if path.endswith("/messages") else None

    def prepare(self, endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared:
        return prepare(body, payload, default_max_output, self._media)

    def usage_from_body(self, prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
        if looks_like_sse(body):  # streamed although the request did not ask to: metered as the stream it is
            return meter_whole_stream(self.stream_meter(prepared, len(body)), body)
        return usage_from_body(prepared, body)

    def stream_meter(self, prepared: Prepared, max_text_chars: int) -> StreamMeter:
        return AnthropicStreamMeter(max_text_chars, anomalies=prepared.anomalies)

    def auth_header(self, key: str) -> tuple[str, str]:
        return "x-api-key", key
