"""The one place where errors become HTTP responses.

Every handler raises members of :mod:`metergate.errors`; this middleware renders them in the OpenAI
error envelope. aiohttp's own HTTP exceptions (unknown path, body too large) are mapped to the same
envelope, and anything unexpected becomes a generic 500 whose details go to the log, never to the
client.

Every error answer carries ``X-Metergate-Request-Id`` — the id of the request in the logs
(:func:`metergate.observability.logs.current_request_id`), or a fresh one, logged, for a request refused
before it got one — and, where the error has a verdict, ``x-should-retry`` (see :mod:`metergate.errors`).

Requests that aiohttp's HTTP parser rejects (a bad request line, CR or LF inside a header value, broken
chunked framing) never reach a handler or a middleware: aiohttp answers them itself, as text/plain
(aio-libs/aiohttp#3287 asks for a hook; none exists). :class:`JsonErrorAppRunner` serves an application
with a request handler that renders those answers in the same envelope; :func:`run_app` is
``web.run_app`` on that runner. Serve metergate with one of the two, never with a bare ``web.AppRunner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from metergate.errors import (
    BadRequest,
    MetergateError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from metergate.observability.logs import AccessLog, current_request_id, new_request_id
from metergate.wallet.errors import STORAGE_DOWN

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(payload, separators=(",", ":"), default=str).encode(), status=status,
                        content_type="application/json", headers=headers)


REQUEST_ID_HEADER = "X-Metergate-Request-Id"


def error_response(error: MetergateError, *, status: int | None = None) -> web.Response:
    """The answer to ``error``: its envelope, its headers (Retry-After, Allow), the request id, and
    ``x-should-retry`` when the error says whether a retry can succeed."""
    headers = {**error.headers, REQUEST_ID_HEADER: current_request_id() or new_request_id()}
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    return json_response(error.body(), status=status or error.status, headers=headers)


def _method_not_allowed(exc: web.HTTPException) -> MetergateError:
    allow = exc.headers.get("Allow", "")
    return MethodNotAllowed("Method not allowed on this path.",
                            allow=[method.strip() for method in allow.split(",") if method.strip()])


_AIOHTTP_ERRORS: dict[int, Callable[[web.HTTPException], MetergateError]] = {
    404: lambda _exc: NotFound("No such path.", code="unknown_route"),
    405: _method_not_allowed,
    413: lambda _exc: PayloadTooLarge("The request body is too large."),
}


def _malformed() -> MetergateError:
    return BadRequest("The HTTP request is malformed and could not be parsed.", code="malformed_request")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MetergateError as error:
        return error_response(error)
    except RequestPayloadError:
        # The body's framing is broken (bad chunk size, truncated chunk): the client's fault, not ours.
        return error_response(_malformed())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        factory = _AIOHTTP_ERRORS.get(exc.status)
        mapped = factory(exc) if factory else MetergateError(exc.reason, code=f"http_{exc.status}")
        return error_response(mapped, status=exc.status)
    except STORAGE_DOWN as exc:
        log.warning("storage unreachable on %s %s: %s", request.method, request.path, type(exc).__name__)
        return error_response(ServiceUnavailable("The database is unreachable; nothing was charged. Retry shortly."))
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and (request.transport is None or request.transport.is_closing()):
            # The client left mid-request (typically while sending its body): nothing went wrong here and
            # no answer can reach it, so this is no error worth a traceback.
            log.info("client disconnected during %s %s", request.method, request.path)
            return error_response(BadRequest("The client closed the connection.", code="client_closed"))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(MetergateError("Internal error; the request changed nothing it could not undo.",
                                             code="internal_error"))


# ---------------------------------------------------------------------------------- serving


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with its own error answers rendered in the OpenAI envelope.

    aiohttp calls :meth:`handle_error` for a request its parser rejected (status 400), and for an
    exception that escaped the handler chain (500, or 504 on a timeout). The body never carries the
    parser's message or a traceback: those go to the log.
    """

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if current_request_id() is None:
            new_request_id()  # a request the parser refused has none yet; the log lines below get this one
        if status >= 500:
            log.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            # The kind of error only: aiohttp's message quotes the offending raw line, which may be an
            # Authorization header (tests/deploy/test_canary_secrets.py plants one).
            log.debug("malformed request from %s: %s", request.remote,
                      type(exc).__name__ if exc is not None else "unparseable")
        if request.writer.output_size > 0:
            # Part of a response is on the wire already; the only honest answer is to drop the connection.
            raise ConnectionError("response already started; cannot send an error response")
        if status == 400:
            error = _malformed()
        elif status == 504:
            error = MetergateError("The request timed out.", code="timeout")
        else:
            error = MetergateError("Internal error; the request changed nothing it could not undo.",
                                   code="internal_error")
        response = error_response(error, status=status)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """A low-level server whose connections use :class:`JsonErrorRequestHandler`."""

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """``web.AppRunner`` (same arguments) whose server renders parser-level errors as JSON, and whose access
    log writes no query string (:class:`metergate.observability.logs.AccessLog`: links carry secrets there)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log_class", AccessLog)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's startup and freezes it
        return JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                               handler_cancellation=server.handler_cancellation, loop=server._loop,
                               **server._kwargs)


async def _serve_forever(app: web.Application, host: str, port: int, backlog: int, **runner_kwargs: Any) -> None:
    # A signal only sets an event, and the shutdown runs here, uncancelled, while the requests in flight go
    # on. (aiohttp's own signal handling raises out of the event loop, and asyncio.run then cancels every
    # task at once — in-flight requests and settlements included — instead of draining them.)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__qualname__)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = JsonErrorAppRunner(app, handle_signals=False, **runner_kwargs)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=backlog).start()
        await stop.wait()
        log.info("shutting down: closing the listener; requests in flight may finish")
    finally:
        await runner.cleanup()  # stop accepting, on_shutdown (the drain), wait for handlers, close resources
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the event loop named ``uvloop`` or ``asyncio`` (``None``: asyncio's default). uvloop
    runs the same aiohttp code with less CPU per request (bench/README.md); without it, asyncio's loop."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("event_loop: uvloop is not installed; running on asyncio's loop")
            return None
        return uvloop.new_event_loop
    return None


def run_app(app: web.Application, *, host: str, port: int, backlog: int = 128, shutdown_timeout: float = 60.0,
            keepalive_timeout: float = 75.0, event_loop: str = "asyncio", **runner_kwargs: Any) -> None:
    """``web.run_app(app, host=..., port=...)`` on :class:`JsonErrorAppRunner`, on the event loop named by
    ``event_loop``; returns on SIGINT/SIGTERM."""
    with (contextlib.suppress(web.GracefulExit, KeyboardInterrupt),
          asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner):
        runner.run(_serve_forever(app, host, port, backlog, shutdown_timeout=shutdown_timeout,
                                  keepalive_timeout=keepalive_timeout, **runner_kwargs))
