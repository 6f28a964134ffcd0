"""Assemble the aiohttp application: pipeline, admin API, portal, health; each resource opened and
closed in one place (``cleanup_ctx``), shared state under typed keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from metergate.admin.api import AdminApi
from metergate.config.settings import Settings
from metergate.http import error_middleware, json_response
from metergate.metering.costs import ProviderCosts
from metergate.metering.pricing import PriceBook
from metergate.metering.tokenizer import preload
from metergate.portal.links import LinkSigner
from metergate.portal.views import PortalViews
from metergate.proxy.identify import Identifier
from metergate.proxy.pipeline import Pipeline
from metergate.wallet.models import now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.store import WalletStore

log = logging.getLogger(__name__)

STORE = web.AppKey("store", WalletStore)
PIPELINE = web.AppKey("pipeline", Pipeline)
SETTINGS = web.AppKey("settings", Settings)


async def sweep_forever(store: WalletStore, interval_s: float) -> None:
    """Release expired holds; each expiry is idempotent, so many replicas may sweep at once."""
    while True:
        try:
            expired = await store.expire_holds(now_ms=now_ms())
            if expired:
                log.info("expired %d holds", expired)
        except Exception:
            log.exception("hold sweep failed; retrying next interval")
        await asyncio.sleep(interval_s)


def build_app(settings: Settings, store: WalletStore | None = None, *,
              public_url: str | None = None) -> web.Application:
    store = store or SqlWalletStore(settings.database_url)
    signer = LinkSigner({k: v.get_secret_value() for k, v in settings.portal_secrets.items()},
                        ttl_s=settings.portal_link_ttl_s,
                        base_url=public_url or settings.public_url or f"http://{settings.host}:{settings.port}")
    if signer.ephemeral:
        log.warning("portal_secrets is not set: portal links are signed with a per-process key "
                    "and stop working after a restart")
    prices = PriceBook(settings.pricing, settings.asset(settings.pricing.asset).scale)
    pipeline = Pipeline(settings, store, Identifier(settings, store), prices,
                        ProviderCosts(settings.cost_overrides), signer)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[STORE] = store
    app[PIPELINE] = pipeline
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await asyncio.get_running_loop().run_in_executor(None, preload)
        await pipeline.start()
        sweeper = asyncio.create_task(sweep_forever(store, settings.sweep_interval_s))
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await pipeline.stop()
        await store.close()

    app.cleanup_ctx.append(resources)

    async def livez(_request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            await store.ping()
        except Exception:
            return json_response({"status": "unavailable", "database": "down"}, status=503)
        return json_response({"status": "ok", "database": "up"})

    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.add_routes(AdminApi(settings, store, signer).routes())
    app.add_routes(PortalViews(settings, store, signer).routes())
    app.router.add_route("*", "/{tail:.*}", pipeline.handle)
    return app
