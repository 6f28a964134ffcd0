"""The catalogue of free (unmetered) provider endpoints a route may pass through, and of those it refuses.

A free endpoint costs nothing at the provider — listing or describing models, counting a prompt's tokens,
classifying text for moderation — so metergate relays it without a hold or a charge, though still only for
an identified customer. The catalogue is fixed per provider: a route's ``free_endpoints`` setting can pick
from it (by default a route serves all of its provider's), never add to it, so that no setting and no
request can open a path to anything else at the upstream.

Paths are relative to the provider's API root, ``/v1``: a client sends ``/v1/models`` under the route's
prefix, unless the route's upstream URL already ends in ``/v1``, when it sends ``/models``. ``{id}`` stands
for one path segment checked against :data:`ID_SEGMENT`.

Endpoints that would spend provider money metergate cannot meter (files, batches) are listed as
:data:`NOT_METERED`, so that a client is told so by name (``endpoint_not_metered``) instead of
``unknown_route``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ID_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,255}$")  # model ids: gpt-4o, ft:gpt-4o:org:x:1, claude-x@1


@dataclass(frozen=True, slots=True)
class FreeEndpoint:
    name: str  # the setting's name for it, after the SDK method: models.list
    method: str  # GET or POST
    path: str  # relative to the API root; "{id}" is one validated segment
    query: frozenset[str] = frozenset()  # query parameters forwarded; any other is dropped

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
}

# Path prefixes (relative to the API root) of endpoints that cost provider money metergate does not meter.
NOT_METERED: dict[str, tuple[tuple[str, str], ...]] = {
    "openai": (("/files", "files"), ("/batches", "batches"), ("/uploads", "uploads")),
    "anthropic": (("/messages/batches", "message batches"), ("/files", "files")),
}


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
