"""OpenAI-compatible APIs: chat completions, legacy completions, embeddings (OpenAI, vLLM, ...).

For each request the adapter answers: which endpoint is it, what model, is it a stream, how many
prompt tokens and at most how many output tokens, and what body goes upstream. For each response:
where the usage is. Streams get ``stream_options.include_usage`` when the client did not ask for it,
and the extra usage chunk that this produces is dropped before it reaches such a client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metergate.config.media import MediaSettings
from metergate.metering.media import MediaTally
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_openai
from metergate.proxy.adapters import responses
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

CHAT, COMPLETIONS, EMBEDDINGS = "chat.completions", "completions", "embeddings"
_SUFFIXES = (("/chat/completions", CHAT), ("/completions", COMPLETIONS), ("/embeddings", EMBEDDINGS))
_PER_MESSAGE_TOKENS = 4  # role and framing tokens around every chat message (upper bound)
_REPLY_PRIMING_TOKENS = 3


def classify(path: str) -> str | None:
    for suffix, endpoint in _SUFFIXES:
        if path.endswith(suffix):
            return endpoint
    return None


def prepare(endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int,
            media_settings: MediaSettings | None = None, *, model: str | None = None) -> Prepared:
    """``model``: the model to price and count as, when not the body's (see :func:`schema.check`)."""
    request = check(endpoint, payload, model=model)  # every field read below has its API's type
    counter = counter_for(request.model)
    count = counter.count_prompt
    media = MediaTally(media_settings or MediaSettings(), "openai", request.model)
    if endpoint == CHAT:
        tokens = _REPLY_PRIMING_TOKENS
        for message in payload["messages"]:
            tokens += _PER_MESSAGE_TOKENS + content_tokens(message.get("content"), count, media)
            for extra in ("name", "tool_calls", "function_call", "tool_call_id"):
                if extra in message:
                    tokens += content_tokens(message[extra], count)
        for extra in ("tools", "functions", "response_format"):
            if extra in payload:
                tokens += count(json.dumps(payload[extra], ensure_ascii=False))
    else:
        tokens = _prompt_tokens(payload["prompt" if endpoint == COMPLETIONS else "input"], count)
    max_output = 0 if endpoint == EMBEDDINGS else (request.max_output or default_max_output) * request.choices
    injected = False
    if request.stream and not request.include_usage:
        options: dict[str, Any] = payload["stream_options"] if request.has_stream_options else {}
        payload = {**payload, "stream_options": {**options, "include_usage": True}}
        body = json.dumps(payload, ensure_ascii=False).encode()
        injected = True
    return Prepared(endpoint, request.model, request.stream, tokens, max_output, counter.exact and media.exact,
                    body, injected,
                    output_capped=request.max_output is not None)


def _prompt_tokens(prompt: str | list[Any], count: Callable[[str], int]) -> int:
    """A prompt the schema checked: a string, token ids, or a list of strings and token-id arrays."""
    if isinstance(prompt, str):
        return count(prompt)
    if all(isinstance(x, int) for x in prompt):
        return len(prompt)
    return sum(count(item) if isinstance(item, str) else len(item) for item in prompt)


