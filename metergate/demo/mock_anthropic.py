"""The mock upstream's Anthropic Messages endpoint, in Anthropic's wire format (JSON and named SSE events).

Token counts come from tiktoken (the mock's stand-in for Claude's tokenizer). ``X-Mock-Behavior``:
``cached:N`` / ``cache-write:N`` report cache-read / cache-creation tokens (Anthropic's ``input_tokens``
excludes both), ``tool-use:NAME`` (a tool_use block, its input streamed as JSON pieces), ``no-usage``,
``error:STATUS``, ``die-after:N``, ``chunk-delay:S``, ``words:N``, ``usage-field:PATH=JSON`` (the body's
usage, or the stream's final ``message_delta`` usage), and ``coerce-stream`` / ``force-stream`` as in
:mod:`metergate.demo.mock_upstream`.
``POST /v1/messages/count_tokens`` answers ``{"input_tokens": N}`` with the same count, free.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from metergate.demo.mock_upstream import (
    _pieces,
    _preamble,
    _reply_words,
    _sse,
    override_usage,
    record_free,
    tool_arguments,
    wants_stream,
)
from metergate.metering.tokenizer import counter_for


def _prompt_tokens(model: str, body: dict[str, Any]) -> int:
    count = counter_for(model).count
    total = 0
    system = body.get("system")
    if isinstance(system, str):
        total += count(system)
    elif isinstance(system, list):
        total += sum(count(b.get("text", "")) for b in system if isinstance(b, dict))
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            total += 4 + count(content)
        elif isinstance(content, list):
            total += 4 + sum(count(b.get("text", "")) for b in content if isinstance(b, dict))
    return total


def _usage(prompt: int, output: int, b: dict[str, str]) -> dict[str, Any]:
    read = min(int(b.get("cached", 0)), prompt)
    write = min(int(b.get("cache-write", 0)), prompt - read)
    return {"input_tokens": prompt - read - write, "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read, "output_tokens": output}


async def messages(request: web.Request) -> web.StreamResponse:
    pre = await _preamble(request)
    if isinstance(pre, web.Response):
        return pre
    body, b = pre
    model = body["model"]
    prompt = _prompt_tokens(model, body)
    words = _reply_words(body, b)
    tool = b.get("tool-use")
    arguments = tool_arguments(words)
    output = counter_for(model).count(tool + arguments if tool else "".join(words))
    ident = f"msg_{uuid.uuid4().hex[:24]}"
    tool_id = f"toolu_{ident[4:16]}"
    usage = _usage(prompt, output, b)
    if not wants_stream(body, b):
        block = ({"type": "tool_use", "id": tool_id, "name": tool, "input": json.loads(arguments)} if tool
                 else {"type": "text", "text": "".join(words)})
        payload: dict[str, Any] = {
            "id": ident, "type": "message", "role": "assistant", "model": model, "content": [block],
            "stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None}
        if "no-usage" not in b:
            payload["usage"] = override_usage(usage, b)
        return web.json_response(payload)
    start_usage = {**usage, "output_tokens": 1}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {
            "id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, **({} if "no-usage" in b else {"usage": start_usage})}},
        {"type": "content_block_start", "index": 0, "content_block":
            {"type": "tool_use", "id": tool_id, "name": tool, "input": {}} if tool else {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    if tool:
        events += [{"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}
                   for piece in _pieces(arguments, len(words))]
        words = []
    for emitted, word in enumerate(words, start=1):
        events.append({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})
        if emitted == len(words) // 2 and "no-usage" not in b:
            # An intermediate cumulative count: a client that sums message_delta usages double-counts.
            events.append({"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                           "usage": {"output_tokens": counter_for(model).count("".join(words[:emitted]))}})
    events.append({"type": "content_block_stop", "index": 0})
    final_delta: dict[str, Any] = {"type": "message_delta",
                                   "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None}}
    if "no-usage" not in b:
        final_delta["usage"] = override_usage({"output_tokens": output}, b)
    events += [final_delta, {"type": "message_stop"}]
    return await _sse(request, events, b, named=True, done=False)


async def count_tokens(request: web.Request) -> web.Response:
    await record_free(request)
    body = await request.json()
    return web.json_response({"input_tokens": _prompt_tokens(body["model"], body)})
