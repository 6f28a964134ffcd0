"""The mock upstream's OpenAI Responses endpoint: a response object as JSON, or typed stream events
ending in ``response.completed`` (``response.failed`` with ``X-Mock-Behavior: failed``; no ``[DONE]``).
``usage-field:PATH=JSON``, ``coerce-stream`` and ``force-stream`` as in :mod:`metergate.demo.mock_upstream`."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from metergate.demo.mock_upstream import _preamble, _reply_words, _sse, override_usage, wants_stream
from metergate.metering.tokenizer import counter_for


def _prompt_tokens(model: str, body: dict[str, Any]) -> int:
    count = counter_for(model).count
    items = body.get("input")
    if isinstance(items, str):
        total = count(items)
    else:
        total = 0
        for item in items or []:
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, str):
                total += 3 + count(content)
            elif isinstance(content, list):
                total += 3 + sum(count(p.get("text", "")) for p in content if isinstance(p, dict))
    instructions = body.get("instructions")
    return total + (count(instructions) if isinstance(instructions, str) else 0)


def _response(ident: str, model: str, status: str, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    output = [] if not text else [{
        "type": "message", "id": f"msg_{ident[5:]}", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    return {"id": ident, "object": "response", "created_at": int(time.time()), "status": status,
            "error": {"code": "server_error", "message": "mock failure"} if status == "failed" else None,
            "incomplete_details": None, "instructions": None, "max_output_tokens": None, "model": model,
            "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}


async def responses(request: web.Request) -> web.StreamResponse:
    pre = await _preamble(request)
    if isinstance(pre, web.Response):
        return pre
    body, b = pre
    model = body["model"]
    prompt = _prompt_tokens(model, body)
    words = _reply_words(body, b)
    failed = "failed" in b
    text = "" if failed else "".join(words)
    output = counter_for(model).count(text)
    cached = min(int(b.get("cached", 0)), prompt)
    reasoning = min(int(b.get("reasoning", 0)), output)
    usage = None if "no-usage" in b else override_usage({
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": prompt + output}, b)
    ident = f"resp_{uuid.uuid4().hex[:24]}"
    status = "failed" if failed else "completed"
    if not wants_stream(body, b):
        return web.json_response(_response(ident, model, status, text, usage))
    item_id = f"msg_{ident[5:]}"
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response(ident, model, "in_progress", "", None)},
        {"type": "response.in_progress", "response": _response(ident, model, "in_progress", "", None)},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}},
        {"type": "response.content_part.added", "item_id": item_id, "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}},
    ]
    if not failed:
        events += [{"type": "response.output_text.delta", "item_id": item_id, "output_index": 0,
                    "content_index": 0, "delta": word, "logprobs": []} for word in words]
        events.append({"type": "response.output_text.done", "item_id": item_id, "output_index": 0,
                       "content_index": 0, "text": text, "logprobs": []})
    events.append({"type": f"response.{status}", "response": _response(ident, model, status, text, usage)})
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return await _sse(request, events, b, named=True, done=False)