def usage_from_body(prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
    """The usage in a JSON response body, and the generated text to estimate from when there is none (or
    none metergate believes)."""
    payload = load_json(body)
    if not isinstance(payload, dict):
        return None, ""
    output = prepared.endpoint != EMBEDDINGS
    usage = believed(lambda reported: from_openai(reported, output=output), payload.get("usage"),
                     prepared.anomalies)
    if usage is not None:
        return usage, ""
    texts: list[str] = []
    for choice in payload.get("choices") or []:
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                texts.append(message["content"])
            if isinstance(choice.get("text"), str):
                texts.append(choice["text"])
    return None, "".join(texts)


@dataclass(slots=True)
class OpenAIStreamMeter(StreamMeter):
    """Reads the usage and the delivered text from a chat or completions event stream."""

    injected_usage: bool = False
    head: dict[str, Any] = field(default_factory=dict)  # id, object, created, model of the stream's chunks
    indexes: set[int] = field(default_factory=set)  # the choices seen, each to be finished on a stop
    unread: list[bytes] = field(default_factory=list)  # with lazy_text: text-only chunks not parsed yet
    unread_bytes: int = 0

    def on_event(self, data: bytes | None) -> Verdict:
        if data == b"[DONE]":
            return "final"
        if self.lazy_text and self.content_events and data is not None and _no_usage(data):
            # Past the first chunk, one without usage only adds text. Most streams end with the provider's
            # usage and never need that text, so it is parsed only if asked for (bounded: read when large).
            self.unread.append(data)
            self.unread_bytes += len(data)
            self.content_events += 1
            if self.unread_bytes > self.max_text_chars:
                self._read_unread()
            return "forward"
        chunk = load_json(data) if data is not None else None
        if not isinstance(chunk, dict):
            return "forward"
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                         if k in chunk}
        usage = self.believed(from_openai, chunk.get("usage"))
        if usage is not None:
            self.usage = usage  # keep the last non-null usage: some servers send it early, or cumulatively
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices:
            self.content_events += 1
            if self.unread:
                self._read_unread()  # the text stays in stream order
            self._take(choices)
        elif self.injected_usage and chunk.get("usage") is not None:
            return "drop"  # the usage-only chunk the client never asked for (believed or not)
        return "forward"

    def delivered_text(self) -> str:
        self._read_unread()
        return StreamMeter.delivered_text(self)

    def _read_unread(self) -> None:
        """Parse the chunks kept unread, in order, as :meth:`on_event` would have (they carry no usage)."""
        for data in self.unread:
            chunk = load_json(data)
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if isinstance(choices, list):
                self._take(choices)
        self.unread.clear()
        self.unread_bytes = 0

    def _take(self, choices: list[Any]) -> None:
        """Note each choice's index (to finish it on a stop) and collect its text."""
        for choice in choices:
            if isinstance(choice, dict):
                if isinstance(choice.get("index"), int):
                    self.indexes.add(choice["index"])
                self._collect(choice)

    def stop_events(self, usage: Usage, notice: dict[str, Any]) -> bytes:
        """``finish_reason: "length"`` on every choice (what the SDKs know as "stopped at a limit"), the
        notice beside it, the delivered usage when the client asked for usage chunks, then ``[DONE]``."""
        self._read_unread()
        head = {"id": "", "object": "chat.completion.chunk", "created": 0, "model": "", **self.head}
        chat = head["object"] == "chat.completion.chunk"
        finish: list[dict[str, Any]] = [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": "length"} if chat else
            {"index": i, "text": "", "logprobs": None, "finish_reason": "length"}
            for i in sorted(self.indexes or {0})]
        events = [{**head, "choices": finish, "metergate": notice}]
        if not self.injected_usage:
            events.append({**head, "choices": [], "usage": {
                "prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                "total_tokens": usage.input_tokens + usage.output_tokens}})
        return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    def _collect(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self.collect(delta.get("content"))
            self.collect(delta.get("reasoning_content"))
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    self.collect(call["function"].get("name"))
                    self.collect(call["function"].get("arguments"))
        self.collect(choice.get("text"))


def _no_usage(data: bytes) -> bool:
    """True when the chunk cannot carry a usage: no ``"usage"`` key at all, or exactly one, set to null (what
    OpenAI and vLLM put in every chunk of a stream that asked for usage). Quotes inside strings are escaped,
    so text that mentions "usage" never matches."""
    count = data.count(b'"usage"')
    return count == 0 or (count == 1 and (b'"usage":null' in data or b'"usage": null' in data))


class OpenAIAdapter:
    """Chat completions, legacy completions, embeddings and the Responses API, for any
    OpenAI-compatible upstream."""

    name = "openai"

    def __init__(self, *, charge_failed: bool = False, media: MediaSettings | None = None) -> None:
        self._charge_failed = charge_failed
        self._media = media or MediaSettings()

    def classify(self, path: str) -> str | None:
        return responses.RESPONSES if path.endswith("/responses") else classify(path)

    def prepare(self, endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared:
        if endpoint == responses.RESPONSES:
            return responses.prepare(body, payload, default_max_output, self._media)
        return prepare(endpoint, body, payload, default_max_output, self._media)

    def usage_from_body(self, prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
        if looks_like_sse(body):  # streamed although the request did not ask to: metered as the stream it is
            return meter_whole_stream(self.stream_meter(prepared, len(body)), body)
        if prepared.endpoint == responses.RESPONSES:
            return responses.usage_from_body(prepared, body, self._charge_failed)
        return usage_from_body(prepared, body)

    def stream_meter(self, prepared: Prepared, max_text_chars: int) -> StreamMeter:
        if prepared.endpoint == responses.RESPONSES:
            return responses.ResponsesStreamMeter(max_text_chars, anomalies=prepared.anomalies,
                                                  charge_failed=self._charge_failed)
        return OpenAIStreamMeter(max_text_chars, anomalies=prepared.anomalies,
                                 injected_usage=prepared.injected_usage)

    def auth_header(self, key: str) -> tuple[str, str]:
        return "Authorization", f"Bearer {key}"
