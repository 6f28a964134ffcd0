"""What the proxy, the quote, the simulator and the events API price with: versions in memory, rules resolved.

Every process keeps the published versions of both modes in memory and reloads new ones every
``pricing.refresh_interval_s`` (published versions never change, so only new ids are read), so sidecars
pick up a version without a restart; a version published through this process applies here at once.
Publish a version with its ``effective_at`` at least one refresh interval ahead, and every replica switches
to it at the same instant: each request is priced by the version in force when it *started*
(:mod:`metergate.pricing.versions`), wherever it settles.

An item is resolved once, when it starts (:class:`Resolved`): version, rule, and — for rules with tiers —
the customer's position in each tier's period, read from the tier counters then. Its estimate and its final
price both come from that resolution, so a request straddling a version change or a tier boundary is priced
consistently. Concurrent requests of one customer read the same position (the counters are written when each
settles); the price is exact for the position read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from aiohttp import web

from metergate.config.settings import Settings
from metergate.errors import BadRequest, Forbidden
from metergate.metering.costs import ProviderCosts
from metergate.metering.usage import Usage
from metergate.pricing.engine import CostUnknown, Price, fold, period_start_ms, price, request_quantities
from metergate.pricing.rules import Rule
from metergate.pricing.store import PricingStore
from metergate.pricing.versions import PriceVersion, VersionTimeline, config_version
from metergate.wallet.errors import UnknownAsset
from metergate.wallet.models import Mode, Settlement, UsageRecord, now_ms, stored_text

log = logging.getLogger(__name__)


class AssetLike(Protocol):
    @property
    def code(self) -> str: ...

    @property
    def scale(self) -> int: ...


class AssetSource(Protocol):
    """Where a mode's assets come from beyond the configuration (operator-defined assets; immutable once made)."""

    async def all(self, mode: Mode) -> Sequence[AssetLike]: ...


@dataclass(frozen=True, slots=True)
class Resolved:
    """The price terms of one item: the version in force when it started, its rule, its tier position."""

    version_id: str
    rule: Rule
    attributes: dict[str, str]
    started_ms: int
    scale: int
    period_prior: dict[str, Decimal] = field(default_factory=dict)  # tier counter -> usage before this item
    period_starts: dict[str, int] = field(default_factory=dict)  # tier counter -> its period's start

    @property
    def asset(self) -> str:
        return self.rule.asset

    def price(self, quantities: Mapping[str, Decimal], cost_nanos: int | None = None) -> Price:
        return price(self.rule, quantities, scale=self.scale, cost_nanos=cost_nanos, period_prior=self.period_prior)

    def period_rows(self, quantities: Mapping[str, Decimal]) -> list[tuple[str, int, Decimal]]:
        """What this item adds to its tier counters: (counter, period start, quantity)."""
        folded = fold(self.rule, quantities)
        return [(t.counter, self.period_starts[t.counter], folded.get(t.quantity, Decimal(0)))
                for t in self.rule.tiers if folded.get(t.quantity)]

    def as_detail(self) -> dict[str, Any]:
        return {"version": self.version_id, "rule": self.rule.id, "asset": self.rule.asset,
                "period_prior": {k: str(v) for k, v in self.period_prior.items()}}


