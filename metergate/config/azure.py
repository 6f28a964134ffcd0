"""Azure OpenAI's request targets: which paths an ``provider: azure`` route meters, and its ``api-version``.

Azure serves the OpenAI wire format under two families of paths, relative to the resource
(``https://<resource>.openai.azure.com``), which is the route's upstream:

* ``/openai/deployments/{deployment}/chat/completions`` (also ``completions``, ``embeddings``, and the audio
  and image endpoints ``audio/transcriptions``, ``audio/translations``, ``audio/speech``,
  ``images/generations``, ``images/edits``): the
  deployment is in the path, and ``api-version`` is required. This is what the ``openai`` SDK's
  ``AzureOpenAI`` client builds from ``azure_endpoint``. ``/openai/responses`` takes the deployment as
  the body's ``model``, with ``api-version`` required as well.
* ``/openai/v1/chat/completions`` (also ``completions``, ``embeddings``, ``responses``): Azure's v1 API,
  which a plain ``OpenAI`` client reaches with ``base_url=.../openai/v1``; the deployment is the body's
  ``model`` and ``api-version`` is optional (``preview`` or ``latest`` when given).

A deployment is billed as the model the route's ``deployments`` map names, never as the body claims: the
map is also the list of deployments the route serves. The query that reaches Azure is rebuilt from the
one validated ``api-version``; any other query parameter is refused, so no client bytes ride along.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

from metergate.errors import BadRequest

API_VERSION = "api-version"
# A dated version: 2024-10-21, 2025-04-01-preview. The v1 API also takes the two words Azure defines for it.
_DATED_VERSION = re.compile(r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])(-preview)?")
_V1_VERSIONS = ("preview", "latest")
# Azure's deployment names: letters, digits, "-", "_" and ".", starting with a letter or digit, 2 to 64 long.
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,63}")
_DEPLOYMENT_ENDPOINTS = {"chat/completions": "chat.completions", "completions": "completions",
                         "embeddings": "embeddings"}
# Audio and images (metergate.proxy.adapters.media): the same paths under a deployment or the v1 API.
_DEPLOYMENT_ENDPOINTS.update({
    "audio/transcriptions": "audio.transcriptions", "audio/translations": "audio.translations",
    "audio/speech": "audio.speech", "images/generations": "images.generations", "images/edits": "images.edits"})
_V1_ENDPOINTS = {**_DEPLOYMENT_ENDPOINTS, "responses": "responses"}


@dataclass(frozen=True, slots=True)
class Target:
    """A metered Azure request target."""

    endpoint: str  # as the adapters name endpoints: chat.completions, completions, embeddings, responses
    deployment: str | None  # from the path; None: the body's model names it (the v1 API, /openai/responses)
    v1: bool  # Azure's v1 API, where api-version is optional


def target(segments: tuple[str, ...]) -> Target | None:
    """The metered target of a request's segments after the route's prefix; ``None`` for any other path.
    The deployment segment is returned as sent: whether the route serves it is the route's map's to say."""
    if segments[:1] != ("openai",):
        return None
    rest = segments[1:]
    if len(rest) >= 3 and rest[0] == "deployments" and "/".join(rest[2:]) in _DEPLOYMENT_ENDPOINTS:
        return Target(_DEPLOYMENT_ENDPOINTS["/".join(rest[2:])], rest[1], v1=False)
    if rest == ("responses",):
        return Target("responses", None, v1=False)
    if rest[:1] == ("v1",) and "/".join(rest[1:]) in _V1_ENDPOINTS:
        return Target(_V1_ENDPOINTS["/".join(rest[1:])], None, v1=True)
    return None


def upstream_query(segments: tuple[str, ...], raw_query: str) -> str:
    """The query forwarded to Azure: ``api-version=<validated>``, or ``""`` on the v1 API without one (and
    for a path that is not metered, which is refused anyway).
    400 ``missing_api_version`` / ``invalid_api_version``, or ``invalid_query`` for any other parameter."""
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict", max_num_fields=10, separator="&")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The query string does not parse.", code="invalid_query") from None
    others = sorted({name for name, _ in pairs if name != API_VERSION})
    if others:
        raise BadRequest(f"An Azure route forwards only '{API_VERSION}'; remove {', '.join(map(repr, others))} "
                         "from the query.", code="invalid_query", param=others[0])
    found = target(segments)
    if found is None:
        return ""  # not metered: refused as an unknown route, nothing is forwarded
    versions = [value for _, value in pairs]
    v1 = found.v1
    if not versions:
        if v1:
            return ""
        raise BadRequest(f"Azure OpenAI requires the '{API_VERSION}' query parameter (e.g. 2024-10-21); set the "
                         "SDK's api_version.", code="missing_api_version", param=API_VERSION)
    version = versions[0]
    if len(versions) > 1 or not (_DATED_VERSION.fullmatch(version) or (v1 and version in _V1_VERSIONS)):
        accepted = "YYYY-MM-DD or YYYY-MM-DD-preview" + (", 'preview' or 'latest'" if v1 else "")
        raise BadRequest(f"'{API_VERSION}' must be one value, {accepted}.", code="invalid_api_version",
                         param=API_VERSION)
    return urlencode([(API_VERSION, version)], quote_via=quote, safe="")
