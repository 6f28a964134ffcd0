"""The route table: which path prefix goes to which upstream, decided by config alone.

The upstream of a request is never taken from the request itself (a request-chosen base URL is an
SSRF). A path that matches no prefix is refused rather than passed through unmetered. Matching works on
the decoded segments of the raw path (:mod:`metergate.urls`), and the upstream URL is built from parsed
components (the route's scheme, authority and base path, the request's remaining segments re-encoded, its
query re-encoded), never by concatenating strings, so what the upstream receives is the path matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from metergate.config import azure, free_endpoints, gemini
from metergate.config.bedrock import BedrockSettings, raw_target
from metergate.errors import BadRequest
from metergate.urls import clean_query, decoded_path, encode_path, path_segments

_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")  # as metergate.proxy.adapters.schema checks models
# A route's default provider_id, when not openai.
_PROVIDER_IDS = {"azure": "azure", "gemini": "google", "bedrock": "aws"}


class ComputeSettings(BaseModel):
    """How a generic compute endpoint (GPU job, inference server, any HTTP API) is metered and priced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    asset: str = Field(description="The asset this route draws, e.g. GPU_SECONDS or USD.")
    meter: Literal["time", "header", "json", "request"] = Field(
        "time", description="Units: wall-clock seconds, a response header, a JSON field, or one per request.")
    usage_header: str = Field("X-Usage-Units", description="Response header carrying units (meter=header).")
    usage_json_field: str = Field("usage.units", description="Dotted path of the units in a JSON reply (meter=json).")
    unit_price: Decimal = Field(ge=0, max_digits=24, decimal_places=12,
                                description="Price of one unit in the asset's major unit.")
    hold_units: Decimal = Field(Decimal(60), gt=0, max_digits=24, decimal_places=6,
                                description="Units held before forwarding (seconds for meter=time).")
    extend_units: Decimal = Field(Decimal(60), gt=0, max_digits=24, decimal_places=6,
                                  description="Units added to the hold each time a timed request outruns it.")
    cost_per_unit_usd: Decimal | None = Field(None, ge=0, max_digits=24, decimal_places=12,
                                              description="Provider cost of one unit, for margins.")


class RouteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(description="Path prefix, e.g. /openai; it is removed before forwarding.")
    upstream: str = Field(description="Upstream base URL, e.g. https://api.openai.com (may include a path).")
    provider: Literal["openai", "anthropic", "azure", "gemini", "bedrock", "compute"] = Field(
        "openai", description="Wire format spoken by the upstream (azure: Azure OpenAI's deployment paths; gemini: "
                              "Google's Gemini API, models/{model}:generateContent; bedrock: AWS Bedrock's "
                              "Converse API, signed with SigV4).")
    provider_id: str = Field("openai", description="Provider id for the cost table (genai-prices); an azure "
                                                   "route's defaults to azure, a gemini route's to google, a "
                                                   "bedrock route's to aws.")
    api_key: SecretStr | None = Field(None, description="Provider key injected upstream; clients never hold it.")
    charge_failed_replies: bool = Field(False, description="Charge a reply the provider marks failed.")
    realtime: bool = Field(False, description="Serve the Realtime API (GET /v1/realtime upgraded to a WebSocket), "
                                              "billed per response (metergate/proxy/realtime.py); openai only.")
    unary_streaming: bool = Field(
        True, description="The upstream streams: a non-streaming request whose output the hold does not cover is "
                          "streamed from it internally and stopped where the wallet runs dry. false: its output "
                          "limit is set upstream to what the hold covers, and the receipt says so.")
    upstream_headers: dict[str, str] = Field(
        default_factory=dict, description="Headers set on every upstream request, e.g. OpenAI-Organization.")
    compute: ComputeSettings | None = Field(None, description="Metering of a compute route (provider: compute).")
    deployments: dict[str, str] = Field(
        default_factory=dict, description="An azure route's deployments, each mapped to the model it is priced "
                                          "as, e.g. {my-gpt4o: gpt-4o}; the route serves these deployments only.")
    bedrock: BedrockSettings | None = Field(
        None, description="A bedrock route's region, SigV4 credentials and model map (metergate/config/bedrock.py).")
    free_endpoints: tuple[str, ...] | None = Field(
        None, description="Unmetered endpoints passed through for identified customers, by name from the "
                          "provider's catalogue (metergate/config/free_endpoints.py); unset: all of them, []: none.")

    @model_validator(mode="before")
    @classmethod
    def _azure_provider_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("provider") in _PROVIDER_IDS and "provider_id" not in data:
            # genai-prices prices Azure (falling back to OpenAI's), Google's Gemini models and AWS Bedrock's
            # (by Bedrock model id) under these ids.
            return {**data, "provider_id": _PROVIDER_IDS[data["provider"]]}
        return data

    @model_validator(mode="after")
    def _compute(self) -> RouteSettings:
        if (self.provider == "compute") != (self.compute is not None):
            raise ValueError("a route has 'compute' settings exactly when its provider is 'compute'")
        if (self.provider == "azure") != bool(self.deployments):
            raise ValueError("a route has 'deployments' exactly when its provider is 'azure' (at least one)")
        if (self.provider == "bedrock") != (self.bedrock is not None):
            raise ValueError("a route has 'bedrock' settings exactly when its provider is 'bedrock'")
        if self.provider == "bedrock" and self.api_key is not None:
            raise ValueError("a bedrock route signs with its 'bedrock' credentials; it takes no 'api_key'")
        if self.realtime and self.provider != "openai":
            raise ValueError("realtime: true needs provider: openai")
        if self.free_endpoints is not None:
            free_endpoints.validate(self.provider, self.free_endpoints)
        return self

    @field_validator("deployments")
    @classmethod
    def _deployments(cls, value: dict[str, str]) -> dict[str, str]:
        for name, model in value.items():
            if not azure.DEPLOYMENT_NAME.fullmatch(name):
                raise ValueError(f"deployment {name!r}: 2-64 letters, digits, '.', '_' or '-', starting with a "
                                 "letter or digit")
            if not _MODEL.fullmatch(model) or len(model) > 128:
                raise ValueError(f"deployment {name!r}: {model!r} is not a model name")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if not _PREFIX.fullmatch(value) or any(part in (".", "..") for part in value.split("/")):
            raise ValueError("prefix must be a path like /openai (letters, digits, '.', '_', '~', '-'; "
                             "no '.' or '..' segments)")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream must be an absolute http(s) URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("upstream must not carry a query, fragment or credentials")
        value = value.rstrip("/")
        try:
            path_segments(urlsplit(value).path or "/")
        except BadRequest as exc:
            raise ValueError(f"upstream's path: {exc.message}") from None
        return value


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteSettings
    base: URL  # the route's upstream, parsed once
    segments: tuple[str, ...]  # the request's decoded path segments after the prefix
    query: str = ""  # the request's query, parsed and re-encoded

    @property
    def upstream_path(self) -> str:
        """The decoded path after the prefix, always starting with "/": what endpoints are classified on."""
        return decoded_path(self.segments)

    @property
    def upstream_url(self) -> URL:
        """The route's upstream with the request's segments and query, built from components."""
        base_path = self.base.raw_path.rstrip("/")
        return URL.build(scheme=self.base.scheme, authority=self.base.raw_authority,
                         path=base_path + encode_path(self.segments), query_string=self.query, encoded=True)


