"""Assemble the aiohttp application: pipeline, admin API, portal, health; each resource opened and
closed in one place (``cleanup_ctx``), shared state under typed keys.

What is served depends on the role (``settings.role``):

* ``sidecar`` — the proxy pipeline, ``/livez``, ``/readyz``, ``/metrics``;
* ``control`` — the admin API, the portal, the hold sweeper, ``/livez``, ``/readyz``, ``/metrics``;
* ``all`` — both (the embedded default).

On shutdown (SIGTERM), a proxy stops accepting, lets the requests in flight finish for up to
``drain_deadline_s``, cuts and settles what is left, and then closes its resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from metergate.config.settings import Settings
from metergate.http import LISTENER, ListenerLimits, error_middleware, json_response
from metergate.metering.costs import ProviderCosts
from metergate.metering.tokenizer import preload_for_models
from metergate.observability import tracing
from metergate.observability.metrics import CONTENT_TYPE, Metrics
from metergate.observability.middleware import observe_middleware
from metergate.payments.spendcaps import SpendCapGuard
from metergate.payments.store import PaymentsStore
from metergate.portal.links import LinkSigner
from metergate.pricing.service import PricingService
from metergate.pricing.store import PricingStore
from metergate.proxy import cors
from metergate.proxy.identify import Identifier
from metergate.proxy.pipeline import Pipeline
from metergate.wallet.assets import AssetRegistry
from metergate.wallet.errors import log_retrying
from metergate.wallet.escrow import Escrow, EscrowPolicy
from metergate.wallet.models import now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.store import WalletStore

log = logging.getLogger(__name__)

STORE = web.AppKey("store", WalletStore)
PIPELINE = web.AppKey("pipeline", Pipeline)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)


async def sweep_forever(store: WalletStore, interval_s: float, metrics: Metrics | None = None) -> None:
    """Release expired holds; each expiry is idempotent, so many replicas may sweep at once."""
    while True:
        try:
            expired = await store.expire_holds(now_ms=now_ms())
            if expired:
                log.info("expired %d holds", expired)
                if metrics is not None:
                    metrics.expired(expired)
        except Exception as exc:
            log_retrying(log, "hold sweep failed", exc)
        try:  # grant expiry and subscription periods (metergate/wallet/grants.py)
            await store.expire_entitlements(now_ms=now_ms())
        except Exception as exc:
            log_retrying(log, "grant sweep failed", exc)
        await asyncio.sleep(interval_s)


def wallet_store(settings: Settings) -> WalletStore:
    """The SQL store; with ``redis_url``, the Redis real-time wallet over it (its ledger sink runs in the store's
    own open/close, so every replica helps drain), or with ``redis_wallet: false`` the SQL store with its
    rate-limit windows in Redis (:mod:`metergate.wallet.redis.windows`)."""
    if settings.redis_url and not settings.redis_wallet:
        from metergate.wallet.redis.windows import SqlWalletWithRedisWindows

        return SqlWalletWithRedisWindows(settings.database_url, settings.redis_url, prefix=settings.redis_key_prefix,
                                         shards=settings.redis_shards)
    if settings.redis_url:
        from metergate.wallet.redis.batching import BatchingSqlWalletStore
        from metergate.wallet.redis.store import RedisWalletStore

        return RedisWalletStore(BatchingSqlWalletStore(settings.database_url), settings.redis_url,
                                prefix=settings.redis_key_prefix, shards=settings.redis_shards,
                                max_backlog=settings.redis_max_backlog, sink_batch=settings.redis_sink_batch,
                                reconcile_interval_s=settings.redis_reconcile_interval_s,
                                fail_open_requests=settings.redis_fail_open_requests)
    return SqlWalletStore(settings.database_url)


def _escrow(settings: Settings, store: SqlWalletStore | None) -> Escrow | None:
    """Escrow leases in front of a SQL store, unless turned off (the Redis wallet admits in Redis instead)."""
    if store is None or not settings.escrow.enabled:
        return None
    e = settings.escrow
    return Escrow(store, EscrowPolicy(horizon_s=e.horizon_s, share=e.share, min_requests=e.min_requests,
                                      hot_per_s=e.hot_per_s, ttl_s=e.ttl_s, idle_s=e.idle_s, tick_s=e.tick_s,
                                      recall_wait_s=e.recall_wait_s, cooldown_s=e.cooldown_s))


def build_app(settings: Settings, store: WalletStore | None = None, *, public_url: str | None = None,
              tracer_provider: Any | None = None) -> web.Application:
    """``tracer_provider``: an OpenTelemetry ``TracerProvider`` to trace the proxy with, whatever the
    ``tracing`` setting says (the tests' in-memory exporter); without one, ``tracing`` decides."""
    store = store or wallet_store(settings)
    signer = LinkSigner({k: v.get_secret_value() for k, v in settings.portal_secrets.items()},
                        ttl_s=settings.portal_link_ttl_s,
                        base_url=public_url or settings.public_url or f"http://{settings.host}:{settings.port}")
    if signer.ephemeral:
        log.warning("portal_secrets is not set: portal links are signed with a per-process key "
                    "and stop working after a restart")
    proxy, control = settings.role in ("sidecar", "all"), settings.role in ("control", "all")
    if settings.role == "sidecar" and not (public_url or settings.public_url):
        log.warning("public_url is not set: portal links in 402 answers point at this sidecar, which serves "
                    "no portal; set it to the control plane's public address")
    # Price versions live in the SQL wallet database (the Redis wallet's own SQL store behind it, if any) —
    # metergate/pricing.
    sql_store = store.system_of_record
    pricing_store = PricingStore(sql_store)
    costs = ProviderCosts(settings.cost_overrides)
    prices = PricingService(settings, pricing_store, costs, assets=(
        AssetRegistry(sql_store, settings.assets)))
    metrics = Metrics()
    pipeline = Pipeline(settings, store, Identifier(settings, store), prices, costs, signer, metrics)
    escrow = _escrow(settings, sql_store) if proxy and sql_store is store else None
    if escrow is not None:
        pipeline.holds = escrow
    from metergate.budgets.alerts import BudgetAlerts  # threshold alerts claim in SQL, notify via the outbox

    budget_alerts = BudgetAlerts(sql_store, deliver=bool(settings.notify_url))
    if proxy:
        pipeline.on_budget_settled = budget_alerts.touch
    app = web.Application(middlewares=[error_middleware, observe_middleware(metrics)],
                          client_max_size=settings.max_body_bytes)
    app[STORE] = store
    app[PIPELINE] = pipeline
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[LISTENER] = ListenerLimits(settings.header_read_timeout_s, settings.body_read_timeout_s)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        if proxy:
            if settings.tokenizer_preload:  # else each encoding loads on its family's first request
                await asyncio.get_running_loop().run_in_executor(None, preload_for_models, settings.pricing.models)
            priced = [(route.provider_id, model) for route in settings.routes if route.compute is None
                      for model in settings.pricing.models if model != "*"]
            await asyncio.get_running_loop().run_in_executor(None, pipeline.costs.warm, priced)
            await pipeline.start()
            if escrow is not None:
                await escrow.start()
        await budget_alerts.start(settings.budget_alert_interval_s)  # in every role: recoveries need no traffic
        sweeper = asyncio.create_task(sweep_forever(store, settings.sweep_interval_s, metrics)) if control else None
        yield
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await budget_alerts.stop()
        await pipeline.stop()
        if escrow is not None:
            await escrow.close()  # every request has settled: the leases go back to their wallets
        await store.close()

    async def drain(_app: web.Application) -> None:
        # on_shutdown runs after the listener has closed and before aiohttp cancels unfinished handlers.
        await pipeline.drain(settings.drain_deadline_s)

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(prices.lifecycle)  # loads and refreshes price versions once the store is open
    if proxy:
        app.on_shutdown.append(drain)

    async def livez(_request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        checks: dict[str, str] = {"role": settings.role}
        try:
            await store.ping()
            checks["database"] = "up"
        except Exception:
            checks["database"] = "down"
        if proxy:
            # A proxy without a price table would refuse every request: not ready to take traffic.
            checks["prices"] = "loaded" if prices.has_prices() else "empty"
        ready = checks["database"] == "up" and checks.get("prices", "loaded") == "loaded"
        return json_response({"status": "ok" if ready else "unavailable", **checks}, status=200 if ready else 503)

    async def metrics_text(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    if control:
        # Imported here, not at the top: a sidecar never serves these, and their imports (the Stripe SDK with
        # requests and httpx behind it, the admin, portal and billing modules) would cost RSS in every pod
        # (bench/footprint.py measures it).
        from metergate.admin.api import AdminApi
        from metergate.admin.holds import HoldsApi
        from metergate.admin.listings import ListingsApi
        from metergate.admin.ratelimits import RateLimitsApi
        from metergate.admin.reports import ReportsApi
        from metergate.admin.wallets import WalletsApi
        from metergate.billing.service import BILLING, Billing
        from metergate.payments.service import PAYMENTS, Payments
        from metergate.portal.selfserve import SelfServe
        from metergate.portal.views import PortalViews
        from metergate.pricing.admin import PricingApi

        admin = AdminApi(settings, store, signer)
        app.middlewares.append(admin.validation)  # the OpenAPI document, enforced before any admin handler
        app.add_routes(admin.routes())
        app.add_routes(ReportsApi(settings, store, admin).routes())  # margin reports, the operator dashboard
        app.add_routes(RateLimitsApi(settings, store, admin, pipeline.ratelimiter).routes())
        from metergate.budgets.admin import BudgetsApi

        # Budget nodes, limits, key attachments and alert rules (metergate/budgets).
        app.add_routes(BudgetsApi(settings, store, admin, pipeline.budgets, budget_alerts).routes())
        if sql_store is store:  # assets, grants, plans, subscriptions; holds for any workload
            app.add_routes(WalletsApi(settings, store, admin).routes())
            app.add_routes(HoldsApi(settings, store, admin, signer).routes())
            app.add_routes(ListingsApi(store, admin).routes())  # API keys of a customer, open holds
        # Price versions, quotes, the simulator, usage events.
        event_caps = SpendCapGuard(PaymentsStore(pricing_store.wallet), cache_ttl_s=settings.key_cache_ttl_s)
        app.add_routes(PricingApi(settings, prices, pricing_store, store, admin, spend_caps=event_caps).routes())
        portal = PortalViews(settings, store, signer)
        app.add_routes(portal.routes())
        from metergate.budgets.portal import BudgetPortal

        # The budget tree and the alerts that fired, with the same signed link.
        app.add_routes(BudgetPortal(store, signer, {a.code: a.scale for a in settings.assets}).routes())
        # Payments keep their state in the SQL wallet database.
        app[PAYMENTS] = payments = Payments(settings, store)
        app.add_routes(payments.routes(admin))  # Stripe webhooks, payments admin
        selfserve = SelfServe(settings, payments, signer)  # the portal's top-up, settings and history
        app.add_routes(selfserve.routes())
        portal.page_override = selfserve.page
        app.cleanup_ctx.append(payments.lifecycle)  # opens after the store, closes before it
        pipeline.on_settled = payments.after_settlement  # auto top-up as soon as a settlement dips
        # Billing modes, meter events, exports; a credit line changed in SQL reloads a Redis projection.
        app[BILLING] = billing = Billing(settings, payments, on_limit_changed=store.refresh_overdraft)
        app.add_routes(billing.routes(admin))
        app.cleanup_ctx.append(billing.lifecycle)  # opens after payments, closes before them
    if proxy:
        pipeline.spend_caps = SpendCapGuard(PaymentsStore(sql_store), cache_ttl_s=settings.key_cache_ttl_s)
        cors.install(app, settings, pipeline.routes)  # browser clients of the proxy routes, when configured
        from metergate.budgets.selfserve import SelfService

        # A proxy key's own balance, budget and usage (no admin key): before the catch-all proxy route.
        app.add_routes(SelfService(settings, store, pipeline.identifier, pipeline.budgets).routes())
        # Every other path, control characters included (".*" stops at a decoded newline): the pipeline judges it.
        app.router.add_route("*", r"/{tail:[\s\S]*}", _traced(app, settings, pipeline, tracer_provider))
    return app


def _traced(app: web.Application, settings: Settings, pipeline: Pipeline, provider: Any | None) -> Any:
    """The proxy's handler, with a server span around each request when tracing is on. Off, it is the
    pipeline's own handler and OpenTelemetry is never imported."""
    if provider is None and not tracing.enabled(settings.tracing):
        return pipeline.handle
    try:
        from metergate.observability import otel
    except ModuleNotFoundError as missing:
        if not (missing.name or "").startswith("opentelemetry"):
            raise
        raise RuntimeError(f"tracing is on (tracing={settings.tracing}, OTEL_TRACES_EXPORTER) but OpenTelemetry "
                           "is not installed: install metergate[otel], or set tracing: off") from None
    if provider is None:
        provider = owned = otel.otlp_provider()

        async def flush(_app: web.Application) -> None:
            await asyncio.get_running_loop().run_in_executor(None, owned.shutdown)  # exports what is queued

        app.on_cleanup.append(flush)
    app.cleanup_ctx.append(otel.ledger_batch_spans(provider))  # the wallet's group commits, linked to requests
    return otel.traced(pipeline.handle, provider)
