"""Admin API for the webhook outbox, scoped by the admin key's mode like every admin endpoint:

* ``GET /admin/v1/webhooks?status=&limit=&cursor=`` — notifications, newest first, with their delivery
  state (``pending``, ``delivered``, ``failed``, ``skipped``), paginated by ``next_cursor``;
* ``GET /admin/v1/webhooks/{id}`` — one notification;
* ``POST /admin/v1/webhooks/{id}/redeliver`` — send it again now (same ``webhook-id``, same body), with a
  fresh set of attempts;
* ``GET /admin/v1/webhooks/follow?after=&wait_s=`` — what ``metergate webhooks listen`` reads: the
  notifications after the cursor ``after`` (none given: after the newest one), oldest first, each with
  the body and the signed headers to forward; waits up to ``wait_s`` (at most 30) for one to appear.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.errors import BadRequest, NotFound
from metergate.http import json_response
from metergate.webhooks.delivery import WebhookDelivery
from metergate.webhooks.outbox import STATUSES, WebhookOutbox, parse_cursor

FOLLOW_WAIT_MAX_S = 30.0
_FOLLOW_POLL_S = 0.2  # how often a waiting follow request looks at the outbox
_FOLLOW_PAGE = 100


class WebhooksAdminApi:
    def __init__(self, admin: AdminApi, outbox: WebhookOutbox, delivery: WebhookDelivery) -> None:
        self._admin = admin
        self._outbox = outbox
        self._delivery = delivery

    def routes(self) -> list[web.RouteDef]:
        base = f"{PREFIX}/webhooks"
        # follow before {webhook_id}: "follow" is no notification's id.
        return [web.get(base, self.list_webhooks), web.get(f"{base}/follow", self.follow),
                web.get(f"{base}/{{webhook_id}}", self.get),
                web.post(f"{base}/{{webhook_id}}/redeliver", self.redeliver)]

    @staticmethod
    def _cursor(request: web.Request, name: str) -> tuple[int, str] | None:
        if name not in request.query:
            return None
        try:
            return parse_cursor(request.query[name])
        except ValueError:
            raise BadRequest(f"'{name}' must be a next_cursor value from a previous answer.",
                             code="invalid_request", param=name) from None

    async def list_webhooks(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        limit = AdminApi._limit(request)
        status = request.query.get("status")
        if status is not None and status not in STATUSES:
            raise BadRequest(f"'status' must be one of {', '.join(STATUSES)}.", code="invalid_request",
                             param="status")
        rows = await self._outbox.page(mode, status=status, limit=limit,
                                       before=self._cursor(request, "cursor"))
        return json_response({"data": [r.as_json() for r in rows],
                              "next_cursor": rows[-1].cursor if len(rows) == limit else None})

    async def get(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        found = await self._outbox.get(mode, request.match_info["webhook_id"])
        if found is None:
            raise NotFound("No such notification in this mode.", code="webhook_not_found")
        return json_response(found.as_json())

    async def redeliver(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        found = await self._outbox.redeliver(mode, request.match_info["webhook_id"],
                                             deliver=self._delivery.enabled)
        if found is None:
            raise NotFound("No such notification in this mode.", code="webhook_not_found")
        return json_response(found.as_json())

    async def follow(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        try:
            wait_s = float(request.query.get("wait_s", "0"))
        except ValueError:
            wait_s = -1
        if not 0 <= wait_s <= FOLLOW_WAIT_MAX_S:
            raise BadRequest(f"'wait_s' must be between 0 and {FOLLOW_WAIT_MAX_S:g}.", code="invalid_request",
                             param="wait_s")
        cursor = self._cursor(request, "after") or await self._outbox.tail(mode)
        deadline = time.monotonic() + wait_s
        while True:
            rows = await self._outbox.after(mode, cursor, limit=_FOLLOW_PAGE)
            if rows or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_FOLLOW_POLL_S)
        data: list[dict[str, Any]] = [{"id": r.id, "type": r.type, "body": r.payload,
                                       "headers": self._delivery.headers(r)} for r in rows]
        return json_response({"data": data, "next_cursor": rows[-1].cursor if rows else f"{cursor[0]}:{cursor[1]}"})

