"""The billing feature assembled: storage, the meter-event reporter, the admin routes.

Served by the control plane (``role: control`` or ``all``), beside payments, whose Stripe clients and
customer mapping it reuses. The proxy needs nothing from it: an invoiced wallet is an overdraft in the
shared database, which every sidecar's hold already honours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from metergate.admin.api import AdminApi
from metergate.billing.admin import BillingAdminApi
from metergate.billing.meter_events import MeterReporter
from metergate.billing.store import BillingStore, WalletChanged
from metergate.config.settings import Settings
from metergate.payments.service import Payments


class Billing:
    def __init__(self, settings: Settings, payments: Payments, *,
                 on_limit_changed: WalletChanged | None = None) -> None:
        self.settings = settings
        self.store = BillingStore(payments.store.wallet, {a.code: a.scale for a in settings.assets},
                                  on_limit_changed=on_limit_changed)
        self.reporter = MeterReporter(settings, self.store, payments.stripe)

    def routes(self, admin: AdminApi) -> list[web.RouteDef]:
        return BillingAdminApi(admin, self.store).routes()

    async def lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        """Opens after payments (whose Stripe clients the reporter uses) and closes before them."""
        await self.store.open()
        task = asyncio.create_task(self.reporter.run_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


BILLING = web.AppKey("billing", Billing)
