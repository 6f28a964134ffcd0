"""Tracing hooks: the pipeline's calls into OpenTelemetry, which cost a context-variable read when tracing is off.

Tracing is off unless the ``tracing`` setting is ``otlp``, or it is ``auto`` (the default) and the standard
``OTEL_TRACES_EXPORTER`` variable names ``otlp``; ``OTEL_SDK_DISABLED=true`` turns it off whatever else
says. Off, this module never imports ``opentelemetry`` (the extra ``metergate[otel]`` need not be installed),
and every hook below returns after reading :data:`CURRENT`, which nothing sets. On,
:mod:`metergate.observability.otel` does the work: the proxy's handler is wrapped so that each request on a
proxy route gets a SERVER span (the caller's W3C ``traceparent`` as its parent), the request's state is
put in :data:`CURRENT`, and the hooks add the hold, extend and settle spans, the upstream CLIENT span (with
its ``traceparent`` injected upstream) and the GenAI attributes.

No hook ever records prompt or completion text, a customer id or a key: attributes come from the route,
the model names, token counts and amounts (see :mod:`metergate.observability.otel`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import asyncio

    from aiohttp import ClientResponse
    from multidict import CIMultiDict

    from metergate.config.routes import RouteMatch
    from metergate.proxy.adapters.base import Prepared
    from metergate.proxy.pipeline import Exchange
    from metergate.wallet.models import Settlement, UsageRecord

log = logging.getLogger(__name__)
TracingMode = Literal["auto", "off", "otlp"]


class SpanLike(Protocol):
    def set_attribute(self, key: str, value: Any) -> Any: ...


class RequestTrace(Protocol):
    """One traced request's spans (implemented in :mod:`metergate.observability.otel`)."""

    def holding(self, prepared: Prepared, match: RouteMatch) -> AbstractContextManager[SpanLike]: ...
    def span(self, name: str) -> AbstractContextManager[SpanLike]: ...
    def forwarding(self, ex: Exchange, headers: CIMultiDict[str]) -> None: ...
    def answered(self, upstream: ClientResponse) -> None: ...
    def event(self, data: bytes | None) -> None: ...
    def body(self, body: bytes) -> None: ...
    def upstream_done(self, ex: Exchange) -> None: ...
    def settled(self, ex: Exchange, record: UsageRecord, task: asyncio.Future[Settlement | None]) -> None: ...


#: The request being traced, set by the traced handler for its task (and the tasks it starts); None when off.
CURRENT: ContextVar[RequestTrace | None] = ContextVar("metergate_trace", default=None)


class _NullSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NULL: AbstractContextManager[SpanLike] = contextlib.nullcontext(_NullSpan())


def enabled(mode: TracingMode, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to trace, from the ``tracing`` setting and the standard OTEL_* variables."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or mode == "off":
        return False
    if mode == "otlp":
        return True
    exporters = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}
    if exporters - {"otlp", "none"}:
        log.warning("OTEL_TRACES_EXPORTER=%s: metergate exports traces over OTLP only; the others are ignored",
                    env["OTEL_TRACES_EXPORTER"])
    return "otlp" in exporters


# ------------------------------------------------------------------ the pipeline's hooks


def holding(prepared: Prepared, match: RouteMatch) -> AbstractContextManager[SpanLike]:
    """Around placing the first hold: the ``metergate.hold`` span; names the request's model on the server span."""
    trace = CURRENT.get()
    return _NULL if trace is None else trace.holding(prepared, match)


def span(name: str) -> AbstractContextManager[SpanLike]:
    """An INTERNAL span (``metergate.extend``, ``metergate.settle``) under the request's server span."""
    trace = CURRENT.get()
    return _NULL if trace is None else trace.span(name)


def forwarding(ex: Exchange, headers: CIMultiDict[str]) -> None:
    """The upstream call starts: its CLIENT span, and its ``traceparent`` in ``headers``."""
    trace = CURRENT.get()
    if trace is not None:
        trace.forwarding(ex, headers)


def answered(upstream: ClientResponse) -> None:
    """The upstream's response headers arrived."""
    trace = CURRENT.get()
    if trace is not None:
        trace.answered(upstream)


def active() -> bool:
    """Whether this request is traced: asked once by a loop that would otherwise ask per event."""
    return CURRENT.get() is not None


def event(data: bytes | None) -> None:
    """One event of the upstream's stream (read for the response model and finish reasons, never its text)."""
    trace = CURRENT.get()
    if trace is not None:
        trace.event(data)


def body(data: bytes) -> None:
    """The upstream's whole JSON answer (read for the response model and finish reasons, never its text)."""
    trace = CURRENT.get()
    if trace is not None:
        trace.body(data)


def upstream_done(ex: Exchange) -> None:
    """The upstream exchange is over (the settlement starts): the CLIENT span ends."""
    trace = CURRENT.get()
    if trace is not None:
        trace.upstream_done(ex)


def settled(ex: Exchange, record: UsageRecord, task: asyncio.Future[Settlement | None]) -> None:
    """The settlement's done callback: usage and money on the server span."""
    trace = CURRENT.get()
    if trace is not None:
        trace.settled(ex, record, task)


__all__ = ["CURRENT", "RequestTrace", "TracingMode", "enabled", "forwarding", "holding", "settled", "span"]
