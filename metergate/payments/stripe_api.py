"""Stripe, through the official SDK (async), one client per mode with that mode's own secret key.

A test-mode wallet can only ever reach Stripe with the test key, a live one with the live key: the mode
picks the key, and settings refuse a key of the other mode. Each wallet gets its Stripe customer lazily,
created once (an ``Idempotency-Key`` per wallet makes a retried creation return the same customer) and
its id stored beside the wallet.
"""

from __future__ import annotations

import logging
from typing import Any

import stripe

from metergate.config.settings import Settings
from metergate.errors import MetergateError
from metergate.payments.store import PaymentsStore
from metergate.wallet.models import Mode

log = logging.getLogger(__name__)


class PaymentsUnavailable(MetergateError):
    status = 503
    type = "api_error"
    default_code = "payments_unavailable"


class StripeApi:
    def __init__(self, settings: Settings, store: PaymentsStore) -> None:
        self._store = store
        self._keys: dict[Mode, str] = {}
        for mode in ("test", "live"):
            key = getattr(settings, f"stripe_{mode}_key")
            if key is not None:
                self._keys[mode] = key.get_secret_value()
        self._api_base = settings.stripe_api_base
        self._clients: dict[Mode, stripe.StripeClient] = {}
        self._http: list[stripe.AIOHTTPClient] = []

    def configured(self, mode: Mode) -> bool:
        return mode in self._keys

    def client(self, mode: Mode) -> stripe.StripeClient:
        if mode not in self._keys:
            raise PaymentsUnavailable(f"Payments are not configured in {mode} mode.")
        if mode not in self._clients:
            http = stripe.AIOHTTPClient()
            self._http.append(http)
            options: dict[str, Any] = {"http_client": http, "max_network_retries": 2}
            if self._api_base:
                options["base_addresses"] = {"api": self._api_base}
                options["max_network_retries"] = 0
            self._clients[mode] = stripe.StripeClient(self._keys[mode], **options)
        return self._clients[mode]

    async def close(self) -> None:
        for http in self._http:
            await http.close_async()  # type: ignore[no-untyped-call]
        self._http.clear()
        self._clients.clear()

    async def customer(self, mode: Mode, customer_id: str) -> str:
        """The wallet's Stripe customer id, created on first use."""
        found = await self._store.stripe_customer(mode, customer_id)
        if found is not None:
            return found
        created = await self.client(mode).v1.customers.create_async(
            params={"metadata": {"metergate_customer": customer_id, "metergate_mode": mode}},
            options={"idempotency_key": f"metergate-customer-{mode}-{customer_id}"})
        return await self._store.save_stripe_customer(mode, customer_id, created.id)

    async def default_payment_method(self, mode: Mode, stripe_customer_id: str) -> str | None:
        customer = await self.client(mode).v1.customers.retrieve_async(stripe_customer_id)
        settings = customer.invoice_settings
        method = settings.default_payment_method if settings is not None else None
        return method if isinstance(method, str) or method is None else method.id

    async def checkout_session(self, mode: Mode, stripe_customer_id: str, *, topup_id: str, customer_id: str,
                               asset: str, amount_cents: int, currency: str, product: str, success_url: str,
                               cancel_url: str) -> tuple[str, str]:
        """A one-off payment Checkout Session; returns its id and the URL to send the customer to."""
        metadata = {"metergate_topup": topup_id, "metergate_customer": customer_id, "metergate_mode": mode,
                    "metergate_asset": asset}
        session = await self.client(mode).v1.checkout.sessions.create_async(params={
            "mode": "payment", "customer": stripe_customer_id, "client_reference_id": topup_id,
            "line_items": [{"quantity": 1, "price_data": {
                "currency": currency, "unit_amount": amount_cents, "product_data": {"name": product}}}],
            "payment_intent_data": {"setup_future_usage": "off_session", "metadata": metadata},
            "metadata": metadata, "success_url": success_url, "cancel_url": cancel_url,
        }, options={"idempotency_key": f"metergate-checkout-{topup_id}"})
        assert session.url, "Stripe returned a Checkout Session without a URL"
        return session.id, session.url

    async def off_session_payment(self, mode: Mode, stripe_customer_id: str, payment_method: str, *,
                                  topup_id: str, customer_id: str, asset: str, amount_cents: int,
                                  currency: str) -> stripe.PaymentIntent:
        """Charge the saved card without the customer present; raises ``stripe.CardError`` on a decline."""
        return await self.client(mode).v1.payment_intents.create_async(params={
            "amount": amount_cents, "currency": currency, "customer": stripe_customer_id,
            "payment_method": payment_method, "confirm": True, "off_session": True,
            "metadata": {"metergate_topup": topup_id, "metergate_customer": customer_id, "metergate_mode": mode,
                         "metergate_asset": asset, "metergate_purpose": "auto_topup"},
        }, options={"idempotency_key": f"metergate-auto-{topup_id}"})

    async def billing_portal(self, mode: Mode, stripe_customer_id: str, return_url: str) -> str:
        """A Stripe billing-portal link where the customer manages cards (the off-session top-ups' card)."""
        session = await self.client(mode).v1.billing_portal.sessions.create_async(params={
            "customer": stripe_customer_id, "return_url": return_url})
        return str(session.url)
