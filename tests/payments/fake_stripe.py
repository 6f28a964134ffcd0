"""A local fake of the Stripe API, speaking its wire format, for the payment tests.

Requests are form-encoded with Stripe's bracket notation (``metadata[customer]=acme``), authenticated by a
bearer secret key whose prefix decides ``livemode``; answers are JSON objects with ``id`` and ``object``;
errors use Stripe's envelope ``{"error": {"type", "code", "decline_code", "message", "payment_intent"}}``.
``Idempotency-Key`` is honoured: a replay returns the first answer, the same key with other parameters is
a 400 ``idempotency_error``. Off-session PaymentIntents succeed or fail according to the payment method,
as Stripe's test cards do (``pm_card_visa``, ``pm_card_chargeDeclined``,
``pm_card_authenticationRequired``). ``event`` and ``sign`` build webhook deliveries as Stripe signs them.

Billing meter events (``POST /v1/billing/meter_events``: ``event_name``, ``payload[stripe_customer_id]``,
``payload[value]``, ``identifier``, ``timestamp``) are kept by identifier; a second event with an identifier
already held is refused as Stripe refuses it (400 ``invalid_request_error``, "An event already exists with
identifier ..."). For outage tests, ``meter_outage_status`` answers every meter event with that status (e.g.
500) without recording it, and ``meter_delay_s`` records the event and then answers that much later (a
client that timed out meanwhile never learns it was accepted). 5xx answers are not kept for
``Idempotency-Key`` replay, so a retry after an outage is executed afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import stripe
from aiohttp import web

TEST_KEY = "sk_test_fake" + "a" * 16
LIVE_KEY = "sk_live_fake" + "b" * 16
TEST_WHSEC = "whsec_test_" + "c" * 24
LIVE_WHSEC = "whsec_live_" + "d" * 24
_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}{int(time.time() * 1000) % 100000:05d}"


def parse_form(items: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket notation back into nested dicts (``a[b][c]=v``)."""
    out: dict[str, Any] = {}
    for key, value in items:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


