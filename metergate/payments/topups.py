"""Top-ups: a Checkout Session the customer pays, or an off-session payment when the balance runs low.

Crediting is idempotent by the Stripe object that carried the money: the wallet credit's idempotency key is
``stripe:<checkout session id>`` or ``stripe:<payment intent id>``, and the ledger's unique index on it is
in the same transaction as the credit. So a webhook delivered twice, twenty deliveries at once, and the
synchronous answer of an off-session payment racing its own ``payment_intent.succeeded`` all credit once;
a credit that failed (storage down) is simply credited when Stripe retries.

Auto top-up (per wallet and asset: a threshold and an amount): :meth:`TopUps.check` runs after a settlement
and periodically. It claims the wallet's single in-flight slot (a unique index), within a daily cap, then
charges the saved card off-session with an idempotency key derived from the attempt. A decline or a card
that needs authentication is recorded and notified; a failed attempt is not retried until the settings
change, so a bad card never loops.
"""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import stripe
from sqlalchemy import Connection

from metergate.config.settings import Settings
from metergate.errors import BadRequest
from metergate.payments.notify import Notifier
from metergate.payments.store import AutoTopUpSetting, PaymentsStore, TopUp
from metergate.payments.stripe_api import PaymentsUnavailable, StripeApi
from metergate.wallet.models import Balance, Mode, now_ms

log = logging.getLogger(__name__)
_DAY_MS = 86_400_000
STALE_IN_FLIGHT_MS = 10 * 60_000  # an off-session charge takes seconds; ten minutes in flight means orphaned


