"""Admin API: holds for any workload — GPU jobs, batch jobs, agent tools (:mod:`metergate.wallet.holds`).

* ``POST /admin/v1/holds`` ``{"customer_id", "asset"?, "amount"|"amount_decimal", "ttl_s", "hold_id"?}`` — hold
  funds before work starts (402 ``insufficient_funds`` when the wallet cannot cover it);
* ``GET /admin/v1/holds/{id}`` — the hold and the grants it draws;
* ``POST /admin/v1/holds/{id}/extend`` ``{"amount"|"amount_decimal", "ttl_s"?}``;
* ``POST /admin/v1/holds/{id}/capture`` ``{"amount"|"amount_decimal", "final"?}`` — capture that much more;
  ``final: true`` resolves the hold and releases the rest;
* ``POST /admin/v1/holds/{id}/void`` — release it all (what partial captures took stays captured);
* ``POST /admin/v1/holds/{id}/heartbeat`` ``{"used"|"used_decimal", "next"|"next_decimal", "ttl_s"?,
  "partial"?}`` — capture the cumulative usage so far and hold up to ``next`` for the next interval; the answer's
  ``action`` is ``continue`` (with ``allowance``, what the job may use before its next heartbeat) or ``stop``.

Every call is idempotent under its ``Idempotency-Key`` header (or ``idempotency_key`` in the body; a create may
instead name its ``hold_id``): a replay answers exactly as the first call did and changes nothing; the same
key with different content is 409 ``idempotency_conflict``. The mode is the admin key's.

When the wallet runs out, the answer carries the customer's ``portal_url`` as the proxy's 402 does (a signed link
to top up, for the job runner to show its user): a 402 ``insufficient_funds`` of a create or an extend also says
``asset``, ``balance`` and ``required``; a heartbeat answered ``stop`` for ``insufficient_funds`` has the link
beside its ``action``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.admin.wallets import amount_of, int_field, key_of, only
from metergate.config.settings import Settings
from metergate.errors import BadRequest
from metergate.http import json_response
from metergate.portal.links import LinkSigner
from metergate.proxy.identify import valid_customer_id
from metergate.wallet.assets import AssetRegistry
from metergate.wallet.errors import HoldNotFound, InsufficientFunds
from metergate.wallet.holds import HoldService, new_hold_id
from metergate.wallet.models import Mode
from metergate.wallet.sql import SqlWalletStore

MAX_TTL_S = 7 * 86_400
DEFAULT_TTL_S = 300


class HoldsApi:
    def __init__(self, settings: Settings, store: SqlWalletStore, admin: AdminApi, signer: LinkSigner) -> None:
        self._settings = settings
        self._admin = admin
        self._signer = signer
        self._assets = AssetRegistry(store, settings.assets)
        self.service = HoldService(store)

    def routes(self) -> list[web.RouteDef]:
        h = f"{PREFIX}/holds/{{hold_id}}"
        return [
            web.post(f"{PREFIX}/holds", self.create),
            web.get(h, self.get),
            web.post(f"{h}/extend", self.extend),
            web.post(f"{h}/capture", self.capture),
            web.post(f"{h}/void", self.void),
            web.post(f"{h}/heartbeat", self.heartbeat),
        ]

    @staticmethod
    def _ttl_ms(body: dict[str, Any]) -> int:
        ttl = int_field(body, "ttl_s", low=1, high=MAX_TTL_S, default=DEFAULT_TTL_S)
        assert ttl is not None
        return ttl * 1000

    async def _hold(self, request: web.Request, *fields: str) -> tuple[Mode, str, dict[str, Any], Any]:
        """The mode, hold id, JSON body (naming only ``fields``) and the hold's asset, for the calls on an
        existing hold."""
        mode = self._admin.authenticate(request)
        hold_id = request.match_info["hold_id"]
        found = (await self.service.get(mode, hold_id))["hold"]  # 404 first: the path names the object
        body = only(await self._admin.read_json(request), *fields, "idempotency_key")
        return mode, hold_id, body, await self._assets.require(mode, found["asset"])

    async def create(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = only(await self._admin.read_json(request), "customer_id", "asset", "amount", "amount_decimal", "ttl_s",
                    "hold_id", "idempotency_key")
        customer_id = body.get("customer_id")
        if not isinstance(customer_id, str) or not valid_customer_id(customer_id):
            raise BadRequest("'customer_id' is required: a customer id.", code="invalid_customer", param="customer_id")
        asset = await self._assets.require(mode, body.get("asset", self._settings.pricing.asset))
        amount = amount_of(body, asset)
        hold_id = body.get("hold_id")
        key = body.get("idempotency_key") or request.headers.get("Idempotency-Key")
        if hold_id is not None and (not isinstance(hold_id, str) or not valid_customer_id(hold_id)
                                    or len(hold_id) > 64):
            raise BadRequest("'hold_id' must be 1-64 characters: letters, digits, '.', '_', ':', '@', '-'.",
                             param="hold_id")
        if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 128):
            raise BadRequest("'idempotency_key' must be 1-128 characters.", param="idempotency_key")
        if hold_id is None and key is None:
            raise BadRequest("Give an Idempotency-Key header (or 'idempotency_key'), or name the 'hold_id'.",
                             param="idempotency_key")
        hold_id = hold_id or new_hold_id(mode, key)
        try:
            answer = await self.service.create(mode, hold_id=hold_id, key=key or "create", customer_id=customer_id,
                                               asset=asset.code, amount=amount, ttl_ms=self._ttl_ms(body))
        except InsufficientFunds as short:
            raise self._top_up(short, mode, customer_id) from None
        return json_response(answer, status=201)

    def _top_up(self, short: InsufficientFunds, mode: Mode, customer_id: str) -> InsufficientFunds:
        """The refusal with what the proxy's 402 says beside it: how short, and where the customer tops up."""
        short.extra.update(asset=short.asset, balance=short.available, required=short.required,
                           portal_url=self._signer.url(mode, customer_id))
        return short

    async def get(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        return json_response(await self.service.get(mode, request.match_info["hold_id"]))

    async def extend(self, request: web.Request) -> web.Response:
        mode, hold_id, body, asset = await self._hold(request, "amount", "amount_decimal", "ttl_s")
        try:
            answer = await self.service.extend(mode, hold_id, key=key_of(request, body),
                                               amount=amount_of(body, asset), ttl_ms=self._ttl_ms(body))
        except InsufficientFunds as short:
            held = await self.service.get(mode, hold_id)
            raise self._top_up(short, mode, held["hold"]["customer_id"]) from None
        return json_response(answer)

    async def capture(self, request: web.Request) -> web.Response:
        mode, hold_id, body, asset = await self._hold(request, "amount", "amount_decimal", "final")
        final = body.get("final", False)
        if not isinstance(final, bool):
            raise BadRequest("'final' must be true or false.", param="final")
        answer = await self.service.capture(mode, hold_id, key=key_of(request, body),
                                            amount=amount_of(body, asset, allow_zero=True), final=final)
        return json_response(answer)

    async def void(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        await self.service.get(mode, request.match_info["hold_id"])  # 404 first: the path names the object
        body = await self._admin.read_json(request) if request.can_read_body else {}
        only(body, "idempotency_key")
        key = body.get("idempotency_key") or request.headers.get("Idempotency-Key") or "void"
        if not isinstance(key, str) or len(key) > 128:
            raise BadRequest("'idempotency_key' must be 1-128 characters.", param="idempotency_key")
        return json_response(await self.service.void(mode, request.match_info["hold_id"], key=key))

    async def heartbeat(self, request: web.Request) -> web.Response:
        mode, hold_id, body, asset = await self._hold(request, "used", "used_decimal", "next", "next_decimal", "ttl_s",
                                                      "partial")
        partial = body.get("partial", True)
        if not isinstance(partial, bool):
            raise BadRequest("'partial' must be true or false.", param="partial")
        answer = await self.service.heartbeat(
            mode, hold_id, key=key_of(request, body), used=amount_of(body, asset, name="used", allow_zero=True),
            next_amount=amount_of(body, asset, name="next", allow_zero=True), ttl_ms=self._ttl_ms(body),
            partial=partial)
        if answer.get("reason") == "insufficient_funds":
            answer = {**answer, "portal_url": self._signer.url(mode, answer["hold"]["customer_id"])}
        return json_response(answer)


__all__ = ["HoldNotFound", "HoldsApi"]