@dataclass
class FakeStripe:
    url: str = ""
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, Any], str | None]] = field(default_factory=list)
    idempotent: dict[tuple[str, str], tuple[str, int, str]] = field(default_factory=dict)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_duplicates: list[str] = field(default_factory=list)
    meter_outage_status: int | None = None
    meter_delay_s: float = 0.0

    def default_payment_method(self, stripe_customer_id: str, payment_method: str) -> None:
        self.customers[stripe_customer_id]["invoice_settings"]["default_payment_method"] = payment_method

    def calls(self, method: str, path_prefix: str) -> list[dict[str, Any]]:
        return [params for m, p, params, _ in self.requests if m == method and p.startswith(path_prefix)]

    # ---------------------------------------------------------------- webhooks

    @staticmethod
    def event(event_type: str, obj: dict[str, Any], *, livemode: bool = False, event_id: str | None = None,
              created: int | None = None) -> str:
        return json.dumps({"id": event_id or _id("evt"), "object": "event", "api_version": "2025-01-27",
                           "created": created or int(time.time()), "livemode": livemode, "type": event_type,
                           "data": {"object": obj}, "pending_webhooks": 1, "request": {"id": None}})

    @staticmethod
    def sign(payload: str, secret: str, *, timestamp: int | None = None) -> str:
        header: str = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)
        return header

    def completed_session(self, session_id: str) -> dict[str, Any]:
        """The session as Stripe sends it in ``checkout.session.completed`` once the customer has paid."""
        session = self.sessions[session_id]
        session.update(status="complete", payment_status="paid", payment_intent=_id("pi"))
        return dict(session)

    # ---------------------------------------------------------------- the API

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v1/{path:.*}", self._api)
        app.router.add_get("/checkout/{session_id}", self._checkout_page)
        return app

    async def _checkout_page(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["session_id"])
        if session is None:
            raise web.HTTPNotFound()
        amount = int(session["amount_total"]) / 100
        return web.Response(content_type="text/html", text=(
            f"<!doctype html><html lang=en><title>Fake Checkout</title><main><h1>Fake Checkout</h1>"
            f"<p id=amount>Pay {amount:.2f} {session['currency'].upper()}</p></main></html>"))

    async def _api(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        if key not in (TEST_KEY, LIVE_KEY):
            return _error(401, "invalid_request_error", "api_key_invalid", "Invalid API Key provided.")
        livemode = key == LIVE_KEY
        body = await request.text()
        from urllib.parse import parse_qsl

        params = parse_form(parse_qsl(body, keep_blank_values=True))
        path = "/" + request.match_info["path"]
        idem = request.headers.get("Idempotency-Key")
        self.requests.append((request.method, path, params, idem))
        if idem and request.method == "POST":
            cached = self.idempotent.get((key, idem))
            if cached is not None:
                if cached[0] != body:
                    return _error(400, "idempotency_error", None, "Keys for idempotent requests can only be "
                                  "used with the same parameters they were first used with.")
                return web.Response(status=cached[1], text=cached[2], content_type="application/json",
                                    headers={"Idempotent-Replayed": "true"})
        if request.method == "POST" and path == "/billing/meter_events":
            response = await self._meter_event(params, livemode)
        else:
            response = self._route(request.method, path, params, livemode)
        if idem and request.method == "POST" and response.status < 500:
            assert isinstance(response.text, str)
            self.idempotent[(key, idem)] = (body, response.status, response.text)
        return response

    def _route(self, method: str, path: str, params: dict[str, Any], livemode: bool) -> web.Response:
        if method == "POST" and path == "/customers":
            cus = {"id": _id("cus"), "object": "customer", "livemode": livemode, "email": params.get("email"),
                   "name": params.get("name"), "metadata": params.get("metadata", {}),
                   "invoice_settings": {"default_payment_method": None}}
            self.customers[cus["id"]] = cus
            return _ok(cus)
        if method == "GET" and path.startswith("/customers/"):
            found = self.customers.get(path.split("/")[2])
            return _ok(found) if found else _missing("customer")
        if method == "POST" and path == "/checkout/sessions":
            line = params["line_items"]["0"]
            amount = int(line["price_data"]["unit_amount"]) * int(line.get("quantity", "1"))
            cs = {"id": _id("cs_test" if not livemode else "cs_live"), "object": "checkout.session",
                  "livemode": livemode, "mode": params.get("mode"), "customer": params.get("customer"),
                  "client_reference_id": params.get("client_reference_id"), "amount_total": amount,
                  "currency": line["price_data"]["currency"], "metadata": params.get("metadata", {}),
                  "payment_status": "unpaid", "status": "open", "payment_intent": None,
                  "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url")}
            cs["url"] = f"{self.url}/checkout/{cs['id']}"
            self.sessions[cs["id"]] = cs
            return _ok(cs)
        if method == "POST" and path == "/payment_intents":
            return self._payment_intent(params, livemode)
        if method == "POST" and path == "/billing_portal/sessions":
            return _ok({"id": _id("bps"), "object": "billing_portal.session", "customer": params.get("customer"),
                        "livemode": livemode, "return_url": params.get("return_url"),
                        "url": f"{self.url}/billing/{params.get('customer')}"})
        return _error(404, "invalid_request_error", "resource_missing", f"Unrecognized request URL ({path}).")

    async def _meter_event(self, params: dict[str, Any], livemode: bool) -> web.Response:
        if self.meter_outage_status is not None:
            return _error(self.meter_outage_status, "api_error", None, "An unexpected error occurred.")
        payload = params.get("payload") or {}
        name, identifier = params.get("event_name"), params.get("identifier") or _id("mev")
        customer = self.customers.get(payload.get("stripe_customer_id", ""))
        if not name or customer is None or customer["livemode"] != livemode:
            return _error(400, "invalid_request_error", None, "No such customer or missing event_name.")
        value = payload.get("value", "")
        now = int(time.time())
        timestamp = int(params.get("timestamp") or now)
        if not value.lstrip("-").isdigit() or not now - 35 * 86400 <= timestamp <= now + 300:
            return _error(400, "invalid_request_error", None, "Invalid value or timestamp.")
        if identifier in self.meter_events:
            self.meter_duplicates.append(identifier)
            return _error(400, "invalid_request_error", None,
                          f"An event already exists with identifier {identifier}.")
        event = {"object": "billing.meter_event", "created": now, "event_name": name, "identifier": identifier,
                 "livemode": livemode, "payload": dict(payload), "timestamp": timestamp}
        self.meter_events[identifier] = event
        if self.meter_delay_s:
            await asyncio.sleep(self.meter_delay_s)
        return _ok(event)

    def _payment_intent(self, params: dict[str, Any], livemode: bool) -> web.Response:
        customer = self.customers.get(params.get("customer", ""))
        if customer is None:
            return _missing("customer")
        method = params.get("payment_method") or customer["invoice_settings"]["default_payment_method"]
        pi: dict[str, Any] = {
            "id": _id("pi"), "object": "payment_intent", "livemode": livemode, "amount": int(params["amount"]),
            "currency": params["currency"], "customer": customer["id"], "metadata": params.get("metadata", {}),
            "payment_method": method, "status": "requires_payment_method", "last_payment_error": None}
        self.payment_intents[pi["id"]] = pi
        if method is None:
            pi["last_payment_error"] = {"type": "invalid_request_error", "code": "payment_method_missing"}
            return _error(400, "invalid_request_error", "parameter_missing",
                          "You must provide a payment method.", payment_intent=pi)
        if method == "pm_card_chargeDeclined":
            error = {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
                     "message": "Your card was declined."}
            pi["last_payment_error"] = error
            return _error(402, "card_error", "card_declined", error["message"], decline_code="generic_decline",
                          payment_intent=pi)
        if method == "pm_card_authenticationRequired":
            pi["status"] = "requires_action"
            message = "Your card requires authentication."
            pi["last_payment_error"] = {"type": "card_error", "code": "authentication_required", "message": message}
            return _error(402, "card_error", "authentication_required", message,
                          decline_code="authentication_required", payment_intent=pi)
        pi["status"] = "succeeded"
        return _ok(pi)


def _ok(obj: dict[str, Any]) -> web.Response:
    return web.json_response(obj, headers={"Request-Id": _id("req")})


def _missing(kind: str) -> web.Response:
    return _error(404, "invalid_request_error", "resource_missing", f"No such {kind}.")


def _error(status: int, type_: str, code: str | None, message: str, *, decline_code: str | None = None,
           payment_intent: dict[str, Any] | None = None) -> web.Response:
    error: dict[str, Any] = {"type": type_, "code": code, "message": message}
    if decline_code:
        error["decline_code"] = decline_code
    if payment_intent is not None:
        error["payment_intent"] = payment_intent
    return web.json_response({"error": error}, status=status, headers={"Request-Id": _id("req")})


@asynccontextmanager
async def running_fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()
