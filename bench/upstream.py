"""A fast fixed-response OpenAI-compatible upstream for the benchmark (not the tiktoken-counting mock).

``POST /v1/chat/completions`` answers with canned bytes prepared once at import time:

* non-streaming: a chat.completion JSON object with a ``usage`` object;
* ``"stream": true``: 20 ``chat.completion.chunk`` SSE events (role, 18 content deltas, finish),
  each written separately as a real upstream would, then a usage chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``.

The only per-request work is reading the (small) body and one ``json.loads``, so the upstream stays
cheap next to the proxies being measured. Run: ``python bench/upstream.py --port 9000``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aiohttp import web

MODEL = "gpt-4o-mini"
PROMPT_TOKENS = 40
COMPLETION_TOKENS = 20
_ID, _CREATED, _FP = "chatcmpl-bench0000000000000000000", 1_700_000_000, "fp_bench"
_WORDS = ["Metergate", "authorizes", "every", "request", "against", "a", "prepaid", "wallet", "before", "the",
          "upstream", "sees", "it", "and", "settles", "the", "exact", "amount."]  # 18 content chunks
USAGE = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
         "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

JSON_BODY = json.dumps({
    "id": _ID, "object": "chat.completion", "created": _CREATED, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(_WORDS), "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": USAGE, "system_fingerprint": _FP}).encode()


def _chunk(delta: dict[str, Any], finish: str | None, with_usage_field: bool) -> bytes:
    c: dict[str, Any] = {"id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": MODEL,
                         "system_fingerprint": _FP,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage_field:
        c["usage"] = None
    return b"data: " + json.dumps(c).encode() + b"\n\n"


def _events(include_usage: bool) -> list[bytes]:
    out = [_chunk({"role": "assistant", "content": "", "refusal": None}, None, include_usage)]
    out += [_chunk({"content": (" " if i else "") + w}, None, include_usage) for i, w in enumerate(_WORDS)]
    out.append(_chunk({}, "stop", include_usage))
    if include_usage:
        out.append(b"data: " + json.dumps({"id": _ID, "object": "chat.completion.chunk", "created": _CREATED,
                                           "model": MODEL, "system_fingerprint": _FP, "choices": [],
                                           "usage": USAGE}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


SSE_WITH_USAGE = _events(True)  # 20 content-bearing chunks + usage chunk + [DONE]
SSE_WITHOUT_USAGE = _events(False)
_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


async def chat(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    if body.get("stream") is not True:
        return web.Response(body=JSON_BODY, headers=_JSON_HEADERS)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    for event in SSE_WITH_USAGE if include_usage else SSE_WITHOUT_USAGE:
        await response.write(event)
    await response.write_eof()
    return response


def build_app() -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)  # bench/large_prompts.py sends 4 MB prompts
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
