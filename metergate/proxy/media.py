"""The relay of OpenAI's audio and image endpoints: check, hold, forward, bill the unit the provider bills.

What a request is held for and billed is decided by :mod:`metergate.proxy.adapters.media`; this module runs
the exchange with the pipeline's own pieces (identification, rate limits, the hold, the upstream session,
the one settlement and its receipt), so that every path out (an answer, an upstream error, a client that
hangs up, a cancellation) settles exactly once. The body is forwarded byte for byte as the client sent it:
a multipart upload keeps its own boundary, and only the fields metergate read were checked.

JSON answers (transcripts, images) are read whole, within ``max_response_bytes``, billed from their usage,
and answered with the full receipt. Audio (speech) and event streams (``stream_format: "sse"``, streamed
transcripts) are relayed as they arrive, with ``X-Metergate-Held``; they are settled before their end reaches
the client. An upstream error answer costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from metergate.config.routes import RouteMatch
from metergate.errors import (
    BadRequest,
    MetergateError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from metergate.metering.usage import Usage
from metergate.pricing.service import Resolved
from metergate.proxy import headers as hh
from metergate.proxy.adapters.azure import AzureAdapter, AzureEndpoint
from metergate.proxy.adapters.base import Prepared
from metergate.proxy.adapters.media import (
    ENDPOINTS,
    MULTIPART,
    SPEECH,
    Basis,
    MediaRequest,
    charged_usage,
    classify,
    estimate,
    read_request,
    stream_report,
)
from metergate.proxy.adapters.schema import check_model
from metergate.proxy.methods import check_method
from metergate.proxy.sse import EventTooLarge, SSEBuffer, event_data
from metergate.proxy.upstream_body import read_limited_answer

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Exchange, Pipeline

log = logging.getLogger(__name__)
_CLIENT_GONE = (ConnectionResetError, ConnectionError, aiohttp.ClientConnectionResetError)
_UNIT_NAMES = {"audio_seconds": "second of audio", "characters": "character"}


class MediaRelay:
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self._served = {route.prefix: route.provider for route in pipeline.settings.routes
                        if route.compute is None and route.provider in ("openai", "azure")}

    def find(self, match: RouteMatch) -> str | None:
        """The media endpoint ``match`` names on an ``openai`` or ``azure`` route, else ``None`` (an Azure
        deployment the route does not serve: 404 ``unknown_deployment``, before the body is read)."""
        provider = self._served.get(match.route.prefix)
        if provider == "openai":
            return classify(match.upstream_path)
        if provider == "azure":
            endpoint = self._p._adapters[match.route.prefix].classify(match.upstream_path)
            return endpoint if endpoint in ENDPOINTS else None
        return None

    def _priced_as(self, match: RouteMatch, endpoint: str) -> Callable[[dict[str, Any]], str] | None:
        """On an Azure route, the model a request is priced as: its deployment's (from the path, or from the
        body's ``model`` on the v1 API); ``None`` elsewhere (the body's ``model``)."""
        adapter = self._p._adapters[match.route.prefix]
        if not isinstance(adapter, AzureAdapter):
            return None
        target = endpoint.target if isinstance(endpoint, AzureEndpoint) else None
        named = target.deployment if target is not None else None
        return lambda payload: adapter.model_of(named or check_model(payload))

    async def handle(self, request: web.Request, request_id: str, match: RouteMatch,
                     endpoint: str) -> web.StreamResponse:
        from metergate.proxy.pipeline import Exchange

        p = self._p
        if (options := check_method(request, ("POST", "OPTIONS"), endpoint)) is not None:
            return options
        identity = await p.identifier.identify(request)
        attributes = p.prices.request_attributes(
            request.headers, identity.attributes if identity.via == "api_key" else None)
        body = await self._read_body(request, endpoint)
        content_type = request.headers.get("Content-Type", "")
        priced_as = self._priced_as(match, endpoint)
        asked = await read_request(endpoint, body, content_type, p.settings.media, priced_as)
        deployment = None  # an Azure request's deployment, which its usage record names
        if priced_as is not None:
            target = endpoint.target if isinstance(endpoint, AzureEndpoint) else None
            deployment = target.deployment if target is not None and target.deployment else asked.named
        provider = match.route.provider_id
        rate = await p.prices.resolve_request(
            identity.mode, identity.customer_id, model=asked.model, endpoint=endpoint, route=match.route.prefix,
            provider=provider, attributes=attributes)
        basis = _basis(asked, rate)
        held = estimate(asked, basis, p.settings.media)
        await p.ratelimiter.admit(identity, held.input_tokens + held.output_tokens)
        hold = await p._authorize(identity, request_id, p.prices.estimate(rate, held, provider, asked.model),
                                  rate.asset)
        p.metrics.hold_opened()
        prepared = Prepared(str(endpoint), asked.model, asked.stream, held.input_tokens, held.output_tokens,
                            asked.exact, body, output_capped=True, deployment=deployment,
                            content_type=content_type if endpoint in MULTIPART else "application/json")
        ex = Exchange(request_id, identity, match, p._adapters[match.route.prefix], prepared, rate, hold,
                      attributes.get("feature"), time.monotonic())
        task = asyncio.current_task()
        assert task is not None
        p._active[request_id] = (ex, task)
        stream: dict[str, Any] = {}  # what a relayed stream reported so far (its usage, its text)
        try:
            upstream = await p._send(request, ex)
            p._check_redirect(upstream)
            if upstream.status < 400 and (endpoint == SPEECH or "text/event-stream" in upstream.headers.get(
                    "Content-Type", "")):
                return await self._relay_stream(request, ex, upstream, asked, basis, held, stream)
            return await self._relay_whole(ex, upstream, asked, basis, held)
        except MetergateError as error:
            ex.status = error.status
            raise
        finally:
            p._active.pop(request_id, None)
            if ex.settlement is None:  # an exception or a cancellation: bill what was delivered, if anything
                usage = charged_usage(asked, basis, held, None, stream.get("usage"), stream.get("text", ""),
                                      prepared.anomalies) if ex.delivered else None
                await p._settle_shielded(ex, usage)

    async def _read_body(self, request: web.Request, endpoint: str) -> bytes:
        p = self._p
        if endpoint not in MULTIPART:
            return await p._read_body(request)
        if request.content_type != "multipart/form-data":
            raise UnsupportedMediaType("Send this request as multipart/form-data.")
        limit = p.settings.max_body_bytes_multimodal
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _relay_whole(self, ex: Exchange, upstream: aiohttp.ClientResponse, asked: MediaRequest,
                           basis: Basis, held: Usage) -> web.StreamResponse:
        p = self._p
        try:
            body = await read_limited_answer(upstream, p.settings.max_response_bytes,
                                               note=" Nothing was charged.")
        finally:
            upstream.release()
        ex.status = upstream.status
        usage: Usage | None = None
        if upstream.status < 400:
            ex.delivered = True
            usage = charged_usage(asked, basis, held, body, None, "", ex.prepared.anomalies)
        settlement = await p._settle_shielded(ex, usage)
        headers = hh.client_response_headers(upstream.headers)
        headers.update(p._receipt(ex, settlement, usage))
        return web.Response(body=body, status=upstream.status, headers=headers)

    async def _relay_stream(self, request: web.Request, ex: Exchange, upstream: aiohttp.ClientResponse,
                            asked: MediaRequest, basis: Basis, held: Usage,
                            stream: dict[str, Any]) -> web.StreamResponse:
        """Audio bytes or events, relayed as they come; the events are read for their usage on the way."""
        p = self._p
        ex.status, ex.delivered, ex.prepared.stream = upstream.status, True, True
        events = "text/event-stream" in upstream.headers.get("Content-Type", "")
        sse = SSEBuffer(p.settings.sse_max_event_bytes) if events else None
        response = web.StreamResponse(status=upstream.status, headers=hh.client_response_headers(upstream.headers))
        response.headers.update(p._receipt(ex, None, None))
        client_gone = False
        drained = 0
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if sse is not None:
                    for event in sse.feed(chunk):
                        stream_report(event_data(event), stream)
                if client_gone:
                    drained += len(chunk)  # reading on for the usage at the end, within the drain bound
                    if sse is None or drained > p.settings.drain_max_bytes:
                        break
                    continue
                try:
                    await response.write(chunk)
                except _CLIENT_GONE:
                    client_gone = True
            if sse is not None and (rest := sse.rest()).strip():
                stream_report(event_data(rest), stream)
        except (TimeoutError, aiohttp.ClientError, EventTooLarge) as exc:
            log.warning("%s: media stream ended abnormally: %s", ex.request_id, type(exc).__name__)
        finally:
            upstream.release()
        usage = charged_usage(asked, basis, held, None, stream.get("usage"), stream.get("text", ""),
                              ex.prepared.anomalies)
        await p._settle_shielded(ex, usage)
        if not client_gone:
            with contextlib.suppress(*_CLIENT_GONE):
                await response.write_eof()
        return response


def _basis(asked: MediaRequest, rate: Resolved) -> Basis:
    """Per unit when the rule prices the request's unit (or prices over the provider's cost, which knows
    every unit); per token for a model the provider bills by token; otherwise refused."""
    unit = asked.unit
    if unit is not None and (rate.rule.prices(unit) or rate.rule.markup is not None):
        return "unit"
    if asked.token_billed:
        return "tokens"
    what = _UNIT_NAMES.get(unit or "", "image at this size and quality")
    raise BadRequest(f"Model {asked.model!r} is billed per {what}, and its price rule {rate.rule.id!r} has no rate "
                     f"for {unit or 'its images'}; nothing was charged.", code="unpriced_unit", param="model")


__all__ = ["MediaRelay"]