class TopUps:
    def __init__(self, settings: Settings, store: PaymentsStore, stripe_api: StripeApi, notifier: Notifier) -> None:
        self.settings = settings
        self.store = store
        self.stripe = stripe_api
        self.notifier = notifier
        self.asset = settings.pricing.asset
        self.scale = settings.asset(self.asset).scale
        self.currency = settings.stripe_currency
        self._low: set[tuple[str, str, str]] = set()  # wallets already notified as low, until they recover

    # ---------------------------------------------------------------- amounts

    def cents_to_minor(self, cents: int) -> int:
        if self.scale < 2:
            raise PaymentsUnavailable(f"Asset {self.asset} has fewer than 2 decimal places; it cannot take cards.")
        return cents * int(10 ** (self.scale - 2))

    def minor_to_cents(self, minor: int) -> int:
        return minor // int(10 ** (self.scale - 2)) if self.scale >= 2 else 0

    def parse_topup(self, text: str) -> int:
        """A top-up the customer typed (major unit, e.g. ``"25.00"``) as cents, within the operator's limits."""
        try:
            amount = Decimal(text.strip())
        except InvalidOperation:
            raise BadRequest("Enter an amount such as 25.00.", code="invalid_amount", param="amount") from None
        if not amount.is_finite() or amount != amount.quantize(Decimal("0.01")):
            raise BadRequest("Enter an amount in whole cents.", code="invalid_amount", param="amount")
        low, high = self.settings.topup_min, self.settings.topup_max
        if not low <= amount <= high:
            raise BadRequest(f"Top-ups must be between {low:.2f} and {high:.2f}.", code="invalid_amount",
                             param="amount")
        return int(amount * 100)  # exact: whole cents checked above

    # ---------------------------------------------------------------- Checkout

    async def start_checkout(self, mode: Mode, customer_id: str, amount_cents: int, *, success_url: str,
                             cancel_url: str, product: str = "Prepaid credit") -> str:
        """Create a pending top-up and its Checkout Session; return the URL the customer pays at."""
        stripe_customer = await self.stripe.customer(mode, customer_id)
        topup = await self.store.create_topup(mode, customer_id, self.asset, self.cents_to_minor(amount_cents),
                                              "checkout")
        session_id, url = await self.stripe.checkout_session(
            mode, stripe_customer, topup_id=topup.id, customer_id=customer_id, asset=self.asset,
            amount_cents=amount_cents, currency=self.currency, product=product, success_url=success_url,
            cancel_url=cancel_url)
        await self.store.set_stripe_id(topup.id, session_id)
        return url

    # ---------------------------------------------------------------- webhook events

    async def handle_event(self, mode: Mode, event: dict[str, Any]) -> str:
        """Apply one verified event; returns what was done (``credited``, ``failed``, ``ignored``)."""
        obj: dict[str, Any] = event.get("data", {}).get("object", {}) or {}
        kind = event.get("type", "")
        meta: dict[str, Any] = obj.get("metadata") or {}
        if meta.get("metergate_mode") not in (None, mode):
            raise BadRequest("The event's wallet belongs to the other mode.", code="wrong_mode")
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            if obj.get("payment_status") != "paid":
                return "ignored"  # an asynchronous method: wait for async_payment_succeeded
            return await self._credit(mode, obj, meta, amount_cents=int(obj["amount_total"]))
        if kind in ("checkout.session.async_payment_failed", "checkout.session.expired"):
            await self._fail(meta, "checkout_" + kind.rsplit(".", 1)[1], "The Checkout payment did not complete.")
            return "failed"
        if meta.get("metergate_purpose") != "auto_topup":
            return "ignored"  # a Checkout's own PaymentIntent: its session event credits it
        if kind == "payment_intent.succeeded":
            return await self._credit(mode, obj, meta, amount_cents=int(obj["amount"]))
        if kind == "payment_intent.payment_failed":
            error = obj.get("last_payment_error") or {}
            await self._fail(meta, str(error.get("code") or "payment_failed"), str(error.get("message") or ""))
            return "failed"
        return "ignored"

    async def _credit(self, mode: Mode, obj: dict[str, Any], meta: dict[str, Any], *, amount_cents: int) -> str:
        customer_id, asset = meta.get("metergate_customer"), meta.get("metergate_asset", self.asset)
        if not customer_id or asset != self.asset:
            raise BadRequest("The event names no wallet of this metergate.", code="unknown_wallet")
        if str(obj.get("currency", "")).lower() != self.currency:
            raise BadRequest("The event's currency is not the configured one.", code="wrong_currency")
        amount = self.cents_to_minor(amount_cents)
        await self.store.money.credit(mode, customer_id, asset, amount, idempotency_key=f"stripe:{obj['id']}",
                                       memo=f"Stripe top-up {obj['id']}")
        topup_id = meta.get("metergate_topup")
        def notify(conn: Connection, topup: TopUp) -> None:  # committed with the top-up's new state
            self.notifier.record(conn, "topup.succeeded", mode, customer_id, {
                "topup_id": topup.id, "kind": topup.kind, "asset": asset, "amount": amount, "stripe_id": obj["id"]})

        finished = await self.store.finish_topup(topup_id, "succeeded", also=notify) if topup_id else None
        if finished is not None:
            self._low.discard((mode, customer_id, asset))
        return "credited"

    async def _fail(self, meta: dict[str, Any], code: str, message: str) -> None:
        topup_id = meta.get("metergate_topup")
        if not topup_id:
            return
        await self.store.finish_topup(topup_id, "failed", error_code=code, error_message=message,
                                      also=self._notify_failed)

    def _notify_failed(self, conn: Connection, topup: TopUp) -> None:
        """The ``topup.failed`` notification, committed with the top-up's new state."""
        self.notifier.record(conn, "topup.failed", topup.mode, topup.customer_id, {
            "topup_id": topup.id, "kind": topup.kind, "asset": topup.asset, "amount": topup.amount,
            "error_code": topup.error_code, "error_message": topup.error_message})

    # ---------------------------------------------------------------- auto top-up

    async def check(self, mode: Mode, customer_id: str, asset: str, balance: Balance | None = None) -> TopUp | None:
        """After a settlement: notify a low or depleted wallet and, if it has auto top-up, start one.

        ``balance``: the wallet as the settlement left it; then the setting may come from a short-lived
        cache, so that the common case (nothing due) costs no database read on the request path.
        Returns the attempt this call made (``None`` when none was due or allowed)."""
        cached = balance is not None
        if balance is None:
            balance = await self.store.money.balance(mode, customer_id, asset)
        setting = await self.store.auto_topup(mode, customer_id, asset,
                                              max_age_s=self.settings.key_cache_ttl_s if cached else 0)
        wallet = (mode, customer_id, asset)
        if setting is None or balance.available >= setting.threshold:
            if setting is not None:
                self._low.discard(wallet)
            if balance.available <= 0 and balance.credits_posted > 0 and wallet not in self._low:
                self._low.add(wallet)
                await self.notifier.notify("wallet.depleted", mode, customer_id,
                                           {"asset": asset, "available": 0})
            return None
        if wallet not in self._low:
            self._low.add(wallet)
            event = "wallet.depleted" if balance.available <= 0 else "balance.low"
            await self.notifier.notify(event, mode, customer_id, {
                "asset": asset, "available": balance.available, "threshold": setting.threshold})
        if not self.stripe.configured(mode) or await self._failed_since(setting):
            return None
        day_start = now_ms() // _DAY_MS * _DAY_MS
        topup = await self.store.begin_auto_topup(mode, customer_id, asset, setting.amount, day_start_ms=day_start,
                                                  daily_cap=self.settings.auto_topup_daily_cap)
        if topup is None:
            return None
        return await self._charge(topup)

    async def _failed_since(self, setting: AutoTopUpSetting) -> bool:
        """Whether the last auto top-up failed after the settings last changed (then: wait for the customer)."""
        for topup in await self.store.topups(setting.mode, setting.customer_id, limit=20):
            if topup.kind == "auto" and topup.asset == setting.asset:
                return topup.state == "failed" and topup.created_at_ms >= setting.updated_at_ms
        return False

    async def _charge(self, topup: TopUp) -> TopUp:
        mode, cents = topup.mode, self.minor_to_cents(topup.amount)
        try:
            stripe_customer = await self.stripe.customer(mode, topup.customer_id)
            method = await self.stripe.default_payment_method(mode, stripe_customer)
            if method is None:
                return await self._record_failure(topup, "no_payment_method", "No saved card to charge.")
            intent = await self.stripe.off_session_payment(
                mode, stripe_customer, method, topup_id=topup.id, customer_id=topup.customer_id, asset=topup.asset,
                amount_cents=cents, currency=self.currency)
        except stripe.CardError as exc:
            code = exc.code or "card_error"
            decline = (exc.error.decline_code if exc.error is not None else None) or ""
            intent_id = exc.error.payment_intent.id if exc.error is not None and exc.error.payment_intent else None
            if intent_id:
                await self.store.set_stripe_id(topup.id, intent_id)
            detail = f"{exc.user_message or 'card error'}" + (f" ({decline})" if decline and decline != code else "")
            return await self._record_failure(topup, code, detail)
        except stripe.StripeError as exc:
            log.warning("auto top-up %s: Stripe error %s", topup.id, type(exc).__name__)
            return await self._record_failure(topup, exc.code or "stripe_error", "Stripe refused the payment.")
        await self.store.set_stripe_id(topup.id, intent.id)
        if intent.status == "succeeded":
            await self._credit(mode, {"id": intent.id, "currency": intent.currency},
                               {"metergate_customer": topup.customer_id, "metergate_asset": topup.asset,
                                "metergate_topup": topup.id},
                               amount_cents=int(intent.amount))
        # Otherwise (processing): payment_intent.succeeded or .payment_failed finishes it.
        found = await self.store.get_topup(topup.id)
        assert found is not None
        return found

    async def _record_failure(self, topup: TopUp, code: str, message: str) -> TopUp:
        await self.store.finish_topup(topup.id, "failed", error_code=code, error_message=message,
                                      also=self._notify_failed)
        found = await self.store.get_topup(topup.id)
        assert found is not None
        return found

    async def check_all(self) -> int:
        """The periodic pass: resume attempts orphaned mid-charge, then check every wallet with auto top-up
        (a backstop for the settlement hook). Resuming is safe: the PaymentIntent's idempotency key is the
        attempt's id, so Stripe answers a replay with the first PaymentIntent instead of charging again."""
        for orphan in await self.store.stale_in_flight(updated_before_ms=now_ms() - STALE_IN_FLIGHT_MS):
            try:
                await self._charge(orphan)
            except Exception:
                log.exception("resuming auto top-up %s failed", orphan.id)
        started = 0
        for setting in await self.store.auto_topups():
            try:
                started += await self.check(setting.mode, setting.customer_id, setting.asset) is not None
            except Exception:
                log.exception("auto top-up check failed for one wallet")
        return started
