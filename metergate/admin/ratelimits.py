"""Admin API: per-customer rate-limit overrides (:mod:`metergate.proxy.ratelimit`).

* ``GET /admin/v1/customers/{id}/rate-limits`` — the override (or ``null``), the configured defaults and
  the limits in effect;
* ``PUT /admin/v1/customers/{id}/rate-limits`` ``{"requests_per_minute": int|null, "tokens_per_minute":
  int|null}`` — both keys required; ``null`` lifts that limit for this customer;
* ``DELETE /admin/v1/customers/{id}/rate-limits`` — back to the defaults.

Overrides are stored in the database. This process applies a change at once; other replicas pick it
up within ``rate_limits.refresh_interval_s``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.config.settings import RateLimit, Settings
from metergate.errors import BadRequest
from metergate.http import json_response
from metergate.proxy.ratelimit import RateLimiter
from metergate.wallet.models import Mode, RateLimitOverride
from metergate.wallet.store import WalletStore

_BOUNDS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**13}  # as in config.settings.RateLimit


class RateLimitsApi:
    def __init__(self, settings: Settings, store: WalletStore, admin: AdminApi, limiter: RateLimiter) -> None:
        self._settings = settings.rate_limits
        self._store = store
        self._admin = admin
        self._limiter = limiter

    def routes(self) -> list[web.RouteDef]:
        path = f"{PREFIX}/customers/{{customer_id}}/rate-limits"
        return [web.get(path, self.get), web.put(path, self.put), web.delete(path, self.delete)]

    async def _customer(self, request: web.Request) -> tuple[Mode, str]:
        return await self._admin.customer(request)

    def _view(self, customer_id: str, override: RateLimitOverride | None) -> dict[str, Any]:
        defaults = self._settings.customer
        effective = defaults if override is None else RateLimit(
            requests_per_minute=override.requests_per_minute, tokens_per_minute=override.tokens_per_minute)
        return {"customer_id": customer_id,
                "override": None if override is None else {
                    "requests_per_minute": override.requests_per_minute,
                    "tokens_per_minute": override.tokens_per_minute, "updated_at_ms": override.updated_at_ms},
                "defaults": defaults.model_dump(), "effective": effective.model_dump(),
                "api_key_limits": self._settings.api_key.model_dump()}

    async def get(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        found = [o for o in await self._store.rate_limit_overrides()
                 if o.mode == mode and o.customer_id == customer_id]
        return json_response(self._view(customer_id, found[0] if found else None))

    async def put(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = await self._admin.read_json(request)
        limits: dict[str, int | None] = {}
        for name, bound in _BOUNDS.items():
            if name not in body:
                raise BadRequest(f"'{name}' is required: a positive integer, or null for no limit.", param=name)
            value = body[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= bound):
                raise BadRequest(f"'{name}' must be an integer from 1 to {bound}, or null for no limit.",
                                 param=name)
            limits[name] = value
        override = await self._store.set_rate_limit_override(
            mode, customer_id, requests_per_minute=limits["requests_per_minute"],
            tokens_per_minute=limits["tokens_per_minute"])
        self._limiter.apply(override)
        return json_response(self._view(customer_id, override))

    async def delete(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        await self._store.delete_rate_limit_override(mode, customer_id)
        self._limiter.forget(mode, customer_id)
        return json_response(self._view(customer_id, None))
