"""An OpenAI-compatible mock upstream that speaks the real wire format, for the demo and the tests.

It answers chat completions (JSON and SSE, honouring ``stream_options.include_usage``), legacy
completions and embeddings, with usage counted by tiktoken the way OpenAI counts it. A request can
ask for misbehaviour through the ``X-Mock-Behavior`` header (comma-separated):

``words:N`` reply length · ``error:STATUS`` fail before any output · ``slow:S`` wait before answering ·
``chunk-delay:S`` wait between stream chunks · ``die-after:N`` cut the connection after N content
chunks (a JSON answer: halfway through its body) · ``no-usage`` never report usage · ``usage-zero``
report zero usage · ``cached:N`` / ``reasoning:N`` report cached-input / reasoning tokens ·
``tool-call:NAME`` answer with a call of tool NAME, its arguments streamed in pieces · ``redirect`` answer
307 · ``token-limit`` count ``max_tokens`` in tokens (default: in words, which lets a reply outgrow it) ·
``not-stream`` answer a stream request with JSON · ``no-done`` end a stream
without ``[DONE]`` · ``unterminated`` end a stream's last event with one newline instead of the blank
line · ``header:NAME=VALUE`` add a response header · ``usage-field:PATH=JSON`` report ``JSON`` as the
usage field ``PATH`` (dotted: ``prompt_tokens_details.cached_tokens``), e.g. ``completion_tokens=1e30``
or ``prompt_tokens="12"``; the Anthropic and Responses endpoints honour it too.

A request streams when its ``stream`` is ``true``, as OpenAI's API reads it. ``coerce-stream`` streams any
truthy ``stream`` (``1``, ``"true"``), as some OpenAI-compatible servers do; ``force-stream`` streams
whatever the request asked (an upstream that ignores it).

It also answers the free endpoints: ``GET /v1/models`` and ``GET /v1/models/{id}`` (in Anthropic's format
when the request carries ``anthropic-version``, as Anthropic's SDK sends it) and ``POST /v1/moderations``.

Every request is recorded (path, headers, JSON body; for the free endpoints also method and query) and
listed at ``GET /_mock/requests``. Every request line that arrives, whatever its path (including paths no
handler answers), is also kept under ``SEEN``: the method, the raw path and the raw query string as received.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from metergate.metering.tokenizer import counter_for

REQUESTS = web.AppKey("requests", list)
# A request's JSON body, already read and rewritten by a front (metergate.demo.mock_azure).
BODY = web.RequestKey("mock_body", dict)
SEEN = web.AppKey("seen", list)
_WORDS = ["Metergate", "authorizes", "every", "request", "against", "a", "prepaid", "wallet", "before", "the",
          "upstream", "sees", "it,", "meters", "each", "token", "as", "it", "streams,", "and", "settles", "the",
          "exact", "amount", "in", "an", "append-only", "ledger."]


def _behavior(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in request.headers.get("X-Mock-Behavior", "").split(","):
        item = item.strip()
        if item:
            key, _, value = item.partition(":")
            out[key] = value
    return out


def _chat_prompt_tokens(model: str, messages: list[Any]) -> int:
    count = counter_for(model).count
    tokens = 3
    for message in messages:
        tokens += 3
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            tokens += count(content)
        elif isinstance(content, list):
            tokens += sum(count(p.get("text", "")) for p in content if isinstance(p, dict))
    return tokens


def _usage(prompt: int, completion: int, b: dict[str, str]) -> dict[str, Any]:
    if "usage-zero" in b:
        prompt = completion = 0
    cached = min(int(b.get("cached", 0)), prompt)
    reasoning = min(int(b.get("reasoning", 0)), completion)
    return override_usage({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}, b)


def wants_stream(body: dict[str, Any], b: dict[str, str]) -> bool:
    """Whether to answer with a stream: ``stream: true``; any truthy value with ``coerce-stream``; always
    with ``force-stream``; never with ``not-stream``."""
    if "not-stream" in b:
        return False
    return "force-stream" in b or body.get("stream") is True or ("coerce-stream" in b and bool(body.get("stream")))


def override_usage(usage: dict[str, Any], b: dict[str, str]) -> dict[str, Any]:
    """``usage`` with the ``usage-field:PATH=JSON`` knob applied (a copy; nested objects copied on the way)."""
    if "usage-field" not in b:
        return usage
    path, _, value = b["usage-field"].partition("=")
    *parents, leaf = path.split(".")
    out = dict(usage)
    node = out
    for name in parents:
        node[name] = dict(node.get(name) or {})
        node = node[name]
    node[leaf] = json.loads(value)
    return out


def _headers(b: dict[str, str]) -> dict[str, str]:
    name, _, value = b.get("header", "").partition("=")
    return {name: value} if name else {}


async def _json(request: web.Request, payload: dict[str, Any], b: dict[str, str]) -> web.StreamResponse:
    if "die-after" not in b:
        return web.json_response(payload, headers=_headers(b))
    body = json.dumps(payload).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json", **_headers(b)})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    assert request.transport is not None
    request.transport.abort()  # cut the connection halfway through the body
    return response


def _reply_words(body: dict[str, Any], b: dict[str, str]) -> list[str]:
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 10_000
    n = min(int(b.get("words", 12)), int(limit))
    words = [(_WORDS[i % len(_WORDS)] + " ") for i in range(n)]
    if "token-limit" in b:
        # As a provider counts its limit: in tokens (whole words here), not in words.
        count, text = counter_for(body["model"]).count, ""
        kept: list[str] = []
        for word in words:
            if count(text + word) > int(limit):
                break
            text += word
            kept.append(word)
        return kept
    return words


async def _preamble(request: web.Request) -> tuple[dict[str, Any], dict[str, str]] | web.Response:
    body = request[BODY] if BODY in request else await request.json()
    # ``headers`` is the convenient view; ``header_list`` keeps repeated headers, in the order received.
    request.app[REQUESTS].append({"path": request.path, "headers": dict(request.headers),
                                  "header_list": [[k, v] for k, v in request.headers.items()], "body": body})
    b = _behavior(request)
    if "slow" in b:
        await asyncio.sleep(float(b["slow"]))
    if "redirect" in b:
        return web.Response(status=307, headers={"Location": "http://example.invalid/elsewhere"})
    if "error" in b:
        status = int(b["error"])
        return web.json_response({"error": {"message": f"mock upstream error {status}", "type": "server_error",
                                            "param": None, "code": None}}, status=status)
    return body, b


async def chat(request: web.Request) -> web.StreamResponse:
    pre = await _preamble(request)
    if isinstance(pre, web.Response):
        return pre
    body, b = pre
    model = body["model"]
    prompt = _chat_prompt_tokens(model, body.get("messages", []))
    words = _reply_words(body, b)
    count = counter_for(model).count
    tool = b.get("tool-call")
    arguments = tool_arguments(words)
    completion = count(tool + arguments) if tool else count("".join(words))
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    call_id = f"call_{ident[9:21]}"
    if not wants_stream(body, b):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(words), "refusal": None}
        if tool:
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": tool, "arguments": arguments}}]}
        payload: dict[str, Any] = {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if tool else "stop"}],
            "system_fingerprint": "fp_mock"}
        if "no-usage" not in b:
            payload["usage"] = _usage(prompt, completion, b)
        return await _json(request, payload, b)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": "fp_mock",
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return c

    if tool:
        # A tool call streams as OpenAI's does: id, type and name first, then the arguments in pieces.
        events = [chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": call_id, "type": "function", "function": {"name": tool, "arguments": ""}}]})]
        events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                   for piece in _pieces(arguments, len(words))]
        events.append(chunk({}, "tool_calls"))
    else:
        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": w}) for w in words]
        events.append(chunk({}, "stop"))
    if include_usage and "no-usage" not in b:
        events.append({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "system_fingerprint": "fp_mock", "choices": [], "usage": _usage(prompt, completion, b)})
    return await _sse(request, events, b)


def tool_arguments(words: list[str]) -> str:
    """The arguments of the mock's tool call (``tool-call:NAME``, ``tool-use:NAME``): the reply as JSON."""
    return json.dumps({"query": "".join(words).strip()})


