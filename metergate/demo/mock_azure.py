"""A mock Azure OpenAI resource that speaks Azure's wire format, for the tests and the demo.

Paths as Azure serves them: ``/openai/deployments/{deployment}/chat/completions`` (also ``completions``,
``embeddings``) with a required ``api-version`` query, ``/openai/responses`` (``api-version`` required,
the deployment in the body's ``model``) and the v1 API under ``/openai/v1/`` (the deployment in the body's
``model``, ``api-version`` optional). The resource has a fixed set of deployments, each running one model,
and one key, which it takes only in the ``api-key`` header; like Azure it answers 401 without it, 404
``DeploymentNotFound`` for a deployment it does not have, and 404 ``Resource not found`` without an
``api-version`` where one is required. A deployment's audio and image endpoints answer as
:mod:`metergate.demo.mock_media` does, for the deployment's model. Bodies, usage and streams are those of
:mod:`metergate.demo.mock_upstream` (its ``X-Mock-Behavior`` knobs included), computed for the deployment's
model, which the answer names, as Azure's do.

Every request that reaches it is kept under ``RECEIVED``: the raw path and query, the headers and the JSON
body exactly as they arrived.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from metergate.demo.mock_media import MODEL, images, speech, transcribe
from metergate.demo.mock_responses import responses
from metergate.demo.mock_upstream import BODY, REQUESTS, SEEN, _see, chat, completions, embeddings

RECEIVED = web.AppKey("azure_received", list)
_DEPLOYMENTS = web.AppKey("azure_deployments", dict)
_KEY = web.AppKey("azure_key", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _front(handler: Handler, *, deployment_in_path: bool, version_required: bool) -> Handler:
    async def front(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        request.app[RECEIVED].append({"raw_path": request.rel_url.raw_path,
                                      "query_string": request.rel_url.raw_query_string,
                                      "headers": dict(request.headers), "body": body})
        if request.headers.get("api-key") != request.app[_KEY]:
            return _error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint. Make "
                                      "sure to provide a valid key for an active subscription and use a correct "
                                      "regional API endpoint for your resource.")
        if version_required and "api-version" not in request.query:
            return _error(404, "404", "Resource not found")
        deployment = request.match_info["deployment"] if deployment_in_path else body.get("model")
        model = request.app[_DEPLOYMENTS].get(deployment)
        if model is None:
            return _error(404, "DeploymentNotFound", "The API deployment for this resource does not exist. If you "
                                                     "created the deployment within the last 5 minutes, please "
                                                     "wait a moment and try again.")
        request[BODY] = {**body, "model": model}  # the deployment runs its model, whatever the body names
        return await handler(request)

    return front


def _media_front(handler: Handler) -> Handler:
    """A deployment's audio and image endpoints: multipart or JSON bodies, read by the handler itself."""
    async def front(request: web.Request) -> web.StreamResponse:
        request.app[RECEIVED].append({"raw_path": request.rel_url.raw_path,
                                      "query_string": request.rel_url.raw_query_string,
                                      "headers": dict(request.headers), "body": None})
        if request.headers.get("api-key") != request.app[_KEY]:
            return _error(401, "401", "Access denied due to invalid subscription key.")
        if "api-version" not in request.query:
            return _error(404, "404", "Resource not found")
        model = request.app[_DEPLOYMENTS].get(request.match_info["deployment"])
        if model is None:
            return _error(404, "DeploymentNotFound", "The API deployment for this resource does not exist.")
        request[MODEL] = model
        return await handler(request)

    return front


def build_mock_azure(deployments: dict[str, str], key: str) -> web.Application:
    """A resource whose ``deployments`` map deployment names to the models they run, accepting ``key``."""
    app = web.Application(middlewares=[_see])
    app[REQUESTS], app[SEEN], app[RECEIVED] = [], [], []
    app[_DEPLOYMENTS], app[_KEY] = dict(deployments), key
    handlers: dict[str, Handler] = {"chat/completions": chat, "completions": completions, "embeddings": embeddings}
    for suffix, handler in handlers.items():
        app.router.add_post(f"/openai/deployments/{{deployment}}/{suffix}",
                            _front(handler, deployment_in_path=True, version_required=True))
        app.router.add_post(f"/openai/v1/{suffix}", _front(handler, deployment_in_path=False, version_required=False))
    for suffix, handler in {"audio/transcriptions": transcribe, "audio/speech": speech,
                            "images/generations": images, "images/edits": images}.items():
        app.router.add_post(f"/openai/deployments/{{deployment}}/{suffix}", _media_front(handler))
    app.router.add_post("/openai/responses", _front(responses, deployment_in_path=False, version_required=True))
    app.router.add_post("/openai/v1/responses", _front(responses, deployment_in_path=False, version_required=False))
    return app


__all__ = ["RECEIVED", "build_mock_azure"]
