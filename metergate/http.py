"""The one place where errors become HTTP responses.

Every handler raises members of :mod:`metergate.errors`; this middleware renders them in the OpenAI
error envelope, or in Google's for a request the proxy marked with :data:`ERROR_ENVELOPE` (a Gemini
route's; on a Bedrock route's, the OpenAI envelope also carries AWS's fields). aiohttp's own HTTP
exceptions (unknown path, body too large) are mapped to the same envelope, and anything unexpected
becomes a generic 500 whose details go to the log, never to the client.

Every error answer carries ``X-Metergate-Request-Id`` — the id of the request in the logs
(:func:`metergate.observability.logs.current_request_id`), or a fresh one, logged, for a request refused
before it got one — and, where the error has a verdict, ``x-should-retry`` (see :mod:`metergate.errors`).

Requests that aiohttp's HTTP parser rejects (a bad request line, CR or LF inside a header value, broken
chunked framing) never reach a handler or a middleware: aiohttp answers them itself, as text/plain
(aio-libs/aiohttp#3287 asks for a hook; none exists). :class:`JsonErrorAppRunner` serves an application
with a request handler that renders those answers in the same envelope; :func:`run_app` is
``web.run_app`` on that runner. Serve metergate with one of the two, never with a bare ``web.AppRunner``.

The same request handler puts a deadline on slow clients (:class:`ListenerLimits`, from the settings
``header_read_timeout_s`` and ``body_read_timeout_s``): a request line and headers that take longer, from
their first byte, get a 408 ``request_timeout`` and a closed connection; a body that takes longer, from the
end of its headers, fails its reader with the same error, answered by :func:`error_middleware`, and the
connection is closed. aiohttp itself bounds only the idle time between requests (keep-alive).

:func:`error_middleware` also refuses framing that aiohttp accepts but that a relay cannot pass on
faithfully: ``Transfer-Encoding`` on HTTP/1.0, any transfer coding but a lone ``chunked``, and a
``Content-Encoding`` on a request (aiohttp would decompress the body and the header would travel on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from metergate.errors import (
    BadRequest,
    MetergateError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from metergate.observability.logs import AccessLog, current_request_id, new_request_id
from metergate.wallet.errors import STORAGE_DOWN

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(payload, separators=(",", ":"), default=str).encode(), status=status,
                        content_type="application/json", headers=headers)


REQUEST_ID_HEADER = "X-Metergate-Request-Id"
# The envelope a request's errors are answered in, when not the OpenAI one (set by the proxy per route):
# "google" on a Gemini route's requests; "aws" on a Bedrock route's, whose clients are AWS SDKs: the OpenAI
# envelope then also speaks AWS's JSON error shape, which botocore raises as a ClientError whose message is
# metergate's.
ERROR_ENVELOPE = web.RequestKey("error_envelope", str)
# AWS's exception name for each status metergate answers (402 has none: AWS never asks for money).
_AWS_TYPES = {400: "ValidationException", 401: "AccessDeniedException", 402: "InsufficientFundsException",
              403: "AccessDeniedException", 404: "ResourceNotFoundException", 409: "ConflictException",
              429: "ThrottlingException", 502: "ServiceUnavailableException", 503: "ServiceUnavailableException",
              504: "ModelTimeoutException"}


def error_response(error: MetergateError, *, status: int | None = None, envelope: str | None = None) -> web.Response:
    """The answer to ``error``: its envelope (OpenAI's, or ``envelope="google"``), its headers (Retry-After,
    Allow), the request id, and ``x-should-retry`` when the error says whether a retry can succeed.
    ``envelope="aws"``: the OpenAI body also carries AWS's ``message`` and ``__type`` (with
    ``x-amzn-ErrorType``), and ``X-Metergate-Error-Code`` names the code, since an AWS SDK keeps only the
    message, the type and the headers of an error."""
    status = status or error.status
    headers = {**error.headers, REQUEST_ID_HEADER: current_request_id() or new_request_id()}
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    body = error.google_body(status) if envelope == "google" else error.body()
    if envelope == "aws":
        kind = _AWS_TYPES.get(status, "ValidationException" if status < 500 else "InternalServerException")
        body = {"message": error.message, "__type": kind, **body}
        headers.update({"x-amzn-ErrorType": kind, "X-Metergate-Error-Code": error.code})
    return json_response(body, status=status, headers=headers)


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


def _framing_error(request: web.BaseRequest) -> MetergateError | None:
    """Why this request's framing cannot be relayed faithfully, if it cannot."""
    headers = request.headers
    if "Transfer-Encoding" not in headers and "Content-Encoding" not in headers:
        return None  # nearly every request: nothing to judge
    codings = headers.getall("Transfer-Encoding", [])
    if codings and request.version < HttpVersion11:
        return BadRequest("Transfer-Encoding is not allowed on HTTP/1.0.", code="malformed_request")
    if codings and ",".join(codings).replace(" ", "").replace("\t", "").lower() != "chunked":
        return BadRequest("The only transfer coding accepted is 'chunked' alone.",
                          code="unsupported_transfer_encoding")
    encodings = [e.strip().lower() for e in ",".join(headers.getall("Content-Encoding", [])).split(",")]
    if any(e not in ("", "identity") for e in encodings):
        return UnsupportedMediaType("Compressed request bodies are not accepted; send the body uncompressed.",
                                    code="unsupported_content_encoding")
    return None


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refused with 413 ``body_too_large`` as soon as it is known to exceed
    ``limit`` bytes: by its Content-Length before a byte is read, else while reading."""
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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    framing = _framing_error(request)
    if framing is not None:
        refused = error_response(framing)
        refused.force_close()  # the body's end is not known reliably: nothing more is read from this connection
        return refused
    try:
        return await handler(request)
    except MetergateError as error:
        response = error_response(error, envelope=request.get(ERROR_ENVELOPE))
        if isinstance(error, RequestTimeout):
            response.force_close()
        return response
    except RequestPayloadError:
        # The body's framing is broken (bad chunk size, truncated chunk): the client's fault, not ours.
        return error_response(_malformed(), envelope=request.get(ERROR_ENVELOPE))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        factory = _AIOHTTP_ERRORS.get(exc.status)
        mapped = factory(exc) if factory else MetergateError(exc.reason, code=f"http_{exc.status}")
        return error_response(mapped, status=exc.status, envelope=request.get(ERROR_ENVELOPE))
    except STORAGE_DOWN as exc:
        log.warning("storage unreachable on %s %s: %s", request.method, request.path, type(exc).__name__)
        return error_response(ServiceUnavailable("The database is unreachable; nothing was charged. Retry shortly."),
                              envelope=request.get(ERROR_ENVELOPE))
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and (request.transport is None or request.transport.is_closing()):
            # The client left mid-request (typically while sending its body): nothing went wrong here and
            # no answer can reach it, so this is no error worth a traceback.
            log.info("client disconnected during %s %s", request.method, request.path)
            return error_response(BadRequest("The client closed the connection.", code="client_closed"),
                                  envelope=request.get(ERROR_ENVELOPE))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(MetergateError("Internal error; the request changed nothing it could not undo.",
                                             code="internal_error"), envelope=request.get(ERROR_ENVELOPE))


# ---------------------------------------------------------------------------------- serving


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Deadlines on slow clients: the request line and headers, from their first byte (a new connection's
    from its start), and the whole body, from the end of the headers."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0


LISTENER = web.AppKey("listener_limits", ListenerLimits)


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with its own error answers rendered in the OpenAI envelope, and
    deadlines on slow clients (:class:`ListenerLimits`).

    aiohttp calls :meth:`handle_error` for a request its parser rejected (status 400), and for an
    exception that escaped the handler chain (500, or 504 on a timeout). The body never carries the
    parser's message or a traceback: those go to the log.
    """

    limits = ListenerLimits()
    _header_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._waiter is not None and not self._waiter.done()  # no request in flight
        if data and waiting and self._header_timer is None:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        before = self._request_count
        super().data_received(data)
        produced = self._request_count - before
        if produced and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if produced:
            _message, payload = self._messages[-1]
            if isinstance(payload, StreamReader) and not payload.is_eof():
                if self._body_timer is not None:
                    self._body_timer.cancel()
                self._body_timer = self._loop.call_later(self.limits.body_timeout_s, self._body_timeout, payload)

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        log.info("closing a connection whose request headers took over %gs", self.limits.header_timeout_s)
        if self._current_request is None:  # nothing of another answer is on the wire: say why
            error = RequestTimeout(f"The request headers were not received within {self.limits.header_timeout_s:g} s.")
            body = json.dumps(error.body(), separators=(",", ":")).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        self.force_close()

    def _body_timeout(self, payload: StreamReader) -> None:
        self._body_timer = None
        if payload.is_eof() or self.transport is None:
            return
        log.info("failing a request whose body took over %gs", self.limits.body_timeout_s)
        # Its reader raises this (answered 408 by error_middleware); the rest is never read: no lingering.
        self._lingering_time = 0.0
        payload.set_exception(RequestTimeout(f"The request body was not received within "
                                             f"{self.limits.body_timeout_s:g} s."))
        self.close()

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

    limits = ListenerLimits()

    def __call__(self) -> web.RequestHandler:
        handler = JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.limits = self.limits
        return handler


class JsonErrorAppRunner(web.AppRunner):
    """``web.AppRunner`` (same arguments) whose server renders parser-level errors as JSON, applies the app's
    :data:`LISTENER` limits (defaults without them), and whose access log writes no query string
    (:class:`metergate.observability.logs.AccessLog`: links carry secrets there)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log_class", AccessLog)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's startup and freezes it
        json_server = JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                                      handler_cancellation=server.handler_cancellation, loop=server._loop,
                                      **server._kwargs)
        json_server.limits = self.app.get(LISTENER, ListenerLimits())
        return json_server


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
