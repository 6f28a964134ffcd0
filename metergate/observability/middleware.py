"""The observing middleware: gives each request its id (for logs and receipts) and counts refusals
(4xx by code as denials; 503s, storage unreachable or full, apart).

It sits inside :func:`metergate.http.error_middleware`, so it sees metergate's errors as raised — a
refusal is counted by its stable error code — and the error middleware's own log lines still carry the
request id.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from metergate.errors import MetergateError
from metergate.http import Handler
from metergate.observability.logs import new_request_id
from metergate.observability.metrics import Metrics


def observe_middleware(metrics: Metrics) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        new_request_id()
        try:
            return await handler(request)
        except MetergateError as error:
            if 400 <= error.status < 500:
                metrics.denied(error.code)
            elif error.status == 503:  # storage down or full: an operator's problem, not the caller's
                metrics.refused_unavailable(error.code)
            raise

    return observe
