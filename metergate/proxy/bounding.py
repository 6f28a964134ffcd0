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
  (``X-Metergate-Output-Limit``). Gemini and Bedrock requests, streams included, are always bounded this
  way (:data:`BOUNDED_UPSTREAM`): Gemini's thinking tokens never reach metergate as text, so no budget over
  the delivered text could bound them, while ``maxOutputTokens`` bounds thinking and answer together; a
  Bedrock event stream's frames carry no stop metergate could add, so ``inferenceConfig.maxTokens`` does.

Either way an answer can never outgrow its hold, so nothing delivered goes unpaid and nothing is
written off because of output (item 2), and a small wallet is never refused for output it would not
have bought (item 11).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from metergate.config.routes import RouteSettings
from metergate.payments.spendcaps import SpendCapReached
from metergate.proxy.adapters.base import Prepared
from metergate.proxy.assemble import Assembler, assembler_for
from metergate.proxy.budget import tokens_covered
from metergate.wallet.errors import InsufficientFunds
from metergate.wallet.models import Hold

# The key that caps output, per endpoint as the adapters name it. Chat uses max_completion_tokens, which
# OpenAI accepts for every chat model (max_tokens is refused by reasoning models) and vLLM reads too.
# A dotted key is a field inside an object (Gemini's generationConfig.maxOutputTokens).
_LIMIT_KEYS = {"chat.completions": ("max_completion_tokens", "max_tokens"), "completions": ("max_tokens",),
               "responses": ("max_output_tokens",), "messages": ("max_tokens",),
               "generate_content": ("generationConfig.maxOutputTokens",),
               "converse": ("inferenceConfig.maxTokens",), "converse-stream": ("inferenceConfig.maxTokens",)}
# Providers whose output is always bounded by an output limit set upstream, never by a budget mid-stream.
BOUNDED_UPSTREAM = frozenset({"gemini", "bedrock"})


@dataclass(frozen=True, slots=True)
class HoldPlan:
    """A request's first hold, the body that goes upstream, and how its output is bounded."""

    hold: Hold
    prepared: Prepared
    covered_tokens: int  # output tokens the hold covers
    bounded: bool = True  # the upstream cannot outgrow the hold (or enforcement is off): no budget needed
    output_limit: int | None = None  # the per-answer output limit metergate set upstream
    assembler: Assembler | None = None  # set when a non-streaming request is streamed internally


async def plan_hold(prepared: Prepared, route: RouteSettings, *, price: Callable[[int], int],
                    reserve: Callable[[int], Awaitable[Hold]], initial_output_tokens: int,
                    extend_tokens: int) -> HoldPlan:
    """Place the request's first hold and choose how its output is bounded.

    ``price(n)`` is the estimate of the prompt plus ``n`` output tokens; ``reserve(amount)`` places the hold
    or raises ``InsufficientFunds`` / ``SpendCapReached`` having written nothing, so that a refused attempt
    can be retried smaller under the same hold id. A request whose own output limit the wallet covers is
    held in full and goes up unchanged. Any other request is held for ``initial_output_tokens`` and bounded
    by metergate, so that a small wallet is refused only when it cannot cover the prompt plus that first
    bit of output. With enforcement off (``extend_tokens`` 0), and for endpoints without output, the hold
    is the whole possible output, as before."""
    possible = prepared.max_output_tokens
    growing = extend_tokens > 0 and can_bound(prepared)
    # The output can be metered (and stopped) as it is produced. A gemini or bedrock route's never is: its
    # output limit is set upstream to what the hold covers, streams included (Gemini's thinking never reaches
    # metergate as text; Bedrock's frames carry no stop metergate could add).
    metered = (prepared.stream or route.unary_streaming) and route.provider not in BOUNDED_UPSTREAM
    initial = min(initial_output_tokens, possible)
    if not growing or prepared.output_capped or not metered:
        try:
            hold = await reserve(price(possible))
        except (InsufficientFunds, SpendCapReached) as short:
            if growing and not metered and isinstance(short, InsufficientFunds):
                return await _capped(prepared, short, price, reserve)
            if not growing or not metered or possible <= initial:
                raise
        else:
            if growing and not metered and not prepared.output_capped:
                per_answer = possible // choices(prepared)
                return HoldPlan(hold, with_output_limit(prepared, per_answer), possible, output_limit=per_answer)
            return HoldPlan(hold, prepared, possible)
    hold = await reserve(price(initial))
    if prepared.stream:
        return HoldPlan(hold, prepared, initial, bounded=False)
    return HoldPlan(hold, as_stream(prepared, route.provider), initial, bounded=False,
                    assembler=assembler_for(route.provider, prepared.endpoint))


async def _capped(prepared: Prepared, short: InsufficientFunds, price: Callable[[int], int],
                  reserve: Callable[[int], Awaitable[Hold]]) -> HoldPlan:
    """A non-streaming request to an upstream that cannot stream, whose whole possible output the wallet
    cannot cover: hold what the wallet has and set the output limit upstream to what that covers."""
    answers = choices(prepared)
    per_answer = tokens_covered(price, short.available) // answers
    if per_answer < 1:
        raise short
    hold = await reserve(price(per_answer * answers))
    return HoldPlan(hold, with_output_limit(prepared, per_answer), per_answer * answers, output_limit=per_answer)


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
    counts = [payload.get("n"), payload.get("best_of") if prepared.endpoint == "completions" else None,
              _get(payload, "generationConfig.candidateCount") if prepared.endpoint == "generate_content" else None]
    return max([1] + [c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0])


def _get(payload: dict[str, Any], key: str) -> Any:
    head, _, rest = key.partition(".")
    value = payload.get(head)
    return _get(value, rest) if rest and isinstance(value, dict) else (None if rest else value)


def _set(payload: dict[str, Any], key: str, value: int) -> None:
    head, _, rest = key.partition(".")
    if rest:
        inner = payload.get(head)
        payload[head] = inner = dict(inner) if isinstance(inner, dict) else {}
        _set(inner, rest, value)
    else:
        payload[head] = value


def _pop(payload: dict[str, Any], key: str) -> None:
    head, _, rest = key.partition(".")
    if rest:
        if isinstance(inner := payload.get(head), dict):
            _pop(inner, rest)
    else:
        payload.pop(head, None)


def with_output_limit(prepared: Prepared, tokens: int) -> Prepared:
    """The request with its output limit set to ``tokens`` per answer (the key the client used, else the
    endpoint's own), so that the upstream stops where the hold ends."""
    if prepared.endpoint in ("converse", "converse-stream"):  # nested: Bedrock's inferenceConfig.maxTokens
        from metergate.proxy.adapters.bedrock import with_max_tokens

        return with_max_tokens(prepared, tokens)
    payload = _payload(prepared)
    keys = _LIMIT_KEYS[prepared.endpoint]
    key = next((k for k in keys if _get(payload, k) is not None), keys[0])
    for other in keys:
        _pop(payload, other)  # a second, larger limit must not survive beside the one set here
    _set(payload, key, tokens)
    return replace(prepared, body=json.dumps(payload, ensure_ascii=False).encode(), output_capped=True,
                   max_output_tokens=tokens * choices(prepared))
