"""Incoming Stripe webhooks at ``/webhooks/stripe/{mode}``, one endpoint (and one signing secret) per mode.

Before anything changes, the raw body's ``Stripe-Signature`` is verified with the mode's own secret and a
300-second timestamp tolerance, and the event's ``livemode`` must match the endpoint's mode. Refusals are
400s with a JSON code and change nothing: ``invalid_signature`` (forged, or signed with another mode's
secret), ``stale_signature``, ``wrong_mode``, ``invalid_payload``. A verified event is applied by
:meth:`TopUps.handle_event`, idempotently (see :mod:`metergate.payments.topups`): Stripe may deliver an
event several times, concurrently and out of order. A storage failure answers 500 so that Stripe retries.
"""

from __future__ import annotations

import json
from typing import Any

import stripe
from aiohttp import web

from metergate.config.settings import Settings
from metergate.errors import BadRequest, NotFound
from metergate.http import json_response, read_body
from metergate.payments.stripe_api import PaymentsUnavailable
from metergate.payments.topups import TopUps
from metergate.wallet.models import Mode

TOLERANCE_S = 300


class StripeWebhooks:
    def __init__(self, settings: Settings, topups: TopUps) -> None:
        self._topups = topups
        self._max_body_bytes = settings.webhook_max_body_bytes
        self._secrets: dict[str, str] = {}
        for mode in ("test", "live"):
            secret = getattr(settings, f"stripe_{mode}_webhook_secret")
            if secret is not None:
                self._secrets[mode] = secret.get_secret_value()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/webhooks/stripe/{mode}", self.receive)]

    def verify(self, mode: str, payload: bytes, header: str | None) -> dict[str, Any]:
        """The verified event, or a 400 naming why it was refused."""
        if mode not in ("test", "live"):
            raise NotFound("No such webhook endpoint.", code="not_found")
        secret = self._secrets.get(mode)
        if secret is None:
            raise PaymentsUnavailable(f"No webhook secret is configured for {mode} mode.")
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=TOLERANCE_S)
        except stripe.SignatureVerificationError:
            try:
                stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=None)
            except stripe.SignatureVerificationError:
                raise BadRequest("The Stripe-Signature does not match this endpoint's secret.",
                                 code="invalid_signature") from None
            raise BadRequest(f"The Stripe-Signature timestamp is more than {TOLERANCE_S} s old.",
                             code="stale_signature") from None
        try:
            event = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("The event is not valid JSON.", code="invalid_payload") from None
        if not isinstance(event, dict) or event.get("object") != "event" or not isinstance(event.get("data"), dict):
            raise BadRequest("The body is not a Stripe event.", code="invalid_payload")
        if event.get("livemode") is not (mode == "live"):
            raise BadRequest(f"This event is not a {mode}-mode event.", code="wrong_mode")
        return event

    async def receive(self, request: web.Request) -> web.Response:
        mode = request.match_info["mode"]
        if mode not in ("test", "live"):
            raise NotFound("No such webhook endpoint.", code="not_found")
        # The sender is not authenticated until the signature is checked: read only a small body.
        payload = await read_body(request, self._max_body_bytes)
        event = self.verify(mode, payload, request.headers.get("Stripe-Signature"))
        mode_: Mode = "live" if mode == "live" else "test"
        result = await self._topups.handle_event(mode_, event)
        return json_response({"received": True, "event": event.get("id"), "result": result})
