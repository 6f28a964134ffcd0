"""Admin API: margin reports and the operator dashboard's signed links.

* ``GET /admin/v1/reports/margin?group_by=&from=&to=&format=`` — revenue, provider cost and margin per
  customer, feature, model, or UTC day / ISO week / month, over ``from <= created_at < to``, as JSON
  (default) or CSV (:mod:`metergate.reports.margin` documents units and the unknown-cost rule).
  ``from`` and ``to`` are ISO 8601 dates or times (UTC unless an offset is given) or epoch milliseconds;
  the default range is the last 30 days up to now.
* ``POST /admin/v1/dashboard-link`` — a short-lived signed link that opens ``/admin/dashboard`` in a
  browser (:mod:`metergate.reports.dashboard`).

Like every admin endpoint, both are scoped to the mode of the admin key that calls them.
"""

from __future__ import annotations

import datetime as dt
import secrets

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.config.settings import Settings
from metergate.errors import BadRequest
from metergate.http import json_response
from metergate.portal.links import LinkSigner
from metergate.reports.dashboard import PATH, DashboardViews
from metergate.reports.margin import GROUPINGS, Grouping, margin_report, report_csv, report_json, valuations_for
from metergate.wallet.assets import AssetRegistry
from metergate.wallet.models import now_ms
from metergate.wallet.store import WalletStore

_DEFAULT_RANGE_MS = 30 * 86_400_000
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ReportsApi:
    def __init__(self, settings: Settings, store: WalletStore, admin: AdminApi) -> None:
        self._store = store
        self._admin = admin
        self._configured = settings.assets
        self._assets = AssetRegistry(store.system_of_record, settings.assets)
        # One set of secrets for both signers, so that a per-process key (no portal_secrets) still lets the
        # link open a session; each signer derives its own key from it (metergate.portal.links).
        keys = {kid: s.get_secret_value() for kid, s in settings.portal_secrets.items()} or {
            "ephemeral": secrets.token_urlsafe(32)}
        links = LinkSigner(keys, ttl_s=settings.dashboard_link_ttl_s, base_url="", scope="dashboard-link")
        sessions = LinkSigner(keys, ttl_s=settings.dashboard_session_ttl_s, base_url="", scope="dashboard-session")
        self._links = links
        self.dashboard = DashboardViews(settings, store, links, sessions)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/reports/margin", self.margin),
            web.post(f"{PREFIX}/dashboard-link", self.dashboard_link),
            *self.dashboard.routes(),
        ]

    async def margin(self, request: web.Request) -> web.StreamResponse:
        mode = self._admin.authenticate(request)
        query = request.query
        group_by = _grouping(query.get("group_by", "customer"))
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("'format' must be json or csv.", param="format")
        to_ms = parse_time(query["to"], "to") if "to" in query else now_ms()
        from_ms = parse_time(query["from"], "from") if "from" in query else to_ms - _DEFAULT_RANGE_MS
        if from_ms >= to_ms:
            raise BadRequest("'from' must be before 'to'.", param="from")
        values = await valuations_for(mode, self._configured, self._assets)
        report = await margin_report(self._store, mode, group_by, from_ms=from_ms, to_ms=to_ms, scales=values)
        if fmt == "json":
            return json_response(report_json(report))
        name = f"metergate-margin-{mode}-{group_by}-{from_ms}-{to_ms}.csv"
        return web.Response(text=report_csv(report), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}"',
                                     "Cache-Control": "no-store"})

    async def dashboard_link(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        path = f"{PATH}?{self.dashboard.link_query(mode)}"
        # The link points where this request came in: the operator reached the admin API there. Behind a
        # proxy that changes the scheme or host, build the URL from ``path`` instead.
        return json_response({"url": f"{request.url.origin()}{path}", "path": path, "mode": mode,
                              "expires_in_s": self._links.ttl_s}, status=201)


def _grouping(text: str) -> Grouping:
    for grouping in GROUPINGS:
        if text == grouping:
            return grouping  # type: ignore[return-value]
    raise BadRequest(f"'group_by' must be one of {', '.join(GROUPINGS)}.", param="group_by")


def parse_time(text: str, param: str) -> int:
    """Epoch milliseconds from digits, or from an ISO 8601 date or date-time (UTC when no offset is given)."""
    try:
        if text.isascii() and text.isdigit():
            value = int(text)
        else:
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
            value = (moment - _EPOCH) // dt.timedelta(milliseconds=1)  # exact: no float on the way
    except (ValueError, OverflowError):
        raise BadRequest(f"'{param}' must be an ISO 8601 date or time (2026-01-31, 2026-01-31T12:00:00Z) or "
                         "epoch milliseconds.", param=param) from None
    if not 0 <= value <= _MAX_MS:
        raise BadRequest(f"'{param}' is out of range.", param=param)
    return value
