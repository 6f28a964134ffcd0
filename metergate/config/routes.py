"""The route table: which path prefix goes to which upstream, decided by config alone.

The upstream of a request is never taken from the request itself (a request-chosen base URL is an
SSRF). A path that matches no prefix is refused rather than passed through unmetered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


class RouteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(description="Path prefix, e.g. /openai; it is removed before forwarding.")
    upstream: str = Field(description="Upstream base URL, e.g. https://api.openai.com (may include a path).")
    provider: Literal["openai"] = Field("openai", description="Wire format spoken by the upstream.")
    provider_id: str = Field("openai", description="Provider id for the cost table (genai-prices).")
    api_key: SecretStr | None = Field(None, description="Provider key injected upstream; clients never hold it.")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if not _PREFIX.match(value):
            raise ValueError("prefix must be a path like /openai (letters, digits, '.', '_', '~', '-')")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream must be an absolute http(s) URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("upstream must not carry a query, fragment or credentials")
        return value.rstrip("/")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteSettings
    upstream_path: str  # the request path with the prefix removed, always starting with "/"

    @property
    def upstream_url(self) -> str:
        return self.route.upstream + self.upstream_path


class RouteTable:
    """Longest-prefix match over the configured routes."""

    def __init__(self, routes: list[RouteSettings]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    def match(self, path: str) -> RouteMatch | None:
        for route in self._routes:
            if path == route.prefix or path.startswith(route.prefix + "/"):
                rest = path[len(route.prefix):] or "/"
                return RouteMatch(route, rest)
        return None
