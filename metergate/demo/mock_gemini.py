"""A mock Gemini API that speaks Google's wire format, for the tests and the demo.

Paths as the Gemini API serves them, under ``/v1beta`` and ``/v1``: ``POST models/{model}:generateContent``
(one JSON ``GenerateContentResponse``), ``POST models/{model}:streamGenerateContent?alt=sse`` (``data: {...}``
events separated by ``\\r\\n\\r\\n``, each chunk carrying the *cumulative* ``usageMetadata`` so far, the last one
with the candidate's ``finishReason``), ``POST models/{model}:countTokens`` (``{"totalTokens": N}``) and
``GET models`` / ``GET models/{model}``. It takes its one key in ``x-goog-api-key`` or the ``key`` query
parameter, and answers errors in Google's envelope (``{"error": {"code", "message", "status"}}``) like the
API: 400 ``API_KEY_INVALID`` without the key, 400 ``INVALID_ARGUMENT`` for a stream without ``alt=sse``.

Token counts come from tiktoken (the mock's stand-in for Gemini's tokenizer). ``generationConfig.
maxOutputTokens`` bounds thinking and answer together, as Gemini's does. ``X-Mock-Behavior`` knobs:
``words:N`` (answer length), ``cached:N`` (``cachedContentTokenCount``, part of the prompt), ``thoughts:N``
(``thoughtsTokenCount``), ``tool-prompt:N`` (``toolUsePromptTokenCount``), ``no-usage``, ``error:STATUS``,
``die-after:N`` (a stream's connection drops after N chunks), ``no-finish`` (a stream ends without its finishing
chunk), ``usage-field:NAME=JSON`` (a field of the body's, or the last chunk's, ``usageMetadata``) and
``chunk-usage-field:NAME=JSON`` (the same on every chunk).

Every request that reaches it is kept under ``RECEIVED``: the raw path and query, the headers and the body.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from metergate.metering.tokenizer import counter_for

RECEIVED = web.AppKey("gemini_received", list)
_KEY = web.AppKey("gemini_key", str)
_WORDS = ["Prepaid", "wallets", "keep", "every", "Gemini", "call", "paid", "for", "before", "it", "runs,", "and",
          "metergate", "bills", "exactly", "what", "the", "model", "reported."]
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
MODELS = ("gemini-2.0-flash", "gemini-2.5-flash", "gemini-2.5-pro")


def _error(status: int, message: str, reason: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    if reason:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                             "domain": "googleapis.com"}]
    return web.json_response({"error": error}, status=status)


def _keep(request: web.Request, body: Any) -> None:
    request.app[RECEIVED].append({"raw_path": request.rel_url.raw_path, "headers": dict(request.headers),
                                  "query_string": request.rel_url.raw_query_string, "body": body})


def _behavior(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in request.headers.get("X-Mock-Behavior", "").split(","):
        if item.strip():
            key, _, value = item.strip().partition(":")
            out[key] = value
    return out


def _texts(content: Any) -> list[str]:
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p["text"] for p in parts or [] if isinstance(p, dict) and isinstance(p.get("text"), str)]


def _prompt_tokens(model: str, body: dict[str, Any]) -> int:
    count = counter_for(model).count
    contents = [*(body.get("contents") or []), body.get("systemInstruction")]
    return sum(4 + sum(count(text) for text in _texts(content)) for content in contents if content is not None)


def _override(usage: dict[str, Any], knob: str | None) -> dict[str, Any]:
    if not knob:
        return usage
    name, _, value = knob.partition("=")
    return {**usage, name: json.loads(value)}


class _Answer:
    """What the mock model produces for one request: its words and its usage, by the knobs."""

    def __init__(self, model: str, body: dict[str, Any], b: dict[str, str]) -> None:
        config = body.get("generationConfig") or {}
        limit = config.get("maxOutputTokens")
        count = counter_for(model).count
        self.prompt = _prompt_tokens(model, body)
        self.cached = min(int(b.get("cached", 0)), self.prompt)
        self.tool_prompt = int(b.get("tool-prompt", 0))
        self.thoughts = int(b.get("thoughts", 0))
        words = [_WORDS[i % len(_WORDS)] for i in range(int(b.get("words", 12)))]
        if isinstance(limit, int):
            self.thoughts = min(self.thoughts, limit)  # maxOutputTokens bounds thinking and answer together
            while words and self.thoughts + count(" ".join(words)) > limit:
                words.pop()
        self.truncated = isinstance(limit, int) and len(words) < int(b.get("words", 12))
        self.words = words
        self.count = count

    def usage(self, words: list[str], *, final: bool) -> dict[str, Any]:
        candidates = self.count(" ".join(words))
        thoughts = self.thoughts if final or words else 0
        usage: dict[str, Any] = {"promptTokenCount": self.prompt, "candidatesTokenCount": candidates,
                                 "totalTokenCount": self.prompt + candidates + thoughts + self.tool_prompt,
                                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt}]}
        if self.cached:
            usage["cachedContentTokenCount"] = self.cached
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if self.tool_prompt:
            usage["toolUsePromptTokenCount"] = self.tool_prompt
        return usage


def _chunk(model: str, text: str, usage: dict[str, Any] | None, finish: str | None, response_id: str) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": response_id}
    if usage is not None:
        chunk["usageMetadata"] = usage
    return chunk


async def _generate(request: web.Request, model: str, body: dict[str, Any], *, stream: bool) -> web.StreamResponse:
    b = _behavior(request)
    if "error" in b:
        status = int(b["error"])
        return _error(status, f"mock Gemini error {status}")
    answer = _Answer(model, body, b)
    finish = "MAX_TOKENS" if answer.truncated else "STOP"
    response_id = uuid.uuid4().hex[:22]
    if not stream:
        usage = None if "no-usage" in b else _override(answer.usage(answer.words, final=True), b.get("usage-field"))
        return web.json_response(_chunk(model, " ".join(answer.words), usage, finish, response_id))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    pieces = [answer.words[i:i + 4] for i in range(0, len(answer.words), 4)] or [[]]
    for index, _ in enumerate(pieces):
        if "die-after" in b and index >= int(b["die-after"]):
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-stream, as a network failure would
            return response
        last = index == len(pieces) - 1
        if last and "no-finish" in b:
            break
        so_far = [w for piece in pieces[:index + 1] for w in piece]
        usage = None if "no-usage" in b else _override(answer.usage(so_far, final=last), b.get("chunk-usage-field"))
        if usage is not None and last:
            usage = _override(usage, b.get("usage-field"))
        text = " ".join(pieces[index]) + ("" if last else " ")
        chunk = _chunk(model, text, usage, finish if last else None, response_id)
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
    await response.write_eof()
    return response


async def models_call(request: web.Request) -> web.StreamResponse:
    """``POST models/{model}:{method}``: the front door of every model call, as the API's."""
    call = request.match_info["call"]
    model, _, method = call.rpartition(":")
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = None
    _keep(request, body)
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    if key != request.app[_KEY]:
        return _error(400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID")
    if not isinstance(body, dict):
        return _error(400, "Invalid JSON payload received.")
    if method == "generateContent":
        return await _generate(request, model, body, stream=False)
    if method == "streamGenerateContent":
        if request.query.get("alt") != "sse":
            return _error(400, "This mock streams server-sent events only: add alt=sse.")
        return await _generate(request, model, body, stream=True)
    if method == "countTokens":
        return web.json_response({"totalTokens": _prompt_tokens(model, body)})
    return _error(404, f"Method {method} not found.")


def _model(name: str) -> dict[str, Any]:
    return {"name": f"models/{name}", "displayName": name, "inputTokenLimit": 1_048_576, "outputTokenLimit": 65_536,
            "supportedGenerationMethods": ["generateContent", "countTokens"]}


async def models_list(request: web.Request) -> web.Response:
    _keep(request, None)
    if (request.headers.get("x-goog-api-key") or request.query.get("key")) != request.app[_KEY]:
        return _error(400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID")
    if "call" in request.match_info:
        name = request.match_info["call"]
        return web.json_response(_model(name)) if name in MODELS else _error(404, f"models/{name} is not found.")
    return web.json_response({"models": [_model(name) for name in MODELS]})


def build_mock_gemini(key: str) -> web.Application:
    """A Gemini API that accepts ``key`` (in ``x-goog-api-key`` or ``?key=``)."""
    app = web.Application()
    app[RECEIVED], app[_KEY] = [], key
    for version in ("v1beta", "v1"):
        app.router.add_post(f"/{version}/models/{{call}}", models_call)
        app.router.add_get(f"/{version}/models", models_list)
        app.router.add_get(f"/{version}/models/{{call}}", models_list)
    return app


__all__ = ["MODELS", "RECEIVED", "build_mock_gemini"]
