"""CORS for browser clients of the proxy routes (the gateway case), off unless origins are configured.

A page on an allowed origin (``cors_allow_origins``) may call the proxy routes with a proxy key: its preflight
(``OPTIONS`` with ``Access-Control-Request-Method``) is answered here, without identification, and every
answer to it — metered, free, a refusal, a stream — carries ``Access-Control-Allow-Origin`` and exposes
metergate's receipt and retry headers, so that the page can read a 402's body and its request id.

Nothing else is opened: metergate's own paths (admin API, portal) never answer CORS, no answer allows
credentials (cookies; a proxy key travels in a header), and the customer and mode headers are never allowed
(settings refuse them), since a customer header is trusted from the app's own address and a browser on that
machine must not be able to send one from any page.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import hdrs, web

from metergate.config.routes import RouteTable
from metergate.config.settings import Settings
from metergate.http import Handler

EXPOSED = ("X-Metergate-Request-Id", "X-Metergate-Asset", "X-Metergate-Charged", "X-Metergate-Balance",
           "X-Metergate-Available", "X-Metergate-Held", "X-Metergate-Usage-Source", "Retry-After", "x-should-retry",
           "x-request-id", "request-id")
_METHODS = "GET, HEAD, POST"  # what proxy paths serve between them; each path's own Allow is stricter


class Cors:
    def __init__(self, settings: Settings, is_proxy_path: Callable[[str], bool]) -> None:
        self._any = settings.cors_allow_origins == ["*"]
        self._origins = frozenset(settings.cors_allow_origins)
        exact = [h for h in settings.cors_allow_headers if not h.endswith("*")]
        self._headers = frozenset(exact)
        self._prefixes = tuple(h[:-1] for h in settings.cors_allow_headers if h.endswith("*"))
        self._max_age = str(settings.cors_max_age_s)
        self._is_proxy_path = is_proxy_path

    def allowed_origin(self, request: web.BaseRequest) -> str | None:
        """The ``Access-Control-Allow-Origin`` for ``request``, or ``None`` when it gets no CORS answer."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self._is_proxy_path(request.rel_url.raw_path):
            return None
        if self._any:
            return "*"
        return origin if origin in self._origins else None

    def _header_allowed(self, name: str) -> bool:
        return name in self._headers or name.startswith(self._prefixes)

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method != "OPTIONS" or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in request.headers
                or self.allowed_origin(request) is None):
            return await handler(request)
        requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        allowed = [name for name in (h.strip().lower() for h in requested.split(",")) if name
                   and self._header_allowed(name)]
        headers = {hdrs.ACCESS_CONTROL_ALLOW_METHODS: _METHODS, hdrs.ACCESS_CONTROL_MAX_AGE: self._max_age}
        if allowed:  # only those asked for and allowed: the browser refuses the call if one it needs is missing
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(allowed)
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer on a proxy path to an allowed origin says so, before its headers are sent."""
        origin = self.allowed_origin(request)
        if origin is None:
            return
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        if origin != "*":
            response.headers.add(hdrs.VARY, "Origin")
        if request.method != "OPTIONS":
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(EXPOSED)


def install(app: web.Application, settings: Settings, routes: RouteTable) -> None:
    """Answer CORS on ``app``'s proxy routes, if ``cors_allow_origins`` names any origin."""
    if not settings.cors_allow_origins:
        return
    cors = Cors(settings, routes.serves)
    app.middlewares.append(cors.preflight)
    app.on_response_prepare.append(cors.on_prepare)
