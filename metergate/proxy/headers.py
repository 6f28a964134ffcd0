"""Reverse-proxy header hygiene.

Hop-by-hop headers (RFC 9110 §7.6.1), and every header the ``Connection`` header names, belong to one
connection and are never forwarded. metergate's own headers and the client's credentials are removed
before the provider's key is added, so nothing the client sends can reach the upstream as identity.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade",
})
# Client credentials in every form an upstream accepts ("api-key" is Azure OpenAI's, "x-goog-api-key" Google's).
# Credentials, and the headers that choose whose account a provider bills (OpenAI's organization and
# project): with the operator's key injected, a client must not pick the operator's org or project.
# A route sets them itself through ``upstream_headers``.
_REQUEST_DROP = frozenset({"host", "content-length", "authorization", "accept-encoding", "x-api-key", "api-key",
                           "x-goog-api-key",
                           "openai-organization", "openai-project",
                           "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"})
_RESPONSE_DROP = frozenset({"content-length", "content-encoding", "server", "date", "set-cookie"})


@functools.lru_cache(maxsize=64)
def _request_excluded(drop: frozenset[str]) -> frozenset[str]:
    """What is never forwarded upstream, with the route's own ``drop`` (the same few names on every request)."""
    return HOP_BY_HOP | _REQUEST_DROP | {h.lower() for h in drop}


_RESPONSE_EXCLUDED = HOP_BY_HOP | _RESPONSE_DROP


def _connection_named(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    if "Connection" not in headers:
        return named
    values: Iterable[str] = (headers.getall("Connection", []) if isinstance(headers, CIMultiDictProxy)
                             else [headers.get("Connection", "")])
    for value in values:
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def upstream_request_headers(incoming: CIMultiDictProxy[str], *, drop: Iterable[str],
                             auth: tuple[str, str] | None) -> CIMultiDict[str]:
    """Headers to send upstream: end-to-end client headers, minus ours, plus the provider key."""
    excluded = _request_excluded(frozenset(drop))
    if named := _connection_named(incoming):
        excluded = excluded | named
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if lowered in excluded or lowered.startswith("x-metergate-"):
            continue
        out.add(name, value)
    out["Accept-Encoding"] = "identity"  # metering reads the body; compression is re-done by no one
    if auth is not None:
        out[auth[0]] = auth[1]
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to relay to the client from the upstream response; metergate's receipt headers are its own."""
    excluded = _RESPONSE_EXCLUDED
    if named := _connection_named(upstream):
        excluded = excluded | named
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered not in excluded and not lowered.startswith("x-metergate-"):
            out.add(name, value)
    return out