def _pieces(text: str, n: int) -> list[str]:
    """``text`` in ``n`` (or fewer) consecutive pieces, as a provider streams a tool call's arguments."""
    size = max(1, -(-len(text) // max(1, n)))
    return [text[i:i + size] for i in range(0, len(text), size)]


async def _sse(request: web.Request, events: list[dict[str, Any]], b: dict[str, str], *,
               named: bool = False, done: bool = True) -> web.StreamResponse:
    """Write events as SSE; ``named`` adds ``event: <type>`` lines (Anthropic, Responses), ``done`` the
    OpenAI ``[DONE]`` sentinel."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", **_headers(b)})
    await response.prepare(request)
    delay = float(b.get("chunk-delay", 0))
    die_after = int(b["die-after"]) if "die-after" in b else None
    frames = [(f"event: {event['type']}\n".encode() if named else b"") + b"data: " + json.dumps(event).encode()
              + b"\n\n" for event in events]
    if done and "no-done" not in b:
        frames.append(b"data: [DONE]\n\n")
    if "unterminated" in b and frames:
        frames[-1] = frames[-1][:-1]
    for index, frame in enumerate(frames):
        if die_after is not None and index > die_after:
            assert request.transport is not None
            request.transport.abort()  # cut the connection without finishing the chunked body
            return response
        await response.write(frame)
        if delay and index < len(events):
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    pre = await _preamble(request)
    if isinstance(pre, web.Response):
        return pre
    body, b = pre
    model = body["model"]
    count = counter_for(model).count
    prompts = body.get("prompt")
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # one prompt, as text or as a token array
    prompt = sum(count(p) if isinstance(p, str) else len(p) for p in prompts or [])
    words = _reply_words(body, b)
    completion = count("".join(words))
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not wants_stream(body, b):
        payload: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created, "model": model,
                                   "choices": [{"index": 0, "text": "".join(words), "logprobs": None,
                                                "finish_reason": "stop"}]}
        if "no-usage" not in b:
            payload["usage"] = _usage(prompt, completion, b)
        return await _json(request, payload, b)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    events: list[dict[str, Any]] = [
        {"id": ident, "object": "text_completion", "created": created, "model": model,
         "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}]} for w in words]
    events.append({"id": ident, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
    if include_usage and "no-usage" not in b:
        events.append({"id": ident, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": _usage(prompt, completion, b)})
    return await _sse(request, events, b)


async def embeddings(request: web.Request) -> web.StreamResponse:
    pre = await _preamble(request)
    if isinstance(pre, web.Response):
        return pre
    body, b = pre
    model = body["model"]
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    count = counter_for(model).count
    prompt = sum(count(x) if isinstance(x, str) else len(x) for x in inputs)
    payload: dict[str, Any] = {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.1, 0.2]} for i in range(len(inputs))]}
    if "no-usage" not in b:
        payload["usage"] = override_usage({"prompt_tokens": prompt, "total_tokens": prompt}, b)
    return await _json(request, payload, b)


MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-sonnet-4-5")


async def record_free(request: web.Request) -> dict[str, str]:
    """Record a free-endpoint request (method, path, query, headers, body) and return its behaviours."""
    body = await request.read()
    request.app[REQUESTS].append({"method": request.method, "path": request.path, "query": dict(request.query),
                                  "headers": dict(request.headers), "body": json.loads(body) if body else None})
    return _behavior(request)


def _model(model_id: str, anthropic: bool) -> dict[str, Any]:
    if anthropic:
        return {"type": "model", "id": model_id, "display_name": model_id.replace("-", " ").title(),
                "created_at": "2026-01-01T00:00:00Z"}
    return {"id": model_id, "object": "model", "created": 1_767_225_600, "owned_by": "mock"}


async def models_list(request: web.Request) -> web.Response:
    b = await record_free(request)
    if "error" in b:
        return web.json_response({"error": {"message": "mock models error", "type": "server_error", "param": None,
                                            "code": None}}, status=int(b["error"]))
    anthropic = "anthropic-version" in request.headers
    data = [_model(m, anthropic) for m in MODELS]
    if anthropic:
        return web.json_response({"data": data, "has_more": False, "first_id": data[0]["id"],
                                  "last_id": data[-1]["id"]})
    return web.json_response({"object": "list", "data": data}, headers=_headers(b))


async def models_retrieve(request: web.Request) -> web.Response:
    await record_free(request)
    model_id = request.match_info["model"]
    anthropic = "anthropic-version" in request.headers
    if model_id not in MODELS:
        kind = "not_found_error" if anthropic else "invalid_request_error"
        return web.json_response({"error": {"message": f"The model '{model_id}' does not exist", "type": kind,
                                            "param": "model", "code": "model_not_found"}}, status=404)
    return web.json_response(_model(model_id, anthropic))


async def moderations(request: web.Request) -> web.Response:
    await record_free(request)
    body = await request.json()
    inputs = body["input"] if isinstance(body.get("input"), list) else [body.get("input", "")]
    results = [{"flagged": False, "categories": {"violence": False}, "category_scores": {"violence": 0.001}}
               for _ in inputs]
    return web.json_response({"id": f"modr-{uuid.uuid4().hex[:24]}", "model": body.get("model") or
                              "omni-moderation-latest", "results": results})


async def recorded(request: web.Request) -> web.Response:
    return web.json_response(request.app[REQUESTS])


async def compute_run(request: web.Request) -> web.StreamResponse:
    """A compute job: works for ``seconds`` (query), reports ``units`` in a header and in its JSON, and
    how long it measured itself working, in ``X-Mock-Elapsed``. ``fail=STATUS`` fails instead."""
    request.app[REQUESTS].append({"path": request.path, "headers": dict(request.headers),
                                  "body": (await request.read()).decode(errors="replace")})
    if "fail" in request.query:
        return web.json_response({"error": "mock failure"}, status=int(request.query["fail"]))
    started = time.perf_counter()
    seconds = float(request.query.get("seconds", "0"))
    units = request.query.get("units", "1")
    response = web.StreamResponse(headers={"Content-Type": "application/json", "X-Usage-Units": units})
    await response.prepare(request)
    await response.write(b'{"status": "running", ')
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    await response.write(json.dumps({"usage": {"units": float(units)}, "elapsed_s": elapsed})[1:].encode())
    await response.write_eof()
    return response


@web.middleware
async def _see(request: web.Request, handler: Any) -> web.StreamResponse:
    request.app[SEEN].append({"method": request.method, "raw_path": request.rel_url.raw_path,
                              "query_string": request.rel_url.raw_query_string,
                              "headers": dict(request.headers)})
    response: web.StreamResponse = await handler(request)
    return response


def build_mock_upstream() -> web.Application:
    app = web.Application(middlewares=[_see], client_max_size=64 * 1024 * 1024)  # multimodal prompts
    app[REQUESTS] = []
    app[SEEN] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/_mock/requests", recorded)
    app.router.add_get("/v1/models", models_list)
    app.router.add_get("/v1/models/{model}", models_retrieve)
    app.router.add_post("/v1/moderations", moderations)
    from metergate.demo.mock_anthropic import count_tokens, messages
    from metergate.demo.mock_responses import responses

    app.router.add_post("/v1/messages/count_tokens", count_tokens)

    app.router.add_route("*", "/compute/run", compute_run)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    from metergate.demo.mock_media import add_routes

    add_routes(app)  # audio and images
    return app
