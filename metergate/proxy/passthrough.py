"""Free endpoints: provider endpoints that cost nothing, relayed unmetered for identified customers.

Models lists and retrieval, Anthropic's token counting and OpenAI's moderations cost nothing at the
provider, and clients call them routinely (``models.list()``, LangChain's token counting), so a route passes
them through: no hold, no charge, no usage record — but the customer is identified as for a metered request
(a trusted customer header or a proxy key), rate limits count the request (with zero tokens), and the
request is relayed with the same header hygiene and the provider key injected.

What may pass is fixed by :mod:`metergate.config.free_endpoints`, never by the request: the upstream URL is
built from the route's upstream, the catalogue's path and (for ``{id}``) one validated segment; only the
catalogue's query parameters are forwarded. Endpoints that would spend provider money metergate does not
meter (files, batches) are refused with 404 ``endpoint_not_metered``, as is a free endpoint the route's
``free_endpoints`` leaves out; every other path is left to the metered endpoints, or ``unknown_route``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from metergate.config import free_endpoints as catalogue
from metergate.config.free_endpoints import FreeEndpoint
from metergate.config.routes import RouteMatch, RouteSettings
from metergate.errors import BadGateway, BadRequest, GatewayTimeout, NotFound
from metergate.http import REQUEST_ID_HEADER
from metergate.proxy import headers as hh
from metergate.proxy.methods import check_method
from metergate.proxy.upstream_body import read_limited_answer

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Pipeline

log = logging.getLogger(__name__)
_MAX_QUERY_VALUE = 512  # characters of one forwarded query value (page cursors, limits)


@dataclass(frozen=True, slots=True)
class FreeRequest:
    """A request for a free endpoint, resolved to the exact upstream path it may reach."""

    endpoint: FreeEndpoint
    path: str  # the client's path, relative to the route's prefix (for messages)
    upstream_url: str


@dataclass(frozen=True, slots=True)
class _RouteEndpoints:
    route: RouteSettings
    roots: tuple[str, ...]  # ("/v1",), or ("",) when the route's upstream URL already ends in /v1 (api_roots)
    enabled: tuple[FreeEndpoint, ...]


class FreeEndpoints:
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self._routes: dict[str, _RouteEndpoints] = {}
        for route in pipeline.settings.routes:
            if route.compute is None:
                self._routes[route.prefix] = _RouteEndpoints(
                    route, catalogue.api_roots(route.provider, route.upstream),
                    catalogue.enabled(route.provider, route.free_endpoints))

    def find(self, match: RouteMatch) -> FreeRequest | None:
        """The free endpoint ``match`` names; ``None`` for any other path. Raises 404 ``endpoint_not_metered``
        for an endpoint this route refuses by name (files, batches, a free endpoint it turned off)."""
        served = self._routes.get(match.route.prefix)
        if served is None:
            return None
        root = next((r for r in served.roots if match.upstream_path.startswith(r + "/")), None)
        if root is None:
            return None
        relative = match.upstream_path[len(root):]
        for endpoint in catalogue.CATALOGUE.get(served.route.provider, ()):
            concrete = _concrete(endpoint, relative)
            if concrete is None:
                continue
            if endpoint not in served.enabled:
                raise NotFound(f"{match.upstream_path} ({endpoint.name}) is a free endpoint that route "
                               f"{match.route.prefix} does not serve (its free_endpoints setting).",
                               code="endpoint_not_metered")
            return FreeRequest(endpoint, match.upstream_path, served.route.upstream + root + concrete)
        for prefix, what in catalogue.NOT_METERED.get(served.route.provider, ()):
            if relative == prefix or relative.startswith(prefix + "/"):
                raise NotFound(f"{match.upstream_path} ({what}) is not metered by metergate, so route "
                               f"{match.route.prefix} refuses it rather than pass it through unpaid.",
                               code="endpoint_not_metered")
        return None

    async def handle(self, request: web.Request, request_id: str, match: RouteMatch,
                     free: FreeRequest) -> web.StreamResponse:
        p = self._p
        options = check_method(request, free.endpoint.allow, free.path)
        if options is not None:
            return options
        identity = await p.identifier.identify(request, query_key=match.route.provider == "gemini")
        body = await p._read_body(request) if free.endpoint.method == "POST" else None
        await p.ratelimiter.admit(identity, 0)  # counted as a request; it carries no tokens to count
        upstream = await self._send(request, match, free, body)
        try:
            if 300 <= upstream.status < 400:
                raise BadGateway("The upstream answered with a redirect, which metergate does not follow.",
                                 code="upstream_redirect")
            payload = await read_limited_answer(upstream, p.settings.max_response_bytes)
        finally:
            upstream.release()
        log.debug("%s: free endpoint %s for %s/%s answered %d", request_id, free.endpoint.name, identity.mode,
                 identity.customer_id, upstream.status)
        headers = hh.client_response_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = request_id
        return web.Response(body=payload, status=upstream.status, headers=headers)

    async def _send(self, request: web.Request, match: RouteMatch, free: FreeRequest,
                    body: bytes | None) -> aiohttp.ClientResponse:
        p = self._p
        assert p.session is not None
        route = match.route
        key = route.api_key
        auth = p._adapters[route.prefix].auth_header(key.get_secret_value()) if key is not None else None
        headers = hh.upstream_request_headers(
            request.headers, auth=auth,
            drop=(p.settings.customer_header, p.settings.mode_header, p.settings.attribution_header))
        headers.update(route.upstream_headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        query = {name: value for name, value in request.query.items() if name in free.endpoint.query}
        for name, value in query.items():
            if len(value) > _MAX_QUERY_VALUE:
                raise BadRequest(f"The query parameter {name!r} exceeds {_MAX_QUERY_VALUE} characters.",
                                 code="invalid_request", param=name)
        try:
            return await p.session.request(free.endpoint.method, free.upstream_url, data=body, params=query,
                                           headers=headers, allow_redirects=False)
        except TimeoutError:
            raise GatewayTimeout("The upstream did not answer in time.") from None
        except aiohttp.ClientError as exc:
            log.warning("upstream %s unreachable: %s", route.prefix, type(exc).__name__)
            raise BadGateway("The upstream could not be reached.") from None


def _concrete(endpoint: FreeEndpoint, path: str) -> str | None:
    """``path`` if it is an instance of the endpoint's path (whose ``{id}`` is one valid segment), else ``None``."""
    pattern = endpoint.path
    head, marker, tail = pattern.partition("{id}")
    if not marker:
        return path if path == pattern else None
    if not path.startswith(head) or not path.endswith(tail):
        return None
    segment = path[len(head):len(path) - len(tail)]
    return path if endpoint.segment.match(segment) else None
