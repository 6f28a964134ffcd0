"""OpenTelemetry spans for the proxy, with the GenAI semantic conventions. Imported only when tracing is on.

Per request on a proxy route (the caller's ``traceparent``, if any, is the parent)::

    SERVER  "POST /openai"                 http.*, url.path (never the query), gen_ai.*, metergate.*
    ├── INTERNAL "metergate.hold"          the first hold (metergate.hold.amount, metergate.asset)
    ├── CLIENT   "chat gpt-4o-mini"        the upstream call, until the upstream exchange is over; its
    │                                      context is the ``traceparent`` the upstream receives
    ├── INTERNAL "metergate.extend"        each growth of the hold mid-stream
    └── INTERNAL "metergate.settle"        the settlement (metergate.charged, metergate.written_off)

Per group commit of the wallet (SQLite's writer, PostgreSQL's group commit), the root of a trace of its own::

    CLIENT "metergate.ledger.batch"        db.system.name, metergate.ledger.batch.{backend,size,duration_ms};
                                           one link per operation, to the span current when it was
                                           submitted (a request's hold, extend or settle span: its name
                                           says which operation; links carry no attributes, which would
                                           cost the writer about 7 us each)

Attributes are taken from the route, model names, token counts and amounts; no span carries prompt or
completion text, a customer id or a key. A customer id can be personal data (an e-mail, a user name) and
traces go to a backend with other access rules and retention than the ledger; a hash of an id from a
small space is reversible by guessing. ``metergate.request_id`` joins a span to the usage record (which
names the customer) under the admin API's authentication instead.

The provider is configured by the standard variables: ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT``, headers,
timeouts, ``OTEL_TRACES_SAMPLER`` (default: parent-based, always on), ``OTEL_BSP_*``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME`` (default ``metergate``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import ClientResponse, web
from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metergate import __version__
from metergate.errors import MetergateError
from metergate.http import Handler
from metergate.observability import ledger_batches, tracing
from metergate.observability.logs import current_request_id
from metergate.observability.tracing import SpanLike

if TYPE_CHECKING:
    from metergate.config.routes import RouteMatch
    from metergate.proxy.adapters.base import Prepared
    from metergate.proxy.pipeline import Exchange
    from metergate.wallet.models import Settlement, UsageRecord

SERVICE_NAME = "metergate"
# gen_ai.operation.name by the adapters' endpoint names.
_OPERATIONS = {"chat.completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
               "responses": "chat", "messages": "chat"}
_PROPAGATOR = TraceContextTextMapPropagator()
_MAX_FINISH_REASONS = 16  # one per choice; a bound on what a span keeps
# An event that may carry a finish reason (a string, not null) or a Responses API final status.
_REASON_MARKS = (b'_reason":"', b'_reason": "', b'"response.completed"', b'"response.incomplete"')


def otlp_provider() -> TracerProvider:
    """A provider exporting over OTLP/HTTP in batches, configured by the OTEL_* variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def traced(handler: Handler, provider: trace.TracerProvider) -> Handler:
    """``handler`` (the proxy's) with a SERVER span around each request, parented by its ``traceparent``."""
    tracer = provider.get_tracer("metergate", __version__)

    async def handle(request: web.Request) -> web.StreamResponse:
        parent = _PROPAGATOR.extract(request.headers)
        span = tracer.start_span(request.method, context=parent, kind=SpanKind.SERVER, attributes={
            "http.request.method": request.method, "url.path": request.rel_url.raw_path,
            "url.scheme": request.scheme})
        ctx = trace.set_span_in_context(span, parent)
        state = _Request(tracer, span, ctx, request.method)
        token, attached = tracing.CURRENT.set(state), otel_context.attach(ctx)
        status, error_type = 500, None
        try:
            response = await handler(request)
            status = response.status
            return response
        except MetergateError as error:
            status = error.status
            span.set_attribute("metergate.error_code", error.code)
            raise
        except web.HTTPException as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status, error_type = 499, "cancelled"  # the client went away, or shutdown cut it, before an answer
            raise
        except Exception as error:
            span.record_exception(error)
            error_type = type(error).__qualname__
            raise
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500 or error_type is not None:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", error_type or str(status))
            state.end_client()
            span.end()
            otel_context.detach(attached)
            tracing.CURRENT.reset(token)

    return handle