class RouteTable:
    """Longest-prefix match, segment by segment, over the configured routes."""

    def __init__(self, routes: list[RouteSettings]) -> None:
        ordered = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._routes = [(route, tuple(route.prefix[1:].split("/")), URL(route.upstream)) for route in ordered]
        self._arn_routes = [entry for entry in self._routes if entry[0].provider == "bedrock"]

    def match(self, raw_path: str, raw_query: str = "") -> RouteMatch | None:
        """The route of a raw (percent-encoded) request path; 400 ``invalid_path`` / ``invalid_query`` for a
        path or query that does not parse cleanly (on an azure route, also for its ``api-version``:
        :func:`metergate.config.azure.upstream_query`; on a gemini route, for its method, model and ``alt``:
        :func:`metergate.config.gemini.upstream_query`), ``None`` when no route has its prefix."""
        found = self._find(raw_path)
        if found is None:
            return None
        route, base, segments = found
        if route.provider == "azure":
            query = azure.upstream_query(segments, raw_query)
        elif route.provider == "gemini":
            query = gemini.upstream_query(segments, raw_query, with_version=gemini.versioned(route.upstream))
        else:
            query = clean_query(raw_query)
        return RouteMatch(route, base, segments, query)

    def _find(self, raw_path: str) -> tuple[RouteSettings, URL, tuple[str, ...]] | None:
        try:
            segments = path_segments(raw_path)
        except BadRequest:
            # A Bedrock model ARN arrives with its "/" encoded; only a bedrock route's model segment may hold it.
            for route, prefix, base in self._arn_routes:
                head = "/" + "/".join(prefix)
                if raw_path.startswith(head + "/") and (tail := raw_target(raw_path[len(head):])):
                    return route, base, tail
            raise
        for route, prefix, base in self._routes:
            if segments[:len(prefix)] == prefix:
                return route, base, segments[len(prefix):]
        return None

    def provider_of(self, raw_path: str) -> str | None:
        """The provider of the route a raw request path falls under, if any (never raises)."""
        try:
            found = self._find(raw_path)
        except BadRequest:
            return None
        return found[0].provider if found is not None else None

    def serves(self, raw_path: str) -> bool:
        """Whether a raw request path is a clean path under one of the routes (never raises; the query is
        not judged: a CORS preflight carries the path only)."""
        try:
            return self._find(raw_path) is not None
        except BadRequest:
            return False
