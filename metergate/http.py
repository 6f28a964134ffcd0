"""The one place where errors become HTTP responses.

Every handler raises members of :mod:`metergate.errors`; this middleware renders them in the OpenAI
error envelope. aiohttp's own HTTP exceptions (unknown path, body too large) are mapped to the same
envelope, and anything unexpected becomes a generic 500 whose details go to the log, never to the
client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from metergate.errors import MetergateError, MethodNotAllowed, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(payload, separators=(",", ":"), default=str).encode(), status=status,
                        content_type="application/json", headers=headers)


def error_response(error: MetergateError) -> web.Response:
    return json_response(error.body(), status=error.status)


_AIOHTTP_ERRORS: dict[int, Callable[[], MetergateError]] = {
    404: lambda: NotFound("No such path.", code="unknown_route"),
    405: lambda: MethodNotAllowed("Method not allowed on this path."),
    413: lambda: PayloadTooLarge("The request body is too large."),
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MetergateError as error:
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        factory = _AIOHTTP_ERRORS.get(exc.status)
        error = factory() if factory else MetergateError(exc.reason, code=f"http_{exc.status}")
        if factory is None:
            return json_response(error.body(), status=exc.status)
        return error_response(error)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(MetergateError("Internal error; the request changed nothing it could not undo.",
                                             code="internal_error"))