class _Request:
    """The spans of one traced request; the pipeline reaches it through :mod:`metergate.observability.tracing`."""

    __slots__ = ("client", "ctx", "finish_reasons", "method", "response_model", "server", "tracer")

    def __init__(self, tracer: trace.Tracer, server: Span, ctx: Context, method: str) -> None:
        self.tracer, self.server, self.ctx, self.method = tracer, server, ctx, method
        self.client: Span | None = None
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []

    def holding(self, prepared: Prepared, match: RouteMatch) -> AbstractContextManager[SpanLike]:
        route = match.route
        self.server.update_name(f"{self.method} {route.prefix}")
        attributes: dict[str, Any] = {
            "http.route": route.prefix, "gen_ai.operation.name": _OPERATIONS.get(prepared.endpoint, prepared.endpoint),
            "gen_ai.provider.name": route.provider_id, "gen_ai.system": route.provider_id,
            "gen_ai.request.model": prepared.model, "metergate.endpoint": prepared.endpoint,
            "metergate.stream": prepared.stream, "metergate.estimated_input_tokens": prepared.input_tokens}
        if prepared.output_capped:
            max_tokens = _requested_max_tokens(prepared.body)
            if max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = max_tokens
        if (request_id := current_request_id()) is not None:
            attributes["metergate.request_id"] = request_id
        self.server.set_attributes(attributes)
        return self.span("metergate.hold")

    @contextmanager
    def _internal(self, name: str) -> Iterator[SpanLike]:
        with self.tracer.start_as_current_span(name, context=self.ctx, kind=SpanKind.INTERNAL) as span:
            yield span

    def span(self, name: str) -> AbstractContextManager[SpanLike]:
        return self._internal(name)

    def forwarding(self, ex: Exchange, headers: CIMultiDict[str]) -> None:
        url = ex.match.upstream_url
        operation = _OPERATIONS.get(ex.prepared.endpoint, ex.prepared.endpoint)
        self.server.set_attributes({"metergate.hold.amount": ex.hold.amount, "metergate.asset": ex.hold.asset,
                                    "metergate.mode": ex.identity.mode})
        self.client = self.tracer.start_span(f"{operation} {ex.prepared.model}", context=self.ctx,
                                             kind=SpanKind.CLIENT, attributes={
            "http.request.method": "POST", "server.address": url.host or "", "server.port": url.port or 0,
            "url.full": str(url.with_query(None).with_user(None)), "gen_ai.operation.name": operation,
            "gen_ai.provider.name": ex.match.route.provider_id, "gen_ai.system": ex.match.route.provider_id,
            "gen_ai.request.model": ex.prepared.model})
        # The caller's own trace headers are replaced: the upstream's parent is this call.
        headers.popall("traceparent", None)
        headers.popall("tracestate", None)
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(self.client, self.ctx))

    def answered(self, upstream: ClientResponse) -> None:
        if self.client is not None:
            self.client.set_attribute("http.response.status_code", upstream.status)
            if upstream.status >= 400:
                self.client.set_attribute("error.type", str(upstream.status))
                self.client.set_status(Status(StatusCode.ERROR))

    def event(self, data: bytes | None) -> None:
        # Only the response model (the first event that names one) and finish reasons are read; a chunk's
        # text is never parsed into an attribute.
        if data is None or (self.response_model is not None and not any(mark in data for mark in _REASON_MARKS)):
            return
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if isinstance(payload, dict):
            self._read(payload)

    def body(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if isinstance(payload, dict):
            self._read(payload)

    def _read(self, payload: dict[str, Any]) -> None:
        message = payload.get("message")  # Anthropic's message_start
        source = message if isinstance(message, dict) else payload
        model = source.get("model")
        if self.response_model is None and isinstance(model, str):
            self.response_model = model[:200]
        reasons: list[Any] = []
        choices = payload.get("choices")
        if isinstance(choices, list):
            reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
        delta = payload.get("delta")
        for holder in (source, delta if isinstance(delta, dict) else None):
            if holder is not None:
                reasons.append(holder.get("stop_reason"))  # Anthropic
        if payload.get("object") == "response" or payload.get("type") == "response.completed":
            response = payload.get("response", payload)
            if isinstance(response, dict):
                reasons.append(response.get("status"))  # OpenAI Responses
        for reason in reasons:
            if isinstance(reason, str) and len(self.finish_reasons) < _MAX_FINISH_REASONS:
                self.finish_reasons.append(reason[:64])

    def upstream_done(self, ex: Exchange) -> None:
        if self.client is not None and ex.upstream is None:
            # No answer came: the upstream timed out or could not be reached (the request's own status says which).
            self.client.set_attribute("error.type", "timeout" if ex.status == 504 else "unreachable")
            self.client.set_status(Status(StatusCode.ERROR))
        if self.response_model is not None and self.client is not None:
            self.client.set_attribute("gen_ai.response.model", self.response_model)
        self.end_client()

    def end_client(self) -> None:
        if self.client is not None:
            self.client.end()
            self.client = None

    def settled(self, ex: Exchange, record: UsageRecord, task: asyncio.Future[Settlement | None]) -> None:
        settlement = None if task.cancelled() or task.exception() is not None else task.result()
        attributes: dict[str, Any] = {"metergate.usage_source": record.usage_source, "metergate.asset": record.asset,
                                      "metergate.settled": settlement is not None}
        if record.usage_source != "none":
            attributes["gen_ai.usage.input_tokens"] = record.tokens_input
            attributes["gen_ai.usage.output_tokens"] = record.tokens_output
            if record.tokens_cached_input:
                attributes["gen_ai.usage.cache_read.input_tokens"] = record.tokens_cached_input
        if settlement is not None:
            attributes["metergate.charged"] = settlement.charged
            if settlement.written_off:
                attributes["metergate.written_off"] = settlement.written_off
        if self.response_model is not None:
            attributes["gen_ai.response.model"] = self.response_model
        if self.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = tuple(self.finish_reasons)
        if ex.stopped:
            attributes["metergate.stopped"] = ex.stopped
        self.server.set_attributes(attributes)


class _LedgerBatches:
    """The recorder of :mod:`metergate.observability.ledger_batches`: a span per written batch, linked to the
    spans its operations were submitted under. Its ``batch`` runs on SQLite's writer thread too: the SDK's
    tracer and processors are thread-safe, and nothing here touches the submitting tasks' context."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def link(self, op: object) -> trace.SpanContext | None:
        context = trace.get_current_span().get_span_context()
        if not (context.is_valid and context.trace_flags.sampled):
            return None  # nothing traced, or a request the sampler dropped: a link would point nowhere
        return context

    @contextmanager
    def batch(self, backend: str, ops: Sequence[ledger_batches.Queued]) -> Iterator[None]:
        links = [Link(op.link) for op in ops if op.link is not None]
        # No parent: a batch belongs to no one request's trace (the links say whose operations it carries).
        span = self.tracer.start_span("metergate.ledger.batch", context=_ROOT, kind=SpanKind.CLIENT, links=links,
                                      attributes={"db.system.name": backend, "metergate.ledger.batch.backend": backend,
                                                  "metergate.ledger.batch.size": len(ops)},
                                      record_exception=False, set_status_on_exception=False)
        started = time.perf_counter_ns()
        try:
            yield
        except BaseException as error:  # the batch failed as a whole: its operations are applied again alone
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", type(error).__qualname__)
            raise
        finally:
            span.set_attribute("metergate.ledger.batch.duration_ms", (time.perf_counter_ns() - started) / 1e6)
            span.end()


_ROOT = Context()


def ledger_batch_spans(provider: trace.TracerProvider) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` that traces the wallet's batches into ``provider`` while the app runs."""
    recorder = _LedgerBatches(provider.get_tracer("metergate", __version__))

    async def installed(_app: web.Application) -> AsyncIterator[None]:
        ledger_batches.install(recorder)
        try:
            yield
        finally:
            ledger_batches.uninstall(recorder)

    return installed


def _requested_max_tokens(body: bytes) -> int | None:
    """The output limit the request names (OpenAI's two spellings, Responses', Anthropic's)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None

