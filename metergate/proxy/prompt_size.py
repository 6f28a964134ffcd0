"""How a proxy request's prompt is counted, by the size of its body, so that no prompt blocks the event loop.

* up to ``tokenizer_inline_max_bytes``: counted exactly, on the loop (a few milliseconds at most);
* up to ``tokenizer_exact_max_bytes``: first priced at one token per byte of prompt text (an upper bound:
  a token is at least one byte), and refused with 402 ``insufficient_funds`` unless the wallet covers that —
  so an empty wallet costs no tokenizing at all — then counted exactly in the tokenizer's thread pool;
* larger: never tokenized; the upper bound itself is the estimate (``tokens_exact`` false), so the hold
  covers the worst case and the provider's reported usage is what is billed.

A request asking for more than ``request_max_output_tokens`` is refused before anything is priced.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from metergate.config.routes import RouteMatch
from metergate.config.settings import Settings
from metergate.errors import BadRequest
from metergate.metering.tokenizer import count_off_loop, upper_bound_counts
from metergate.metering.usage import Usage
from metergate.proxy.adapters.base import Adapter, Prepared
from metergate.proxy.identify import Identity
from metergate.wallet.errors import InsufficientFunds

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Pipeline


def _bounded_output(settings: Settings, prepared: Prepared) -> Prepared:
    """The request, unless it asks for more output than any request may (an integer that would overflow the
    price or the ledger further down)."""
    if prepared.max_output_tokens > settings.request_max_output_tokens:
        raise BadRequest(f"The request asks for more than {settings.request_max_output_tokens} output tokens "
                         "(its maximum times its number of choices).", code="invalid_request", param="max_tokens")
    return prepared


async def prepare_bounded(pipeline: Pipeline, attributes: dict[str, str], identity: Identity, match: RouteMatch,
                          adapter: Adapter, endpoint: str, body: bytes, payload: dict[str, Any]) -> Prepared:
    settings = pipeline.settings
    default_max_output = settings.default_max_output_tokens
    if len(body) <= settings.tokenizer_inline_max_bytes:
        return _bounded_output(settings, adapter.prepare(endpoint, body, payload, default_max_output))
    with upper_bound_counts():
        bound = replace(adapter.prepare(endpoint, body, payload, default_max_output), tokens_exact=False)
    _bounded_output(settings, bound)
    if len(body) > settings.tokenizer_exact_max_bytes:
        return bound
    rate = await pipeline.prices.resolve_request(
        identity.mode, identity.customer_id, model=bound.model, endpoint=bound.endpoint, route=match.route.prefix,
        provider=match.route.provider_id, attributes=attributes)
    # The smallest hold the request could be admitted with (its prompt's upper bound plus the first output
    # allowance: holds grow with the answer), so a small wallet is not refused for output it may never buy.
    least_output = min(bound.max_output_tokens, settings.initial_output_tokens)
    worst = pipeline.prices.estimate(rate, Usage(bound.input_tokens, least_output, source="estimated"),
                                     match.route.provider_id, bound.model)
    balance = await pipeline.store.balance(identity.mode, identity.customer_id, rate.asset)
    if balance.available < worst:
        raise pipeline.insufficient(identity, InsufficientFunds(asset=rate.asset, available=balance.available,
                                                                required=worst))
    return await count_off_loop(settings.tokenizer_threads, adapter.prepare, endpoint, body, payload,
                                default_max_output)
