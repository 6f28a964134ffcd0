"""OpenAI-compatible APIs: chat completions, legacy completions, embeddings (OpenAI, vLLM, ...).

For each request the adapter answers: which endpoint is it, what model, is it a stream, how many
prompt tokens and at most how many output tokens, and what body goes upstream. For each response:
where the usage is. Streams get ``stream_options.include_usage`` when the client did not ask for it,
and the extra usage chunk that this produces is dropped before it reaches such a client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from metergate.errors import BadRequest
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_openai

CHAT, COMPLETIONS, EMBEDDINGS = "chat.completions", "completions", "embeddings"
_SUFFIXES = (("/chat/completions", CHAT), ("/completions", COMPLETIONS), ("/embeddings", EMBEDDINGS))
_PER_MESSAGE_TOKENS = 4  # role and framing tokens around every chat message (upper bound)
_REPLY_PRIMING_TOKENS = 3
_IMAGE_TOKENS = 1105  # a high-detail 1024x1024 image; images are estimated, never decoded


def classify(path: str) -> str | None:
    for suffix, endpoint in _SUFFIXES:
        if path.endswith(suffix):
            return endpoint
    return None


@dataclass(slots=True)
class Prepared:
    endpoint: str
    model: str
    stream: bool
    input_tokens: int
    max_output_tokens: int
    tokens_exact: bool
    body: bytes
    injected_usage: bool = False


def _positive_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{key}' must be a positive integer.", code="invalid_request", param=key)
    return value


def _text_of(content: Any, count: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return int(count(content))
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                    total += count(part["text"])
                elif kind in ("image_url", "input_image", "image"):
                    total += _IMAGE_TOKENS
                else:
                    total += count(json.dumps(part, ensure_ascii=False))
            elif isinstance(part, str):
                total += count(part)
        return total
    return int(count(json.dumps(content, ensure_ascii=False)))


def prepare(endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string.", code="missing_model", param="model")
    counter = counter_for(model)
    count = counter.count
    stream = payload.get("stream") is True
    if endpoint == CHAT:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", code="invalid_request", param="messages")
        tokens = _REPLY_PRIMING_TOKENS
        for message in messages:
            if not isinstance(message, dict):
                raise BadRequest("Each message must be an object.", code="invalid_request", param="messages")
            tokens += _PER_MESSAGE_TOKENS + _text_of(message.get("content"), count)
            for extra in ("name", "tool_calls", "function_call", "tool_call_id"):
                if extra in message:
                    tokens += _text_of(message[extra], count)
        for extra in ("tools", "functions", "response_format"):
            if extra in payload:
                tokens += count(json.dumps(payload[extra], ensure_ascii=False))
        limit = (_positive_int(payload, "max_completion_tokens") or _positive_int(payload, "max_tokens")
                 or default_max_output)
        choices = _positive_int(payload, "n") or 1
        max_output = limit * choices
    elif endpoint == COMPLETIONS:
        tokens = _prompt_tokens(payload.get("prompt"), count, "prompt")
        limit = _positive_int(payload, "max_tokens") or default_max_output
        choices = max(_positive_int(payload, "n") or 1, _positive_int(payload, "best_of") or 1)
        max_output = limit * choices
    else:
        tokens = _prompt_tokens(payload.get("input"), count, "input")
        max_output = 0
        stream = False
    injected = False
    if stream:
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object.", code="invalid_request", param="stream_options")
        if not (options or {}).get("include_usage"):
            payload = {**payload, "stream_options": {**(options or {}), "include_usage": True}}
            body = json.dumps(payload, ensure_ascii=False).encode()
            injected = True
    return Prepared(endpoint, model, stream, tokens, max_output, counter.exact, body, injected)


def _prompt_tokens(prompt: Any, count: Any, param: str) -> int:
    if isinstance(prompt, str):
        return int(count(prompt))
    if isinstance(prompt, list) and prompt:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            return len(prompt)
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += count(item)
            elif isinstance(item, list) and all(isinstance(x, int) for x in item):
                total += len(item)
            else:
                raise BadRequest(f"'{param}' items must be strings or token arrays.", param=param)
        return total
    raise BadRequest(f"'{param}' must be a string or a non-empty array.", code="invalid_request", param=param)


def usage_from_body(body: bytes) -> tuple[Usage | None, str]:
    """The usage in a JSON response body, and the generated text to estimate from when there is none."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser's stack
        return None, ""
    if not isinstance(payload, dict):
        return None, ""
    usage = from_openai(payload.get("usage"))
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
class StreamMeter:
    """Reads the usage and the delivered text from a chat or completions event stream."""

    injected_usage: bool
    max_text_chars: int
    usage: Usage | None = None
    model: str | None = None
    text: list[str] = field(default_factory=list)
    text_chars: int = 0
    content_events: int = 0

    def on_event(self, data: bytes | None) -> bool:
        """Inspect one event's data; return False when the event must not reach the client."""
        if data is None or data == b"[DONE]":
            return True
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return True
        if not isinstance(chunk, dict):
            return True
        usage = from_openai(chunk.get("usage"))
        if usage is not None:
            self.usage = usage  # keep the last non-null usage: some servers send it early, or cumulatively
        if self.model is None and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices:
            self.content_events += 1
            for choice in choices:
                if isinstance(choice, dict):
                    self._collect(choice)
        elif self.injected_usage and usage is not None:
            return False  # the usage-only chunk the client never asked for
        return True

    def _collect(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        pieces: list[Any] = []
        if isinstance(delta, dict):
            pieces.append(delta.get("content"))
            pieces.append(delta.get("reasoning_content"))
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    pieces.append(call["function"].get("name"))
                    pieces.append(call["function"].get("arguments"))
        pieces.append(choice.get("text"))
        for piece in pieces:
            if isinstance(piece, str) and piece and self.text_chars < self.max_text_chars:
                self.text.append(piece)
                self.text_chars += len(piece)

    def delivered_output_tokens(self, model: str) -> int:
        return counter_for(model).count("".join(self.text))