class PricingService:
    def __init__(self, settings: Settings, store: PricingStore | None = None,
                 costs: ProviderCosts | None = None, assets: AssetSource | None = None) -> None:
        self.asset = settings.pricing.asset  # the configuration's asset: version 0's, and the default
        self.store = store
        self.costs = costs or ProviderCosts(settings.cost_overrides)
        self._scales = {a.code: a.scale for a in settings.assets}
        self._assets = assets
        self._custom: dict[tuple[str, str], int] = {}  # (mode, code) -> scale of an operator-defined asset
        self.config = config_version(settings.pricing, set(self._scales))
        self._refresh_s = settings.pricing.refresh_interval_s
        self._attribute_headers = settings.pricing.attribute_headers
        self._feature_header = settings.attribution_header
        self._known: dict[str, PriceVersion] = {}
        self._timelines: dict[str, VersionTimeline] = {m: VersionTimeline([], self.config) for m in ("test", "live")}

    # ---------------------------------------------------------------- versions in memory

    async def asset_scales(self, mode: Mode) -> dict[str, int]:
        """Every asset of the mode (configured and operator-defined) with its scale."""
        scales = dict(self._scales)
        if self._assets is not None:
            for asset in await self._assets.all(mode):
                scales.setdefault(asset.code, asset.scale)
                self._custom[(mode, asset.code)] = asset.scale
        return scales

    async def scale_of(self, mode: Mode, asset: str) -> int:
        """The scale of one of the mode's assets (400 ``unknown_asset`` if it has none by that code)."""
        scale = self._scales.get(asset, self._custom.get((mode, asset)))
        if scale is None:
            scale = (await self.asset_scales(mode)).get(asset)
        if scale is None:
            raise UnknownAsset(asset)
        return scale

    def version_at(self, mode: Mode, at_ms: int) -> PriceVersion:
        return self._timelines[mode].at(at_ms)

    def has_prices(self) -> bool:
        """Whether anything can be priced: the configuration's rules or a published version."""
        return bool(self.config.rules.rules or self._known)

    def apply(self, version: PriceVersion) -> None:
        """Take a published version into account now (this process published it)."""
        if version.state != "published" or version.mode is None:
            return
        self._known[version.id] = version
        self._rebuild()

    def _rebuild(self) -> None:
        for mode in ("test", "live"):
            self._timelines[mode] = VersionTimeline([v for v in self._known.values() if v.mode == mode], self.config)

    async def refresh(self) -> None:
        if self.store is None:
            return
        new = await self.store.published(exclude=set(self._known))
        if new:
            for version in new:
                self._known[version.id] = version
            self._rebuild()

    async def lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: open the tables, load the versions, refresh them until shutdown."""
        if self.store is not None:
            await self.store.open()
            await self.refresh()
        task = asyncio.create_task(self._refresh_forever()) if self.store is not None else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("price version refresh failed; keeping the versions loaded")

    # ---------------------------------------------------------------- resolving and pricing

    async def resolve(self, mode: Mode, customer_id: str, attributes: dict[str, str], *, at_ms: int | None = None,
                      version: PriceVersion | None = None) -> Resolved | None:
        """Choose the rule for an item starting at ``at_ms`` (default now) under ``version`` (default: the one
        in force then) and read its tier position; ``None`` when no rule matches."""
        at = now_ms() if at_ms is None else at_ms
        chosen = version or self.version_at(mode, at)
        attrs = {**attributes, "customer": customer_id}
        rule = chosen.rules.choose(attrs)
        if rule is None:
            return None
        starts = {t.counter: period_start_ms(t.period, at) for t in rule.tiers}
        prior: dict[str, Decimal] = {}
        if starts and self.store is not None:
            prior = await self.store.period_usage(mode, customer_id, list(starts.items()))
        scale = await self.scale_of(mode, rule.asset)
        return Resolved(chosen.id, rule, attrs, at, scale, prior, starts)

    async def resolve_request(self, mode: Mode, customer_id: str, *, model: str, endpoint: str, route: str,
                              provider: str, attributes: Mapping[str, str] | None = None) -> Resolved:
        """A proxy request's terms; 400 ``unknown_model`` when no rule prices it (as in version 0). Besides its
        own attributes, the request has those of :meth:`request_attributes` (``attributes``)."""
        own = {"type": "request", "model": model, "endpoint": endpoint, "route": route, "provider": provider}
        resolved = await self.resolve(mode, customer_id, {**(attributes or {}), **own})
        if resolved is None:
            raise BadRequest(f"Model {model!r} has no price on this gateway.", code="unknown_model", param="model")
        return resolved

    async def resolve_compute(self, mode: Mode, customer_id: str, *, route: str, provider: str, path: str,
                              attributes: Mapping[str, str] | None = None) -> Resolved | None:
        """A compute request's terms, when the rule chosen for it names ``type: compute``; ``None`` leaves the
        request to its route's ``unit_price``. Only such a rule applies: a catch-all rule written for token
        requests (no ``type``) would otherwise price GPU time by token rates it has none of. The quantities a
        compute rule prices are ``units`` (seconds, or the units the upstream reports) and ``requests`` (1)."""
        own = {"type": "compute", "route": route, "provider": provider, "path": path[:128]}
        resolved = await self.resolve(mode, customer_id, {**(attributes or {}), **own})
        if resolved is None or ("type", "compute") not in resolved.rule.match:
            return None
        return resolved

    def request_attributes(self, headers: Mapping[str, str],
                           key_attributes: Mapping[str, str] | None) -> dict[str, str]:
        """The pricing attributes a proxy request brings, from a trusted source only.

        A request identified by the customer header comes from the application (a trusted network): its feature
        header and its ``pricing.attribute_headers`` are its attributes. A request identified by a proxy key
        (``key_attributes``: the key's own, set through the admin API) has the key's attributes and nothing
        else: its client would otherwise choose its own price rule, so a feature or attribute header on such a
        request is refused (403 ``untrusted_attribute_header``) rather than silently ignored."""
        named = {"feature": self._feature_header, **self._attribute_headers}
        if key_attributes is not None:
            sent = [header for header in named.values() if header in headers]
            if sent:
                raise Forbidden(f"{sent[0]} is only accepted from the application's own address: a proxy API key "
                                "carries its pricing attributes itself (set through the admin API).",
                                code="untrusted_attribute_header", param=sent[0])
            return dict(key_attributes)
        attributes: dict[str, str] = {}
        for name, header in named.items():
            value = stored_text(headers.get(header) or "", 128)  # as the usage record keeps it
            if value:
                attributes[name] = value
        return attributes

    def request_price(self, resolved: Resolved, usage: Usage, provider: str, model: str) -> Price:
        """A proxy request's price for ``usage``; raises :class:`CostUnknown` for a cost-plus rule whose provider
        cost is unknown."""
        cost = self.costs.cost(provider, model, usage).nanos if resolved.rule.markup is not None else None
        return resolved.price(request_quantities(usage), cost)

    def estimate(self, resolved: Resolved, usage: Usage, provider: str, model: str) -> int:
        """The hold for a proxy request (400 ``unknown_cost`` when a cost-plus rule cannot price it)."""
        try:
            return self.request_price(resolved, usage, provider, model).amount
        except CostUnknown:
            raise BadRequest(f"Model {model!r} is priced over its provider cost, which is unknown.",
                             code="unknown_cost", param="model") from None

    def final(self, resolved: Resolved, usage: Usage, provider: str, model: str, *, fallback: int) -> int:
        """A proxy request's final price; never raises. Should a cost-plus rule lose the provider's cost between
        estimate and settlement (it was known at the estimate), the estimate (``fallback``) is charged."""
        try:
            return self.request_price(resolved, usage, provider, model).amount
        except CostUnknown:
            log.warning("provider cost of %s became unknown after its estimate; charging the estimate", model)
            return fallback

    async def count(self, resolved: Resolved, record_id: str, mode: Mode, customer_id: str,
                    quantities: Mapping[str, Decimal]) -> None:
        """Add a settled item's quantities to its tier counters (once per record id); logged, never raised."""
        if self.store is None or not resolved.rule.tiers:
            return
        try:
            await self.store.add_period_usage(record_id, mode, customer_id, resolved.period_rows(quantities))
        except Exception:
            log.exception("%s: tier counters not updated", record_id)

    async def counted(self, settlement: Awaitable[Settlement | None], resolved: Resolved, record: UsageRecord,
                      usage: Usage | None) -> Settlement | None:
        """Await a proxy settlement, then count its usage into the rule's tier counters."""
        settled = await settlement
        if settled is not None and usage is not None and usage.source != "none" and resolved.rule.tiers:
            await self.count(resolved, record.id, record.mode, record.customer_id, request_quantities(usage))
        return settled
