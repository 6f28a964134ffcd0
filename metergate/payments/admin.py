"""Admin API for payments, scoped by the admin key's mode like every admin endpoint:

* ``GET``, ``PUT``, ``DELETE /admin/v1/customers/{id}/auto-top-up`` ``{"asset", "threshold", "amount"}`` —
  when the available balance falls below ``threshold``, charge the saved card ``amount`` (smallest unit;
  whole cents within ``topup_min`` .. ``topup_max``);
* ``GET``, ``PUT /admin/v1/customers/{id}/spend-caps`` ``{"asset", "daily", "monthly"}`` (``null``: no cap);
* ``GET /admin/v1/customers/{id}/top-ups`` — recent top-up attempts and their outcomes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.errors import BadRequest
from metergate.http import json_response
from metergate.payments.spendcaps import validate_caps
from metergate.payments.store import AutoTopUpSetting, PaymentsStore
from metergate.payments.topups import TopUps
from metergate.wallet.errors import UnknownAsset
from metergate.wallet.models import Mode


def validate_auto_topup(topups: TopUps, mode: Mode, customer_id: str, asset: str, threshold: object,
                        amount: object) -> AutoTopUpSetting:
    """The setting, or a 400 naming the field: shared by the admin API and the portal form."""
    if asset != topups.asset:
        raise BadRequest(f"Auto top-up is available for {topups.asset} only.", code="invalid_request", param="asset")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 < threshold <= 10**15:
        raise BadRequest("'threshold' must be a positive integer in the asset's smallest unit.",
                         code="invalid_amount", param="threshold")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise BadRequest("'amount' must be a positive integer in the asset's smallest unit.",
                         code="invalid_amount", param="amount")
    cents = topups.minor_to_cents(amount)
    if topups.cents_to_minor(cents) != amount:
        raise BadRequest("'amount' must be a whole number of cents.", code="invalid_amount", param="amount")
    topups.parse_topup(f"{cents / 100:.2f}")  # within the operator's limits
    return AutoTopUpSetting(mode, customer_id, asset, threshold, amount)


class PaymentsAdminApi:
    def __init__(self, admin: AdminApi, store: PaymentsStore, topups: TopUps) -> None:
        self._admin = admin
        self._store = store
        self._topups = topups

    def routes(self) -> list[web.RouteDef]:
        auto, caps = f"{PREFIX}/customers/{{customer_id}}/auto-top-up", f"{PREFIX}/customers/{{customer_id}}/spend-caps"
        return [web.get(auto, self.get_auto), web.put(auto, self.put_auto), web.delete(auto, self.delete_auto),
                web.get(caps, self.get_caps), web.put(caps, self.put_caps),
                web.get(f"{PREFIX}/customers/{{customer_id}}/top-ups", self.list_topups)]

    async def _customer(self, request: web.Request) -> tuple[Mode, str]:
        return await self._admin.customer(request)

    def _asset(self, value: Any) -> str:
        asset = self._topups.asset if value is None else value
        if asset != self._topups.asset:
            raise UnknownAsset(str(asset))
        return str(asset)

    async def get_auto(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        setting = await self._store.auto_topup(mode, customer_id, self._asset(request.query.get("asset")))
        return json_response({"customer_id": customer_id, "auto_top_up": asdict(setting) if setting else None})

    async def put_auto(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = await self._admin.read_json(request)
        asset = self._asset(body.get("asset"))
        setting = validate_auto_topup(self._topups, mode, customer_id, asset, body.get("threshold"),
                                      body.get("amount"))
        await self._store.set_auto_topup(setting, mode=mode, customer_id=customer_id, asset=asset)
        stored = await self._store.auto_topup(mode, customer_id, asset)
        return json_response({"customer_id": customer_id, "auto_top_up": asdict(stored) if stored else None})

    async def delete_auto(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        asset = self._asset(request.query.get("asset"))
        await self._store.set_auto_topup(None, mode=mode, customer_id=customer_id, asset=asset)
        return json_response({"customer_id": customer_id, "auto_top_up": None})

    async def get_caps(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        caps = await self._store.spend_caps(mode, customer_id, self._asset(request.query.get("asset")))
        return json_response({"customer_id": customer_id, "spend_caps": asdict(caps) if caps else None})

    async def put_caps(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = await self._admin.read_json(request)
        caps = validate_caps(mode, customer_id, self._asset(body.get("asset")), body.get("daily"),
                             body.get("monthly"))
        await self._store.set_spend_caps(caps)
        stored = await self._store.spend_caps(mode, customer_id, caps.asset)
        return json_response({"customer_id": customer_id, "spend_caps": asdict(stored) if stored else None})

    async def list_topups(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        return json_response({"data": [asdict(t) for t in await self._store.topups(mode, customer_id, limit=50)]})
