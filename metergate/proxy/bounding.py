"""How a request whose output its hold does not cover is kept within what the wallet pays for.

A request that names its own output limit, fully covered by its hold, is bounded by the upstream and
goes up unchanged. Any other request starts on a small hold (``initial_output_tokens``) and is bounded by
metergate instead:

* a stream is metered as it is relayed, its hold grown as output flows (:mod:`metergate.proxy.budget`);
* a non-streaming request is **streamed internally**: :func:`as_stream` turns its upstream body into a
  stream request (with ``stream_options.include_usage`` for OpenAI, so that the provider's usage still
  arrives), the same budget meters it, and :mod:`metergate.proxy.assemble` answers the client one body;
* on a route whose upstream cannot stream (``unary_streaming: false``), :func:`with_output_limit` sets the
  request's output limit upstream to what its hold covers, and the receipt says so
  (``X-Metergate-Output-Limit``).

Either way an answer can never outgrow its hold, so nothing delivered goes unpaid and nothing is
written off because of output (item 2), and a small wallet is never refused for output it would not
have bought (item 11).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from metergate.proxy.adapters.base import Prepared

# The key that caps output, per endpoint as the adapters name it. Chat uses max_completion_tokens, which
# OpenAI accepts for every chat model (max_tokens is refused by reasoning models) and vLLM reads too.
_LIMIT_KEYS = {"chat.completions": ("max_completion_tokens", "max_tokens"), "completions": ("max_tokens",),
               "responses": ("max_output_tokens",), "messages": ("max_tokens",)}


def _payload(prepared: Prepared) -> dict[str, Any]:
    payload = json.loads(prepared.body)
    assert isinstance(payload, dict), "the pipeline parsed this body as an object before preparing it"
    return payload


def can_bound(prepared: Prepared) -> bool:
    """Whether the endpoint produces output metergate can meter and bound (embeddings produce none)."""
    return prepared.endpoint in _LIMIT_KEYS and prepared.max_output_tokens > 0


def as_stream(prepared: Prepared, provider: str) -> Prepared:
    """The same request asked of the upstream as a stream; the client still gets one body
    (``prepared.stream`` stays false: the usage record and the receipt describe what the client asked)."""
    payload = {**_payload(prepared), "stream": True}
    if provider != "anthropic" and prepared.endpoint in ("chat.completions", "completions"):
        options = payload.get("stream_options")
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return replace(prepared, body=json.dumps(payload, ensure_ascii=False).encode(), injected_usage=True)


def choices(prepared: Prepared) -> int:
    """How many answers the request asks for: its output limit applies to each."""
    payload = _payload(prepared)
    counts = [payload.get("n"), payload.get("best_of") if prepared.endpoint == "completions" else None]
    return max([1] + [c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0])


def with_output_limit(prepared: Prepared, tokens: int) -> Prepared:
    """The request with its output limit set to ``tokens`` per answer (the key the client used, else the
    endpoint's own), so that the upstream stops where the hold ends."""
    payload = _payload(prepared)
    keys = _LIMIT_KEYS[prepared.endpoint]
    key = next((k for k in keys if payload.get(k) is not None), keys[0])
    for other in keys:
        payload.pop(other, None)  # a second, larger limit must not survive beside the one set here
    payload[key] = tokens
    return replace(prepared, body=json.dumps(payload, ensure_ascii=False).encode(), output_capped=True,
                   max_output_tokens=tokens * choices(prepared))
