"""The OpenAI Responses API (``/v1/responses``), JSON and streaming.

Usage lives in the response object: in a JSON body, or in the stream's terminal event
(``response.completed``, ``response.incomplete`` or ``response.failed``); the stream has no ``[DONE]``,
so the terminal event is the one held back until settlement. A ``failed`` response is not charged
unless the route says otherwise (``charge_failed``): the customer got nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from metergate.config.media import MediaSettings
from metergate.metering.media import MediaTally
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_responses
from metergate.proxy.adapters.base import (
    Prepared,
    StreamMeter,
    Verdict,
    believed,
    content_tokens,
    load_json,
)
from metergate.proxy.adapters.schema import check

RESPONSES = "responses"
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_PER_ITEM_TOKENS = 4


def prepare(body: bytes, payload: dict[str, Any], default_max_output: int,
            media_settings: MediaSettings | None = None, *, model: str | None = None) -> Prepared:
    """``model``: the model to price and count as, when not the body's (see :func:`schema.check`)."""
    request = check(RESPONSES, payload, model=model)  # every field read below has its API's type
    counter = counter_for(request.model)
    count = counter.count_prompt
    media = MediaTally(media_settings or MediaSettings(), "openai", request.model)
    items = payload["input"]
    if isinstance(items, str):
        tokens = count(items)
    else:
        tokens = sum(_PER_ITEM_TOKENS + content_tokens(item.get("content", item.get("output", item)), count, media)
                     for item in items)
    tokens += content_tokens(payload.get("instructions"), count)
    if "tools" in payload:
        tokens += count(json.dumps(payload["tools"], ensure_ascii=False))
    return Prepared(RESPONSES, request.model, request.stream, tokens, request.max_output or default_max_output,
                    counter.exact and media.exact, body, output_capped=request.max_output is not None)


def _usage_of(response: Any, charge_failed: bool) -> Usage | None:
    """The usage a response object reports; raises :class:`UsageAnomaly` when it is not believable."""
    if not isinstance(response, dict):
        return None
    if response.get("status") == "failed" and not charge_failed:
        return Usage(source="none")  # the provider's answer was a failure: charge nothing
    return from_responses(response.get("usage"))


def _text_of(response: dict[str, Any]) -> str:
    texts: list[str] = []
    for item in response.get("output") or []:
        if isinstance(item, dict):
            for part in item.get("content") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return "".join(texts)


@dataclass(slots=True)
class ResponsesStreamMeter(StreamMeter):
    charge_failed: bool = False
    snapshot: dict[str, Any] | None = None  # the response object as last announced, to end it on a stop
    sequence: int = 0

    def on_event(self, data: bytes | None) -> Verdict:
        event = load_json(data) if data is not None else None
        if not isinstance(event, dict):
            return "forward"
        kind = event.get("type")
        if isinstance(event.get("sequence_number"), int):
            self.sequence = event["sequence_number"]
        if kind in ("response.created", "response.in_progress") and isinstance(event.get("response"), dict):
            self.snapshot = event["response"]
        if kind in _TERMINAL:
            self.usage = self.believed(lambda r: _usage_of(r, self.charge_failed), event.get("response")) \
                or self.usage
            return "final"
        if isinstance(kind, str) and kind.endswith(".delta"):
            self.content_events += 1
            self.collect(event.get("delta"))
        return "forward"


    def stop_events(self, usage: Usage, notice: dict[str, Any]) -> bytes:
        """``response.incomplete`` (reason ``max_output_tokens``) with the delivered usage and the notice;
        without the response object the stream announced, the generic error event."""
        if self.snapshot is None:
            return StreamMeter.stop_events(self, usage, notice)
        response = {**self.snapshot, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
                    "usage": {"input_tokens": usage.input_tokens,
                              "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
                              "output_tokens": usage.output_tokens,
                              "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                              "total_tokens": usage.input_tokens + usage.output_tokens},
                    "metergate": notice}
        event = {"type": "response.incomplete", "sequence_number": self.sequence + 1, "response": response}
        return b"event: response.incomplete\ndata: " + json.dumps(event).encode() + b"\n\n"


def usage_from_body(prepared: Prepared, body: bytes, charge_failed: bool = False) -> tuple[Usage | None, str]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        return None, ""
    usage = believed(lambda r: _usage_of(r, charge_failed), payload, prepared.anomalies)
    return usage, "" if usage is not None else _text_of(payload)
