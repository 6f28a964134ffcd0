"""Google Gemini's request targets: which paths a ``provider: gemini`` route meters, and its query.

The Gemini API names the model and the method in one path segment, ``models/{model}:{method}``, under an API
version: ``/v1beta/models/gemini-2.5-flash:generateContent``, or ``:streamGenerateContent?alt=sse`` for a
stream (``/v1/...`` as well). The ``google-genai`` SDK builds these from its ``base_url``. A route whose upstream
URL already ends in the version (``https://generativelanguage.googleapis.com/v1beta``) takes the paths without
it (``/models/...``).

Decisions, all made on the path and query before the body is read:

* ``generateContent`` and ``streamGenerateContent`` are metered; ``countTokens`` is a free endpoint
  (:mod:`metergate.config.free_endpoints`); methods that spend money metergate does not meter (embeddings,
  batches, Imagen/Veo predictions) are refused with 404 ``endpoint_not_metered``, and any other method with 404
  ``unknown_method``;
* the model segment is checked strictly (:data:`MODEL_ID`): 400 ``invalid_model`` otherwise;
* a stream must ask for server-sent events (``alt=sse``): Gemini's other stream format is one JSON array,
  which metergate does not meter as it flows (400 ``invalid_query``);
* the client's ``key`` query parameter is a credential (the proxy key): it is read by
  :mod:`metergate.proxy.identify` and never forwarded; any parameter but ``alt`` and ``key`` is refused on a
  metered path, so no client bytes ride along to the upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from metergate.errors import BadRequest, NotFound

API_VERSIONS = ("v1beta", "v1")
KEY_PARAM = "key"
GENERATE = "generate_content"  # the endpoint's name in usage records and price rules, streamed or not
# Gemini model ids: gemini-2.5-flash, gemini-2.0-flash-001, gemini-2.5-flash-preview-05-20, gemma-3-27b-it.
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_METERED = {"generateContent": False, "streamGenerateContent": True}  # method -> streams
FREE_METHODS = frozenset({"countTokens"})
_NOT_METERED = frozenset({"embedContent", "batchEmbedContents", "asyncBatchEmbedContent", "batchGenerateContent",
                          "predict", "predictLongRunning", "generateAnswer"})
_METHOD = re.compile(r"[A-Za-z]{1,64}")


@dataclass(frozen=True, slots=True)
class Target:
    """A metered Gemini request target."""

    model: str
    stream: bool  # streamGenerateContent


def versioned(upstream: str) -> bool:
    """Whether clients of a route put the API version in the path: they do unless the upstream URL ends in it."""
    return urlsplit(upstream).path.rstrip("/").rsplit("/", 1)[-1] not in API_VERSIONS


def target(segments: tuple[str, ...], *, with_version: bool) -> Target | None:
    """The metered target of a request's segments after the route's prefix; ``None`` for any other path (a
    free endpoint, or one refused as an unknown route). Raises for a model call metergate refuses."""
    rest = segments
    if with_version:
        if not rest or rest[0] not in API_VERSIONS:
            return None
        rest = rest[1:]
    if len(rest) != 2 or rest[0] != "models":
        return None
    model, colon, method = rest[1].rpartition(":")
    if not colon or method in FREE_METHODS:
        return None
    if method in _NOT_METERED:
        raise NotFound(f"The Gemini method {method!r} is not metered by metergate, so this route refuses it rather "
                       "than pass it through unpaid.", code="endpoint_not_metered")
    if method not in _METERED:
        shown = repr(method) if _METHOD.fullmatch(method) else "named"
        raise NotFound(f"The Gemini method {shown} is not served: use generateContent or streamGenerateContent "
                       "(countTokens is free).", code="unknown_method")
    if not MODEL_ID.fullmatch(model):
        raise BadRequest("The model in the path must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (models/{model}:generateContent).", code="invalid_model", param="model")
    return Target(model, _METERED[method])


def upstream_query(segments: tuple[str, ...], raw_query: str, *, with_version: bool) -> str:
    """The query forwarded to Gemini: ``alt=sse`` for a stream, nothing otherwise (the client's ``key`` never
    goes up). 400 ``invalid_query`` for a query that does not parse, a parameter other than ``alt`` and ``key``,
    a stream without ``alt=sse`` or a ``alt`` on a call that does not stream. Free endpoints and other paths get
    ``""``: the free endpoints forward their own parameters, every other path is refused."""
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict", max_num_fields=10, separator="&")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The query string does not parse.", code="invalid_query") from None
    found = target(segments, with_version=with_version)
    if found is None:
        return ""
    others = sorted({name for name, _ in pairs if name not in ("alt", KEY_PARAM)})
    if others:
        raise BadRequest(f"A Gemini route forwards only 'alt'; remove {', '.join(map(repr, others))} from the query.",
                         code="invalid_query", param=others[0])
    alts = [value for name, value in pairs if name == "alt"]
    if found.stream:
        if alts != ["sse"]:
            raise BadRequest("streamGenerateContent is metered as server-sent events: send alt=sse (the google-genai "
                             "SDK does).", code="invalid_query", param="alt")
        return "alt=sse"
    if alts:
        raise BadRequest("'alt' applies to streamGenerateContent only.", code="invalid_query", param="alt")
    return ""
