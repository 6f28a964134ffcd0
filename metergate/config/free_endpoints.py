"""The catalogue of free (unmetered) provider endpoints a route may pass through, and of those it refuses.

A free endpoint costs nothing at the provider — listing or describing models, counting a prompt's tokens,
classifying text for moderation — so metergate relays it without a hold or a charge, though still only for
an identified customer. The catalogue is fixed per provider: a route's ``free_endpoints`` setting can pick
from it (by default a route serves all of its provider's), never add to it, so that no setting and no
request can open a path to anything else at the upstream.

Paths are relative to the provider's API root, ``/v1``: a client sends ``/v1/models`` under the route's
prefix, unless the route's upstream URL already ends in ``/v1``, when it sends ``/models`` (Gemini's roots are
``/v1beta`` and ``/v1``: :func:`api_roots`). ``{id}`` stands for one path segment checked against the
endpoint's ``segment`` pattern (:data:`ID_SEGMENT`, or a Gemini model id, which never holds the ``:`` that
separates it from its method).

Endpoints that would spend provider money metergate cannot meter (files, batches) are listed as
:data:`NOT_METERED`, so that a client is told so by name (``endpoint_not_metered``) instead of
``unknown_route``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from metergate.config import gemini

ID_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,255}$")  # model ids: gpt-4o, ft:gpt-4o:org:x:1, claude-x@1
GEMINI_MODEL_SEGMENT = re.compile(rf"^{gemini.MODEL_ID.pattern}$")


@dataclass(frozen=True, slots=True)
class FreeEndpoint:
    name: str  # the setting's name for it, after the SDK method: models.list
    method: str  # GET or POST
    path: str  # relative to the API root; "{id}" is one validated segment
    query: frozenset[str] = frozenset()  # query parameters forwarded; any other is dropped
    segment: re.Pattern[str] = ID_SEGMENT  # what "{id}" accepts

    @property
    def allow(self) -> tuple[str, ...]:
        """The methods its path answers, for ``Allow``: a GET path also answers HEAD."""
        return ("GET", "HEAD", "OPTIONS") if self.method == "GET" else (self.method, "OPTIONS")


_ANTHROPIC_PAGES = frozenset({"limit", "after_id", "before_id", "beta"})
CATALOGUE: dict[str, tuple[FreeEndpoint, ...]] = {
    "openai": (
        FreeEndpoint("models.list", "GET", "/models"),
        FreeEndpoint("models.retrieve", "GET", "/models/{id}"),
        FreeEndpoint("moderations.create", "POST", "/moderations"),
    ),
    "anthropic": (
        FreeEndpoint("models.list", "GET", "/models", _ANTHROPIC_PAGES),
        FreeEndpoint("models.retrieve", "GET", "/models/{id}", frozenset({"beta"})),
        FreeEndpoint("messages.count_tokens", "POST", "/messages/count_tokens", frozenset({"beta"})),
    ),
    "gemini": (  # named after the google-genai SDK's methods: client.models.list(), .get(), .count_tokens()
        FreeEndpoint("models.list", "GET", "/models", frozenset({"pageSize", "pageToken"})),
        FreeEndpoint("models.get", "GET", "/models/{id}", segment=GEMINI_MODEL_SEGMENT),
        FreeEndpoint("models.count_tokens", "POST", "/models/{id}:countTokens", segment=GEMINI_MODEL_SEGMENT),
    ),
}

# Path prefixes (relative to the API root) of endpoints that cost provider money metergate does not meter.
NOT_METERED: dict[str, tuple[tuple[str, str], ...]] = {
    "openai": (("/files", "files"), ("/batches", "batches"), ("/uploads", "uploads")),
    "anthropic": (("/messages/batches", "message batches"), ("/files", "files")),
    "gemini": (("/files", "files"), ("/cachedContents", "cached contents"), ("/batches", "batches"),
               ("/tunedModels", "tuned models"), ("/corpora", "corpora")),
}


def api_roots(provider: str, upstream: str) -> tuple[str, ...]:
    """The API roots a route's clients put before a catalogue path: ``""`` when the route's upstream URL
    already ends in the API version, else ``/v1`` (Gemini: ``/v1beta`` or ``/v1``)."""
    if provider == "gemini":
        return tuple(f"/{v}" for v in gemini.API_VERSIONS) if gemini.versioned(upstream) else ("",)
    return ("",) if urlsplit(upstream).path.rstrip("/").endswith("/v1") else ("/v1",)


def names(provider: str) -> list[str]:
    return [endpoint.name for endpoint in CATALOGUE.get(provider, ())]


def validate(provider: str, chosen: Iterable[str]) -> tuple[str, ...]:
    """``chosen`` as a tuple, or ``ValueError`` naming what the provider's catalogue lacks."""
    chosen = tuple(chosen)
    offered = names(provider)
    unknown = [name for name in chosen if name not in offered]
    if unknown:
        raise ValueError(f"free_endpoints: {', '.join(map(repr, unknown))} not among the free endpoints of provider "
                         f"{provider!r}: {offered or 'none'}")
    if len(set(chosen)) != len(chosen):
        raise ValueError("free_endpoints: a name is listed twice")
    return chosen


def enabled(provider: str, chosen: tuple[str, ...] | None) -> tuple[FreeEndpoint, ...]:
    """The endpoints a route serves free: ``chosen`` (its setting), or by default all its provider's."""
    catalogue = CATALOGUE.get(provider, ())
    return catalogue if chosen is None else tuple(e for e in catalogue if e.name in chosen)
