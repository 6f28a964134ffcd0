"""The payments feature assembled: storage, Stripe, notifications, top-ups, webhooks, the periodic check.

Notifications go through the durable webhook outbox; this process runs its delivery loop when a
``notify_url`` is set.

Served by the control plane (``role: control`` or ``all``). Opened after the wallet store and closed before
it, through one ``cleanup_ctx`` generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from metergate.admin.api import AdminApi
from metergate.config.settings import Settings
from metergate.payments.admin import PaymentsAdminApi
from metergate.payments.notify import Notifier
from metergate.payments.store import PaymentsStore
from metergate.payments.stripe_api import StripeApi
from metergate.payments.topups import TopUps
from metergate.payments.webhooks import StripeWebhooks
from metergate.wallet.models import Balance, Mode
from metergate.wallet.store import WalletStore
from metergate.webhooks.admin import WebhooksAdminApi
from metergate.webhooks.delivery import WebhookDelivery
from metergate.webhooks.outbox import WebhookOutbox

log = logging.getLogger(__name__)


class Payments:
    def __init__(self, settings: Settings, wallet: WalletStore) -> None:
        """Payment state lives in the wallet's system of record (the SQL database); credits go through
        ``wallet`` so that an admission layer in front of it (the Redis wallet) sees them at once."""
        sql = wallet.system_of_record
        self.settings = settings
        self.store = PaymentsStore(sql, money=wallet)
        self.stripe = StripeApi(settings, self.store)
        self.outbox = WebhookOutbox(sql)  # notifications: durable, retried, signed (metergate/webhooks)
        self.delivery = WebhookDelivery(settings, self.outbox)
        self.notifier = Notifier(self.outbox, self.delivery)
        self.topups = TopUps(settings, self.store, self.stripe, self.notifier)
        self.webhooks = StripeWebhooks(settings, self.topups)

    def routes(self, admin: AdminApi) -> list[web.RouteDef]:
        return [*self.webhooks.routes(), *PaymentsAdminApi(admin, self.store, self.topups).routes(),
                *WebhooksAdminApi(admin, self.outbox, self.delivery).routes()]

    async def after_settlement(self, mode: Mode, customer_id: str, asset: str, balance: Balance | None = None) -> None:
        """The hook to call after a settlement, with the balance it left (never raises: a payment problem
        must not fail a request)."""
        try:
            await self.topups.check(mode, customer_id, asset, balance)
        except Exception:
            log.exception("auto top-up check failed")

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.settings.auto_topup_interval_s)
            try:
                await self.topups.check_all()
            except Exception:
                log.exception("periodic auto top-up check failed; retrying next interval")

    async def lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        await self.store.open()
        await self.outbox.open()
        tasks = [asyncio.create_task(self._periodic())]
        if self.delivery.enabled:
            tasks.append(asyncio.create_task(self.delivery.run_forever()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.delivery.close()
        await self.stripe.close()


PAYMENTS = web.AppKey("payments", Payments)
