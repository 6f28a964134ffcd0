"""The billing page a customer reaches from a 402: balances and recent usage, refreshed live.

Plain server-rendered HTML with a few lines of JavaScript that poll a JSON summary through the same
signed link; no front-end build step. Everything shown is scoped by the verified link to one customer
in one mode, and every value is HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from metergate.config.settings import Settings
from metergate.errors import Forbidden
from metergate.http import json_response
from metergate.money import format_minor
from metergate.portal.links import LinkSigner, PortalGrant
from metergate.wallet.models import Balance
from metergate.wallet.store import WalletStore

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'self'; base-uri 'none'; form-action 'self'")

#: Polls the page's JSON summary (through the same signed link, ``q``) and swaps in fresh balances and usage;
#: shared by this page and the self-service portal.
LIVE_REFRESH_JS = """async function refresh() {
  try {
    const r = await fetch("summary" + q, {cache: "no-store"});
    if (!r.ok) return;
    const s = await r.json();
    document.getElementById("balances").innerHTML = s.balances_html;
    document.getElementById("usage").innerHTML = s.usage_html;
  } catch (e) {}
}
setInterval(refresh, 2000);"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Billing · {customer}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2433; }}
 header {{ background: #1d2433; color: #fff; padding: 1rem 2rem; }}
 main {{ max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
 .cards {{ display: flex; gap: 1rem; flex-wrap: wrap; }}
 .card {{ background: #fff; border-radius: .5rem; padding: 1rem 1.5rem; box-shadow: 0 1px 3px #0002;
         min-width: 14rem; }}
 .amount {{ font-size: 2rem; font-weight: 600; }}
 table {{ width: 100%; border-collapse: collapse; background: #fff; margin-top: 1rem; }}
 th, td {{ text-align: left; padding: .5rem .75rem; border-bottom: 1px solid #e3e6ea;
          font-variant-numeric: tabular-nums; }}
 .mode {{ display: inline-block; padding: .1rem .5rem; border-radius: 1rem; background: #ffd54a; color: #000;
          font-size: .8rem; }}
</style></head>
<body><header><h1>Billing for {customer} {mode_badge}</h1></header>
<main>
<section aria-labelledby="bal"><h2 id="bal">Balance</h2><div class="cards" id="balances">{balances}</div></section>
<section aria-labelledby="use"><h2 id="use">Recent usage</h2>
<table aria-describedby="use"><thead><tr><th scope="col">Time (UTC)</th><th scope="col">Model</th>
<th scope="col">Tokens in / out</th><th scope="col">Charged</th></tr></thead><tbody id="usage">{usage}</tbody></table>
<p><small>Updates live. Link valid until <time>{expires}</time>.</small></p></section>
</main>
<script>
const q = window.location.search;
{refresh_js}
</script>
</body></html>
"""



def balance_card(balance: Balance, name: str, scale: int) -> str:
    """One asset's balance card. A prepaid wallet shows what it can spend. A wallet with a credit line (an
    invoiced customer) shows its own money — negative: owed on the next invoice — and the credit beside it,
    never the credit line as if it were a balance."""
    esc = html.escape
    if balance.overdraft_limit <= 0:
        amount, note = balance.available, f"{esc(balance.asset)} available"
    else:
        amount = balance.available - balance.overdraft_limit
        owed = "owed, invoiced" if amount < 0 else f"{esc(balance.asset)} balance"
        note = (f"{owed} · credit limit {esc(format_minor(balance.overdraft_limit, scale))}, "
                f"{esc(format_minor(balance.available, scale))} left")
    return (f'<div class="card"><div>{esc(name)}</div><div class="amount" data-asset="{esc(balance.asset)}">'
            f"{esc(format_minor(amount, scale))}</div><div><small>{note}</small></div></div>")

class PortalViews:
    def __init__(self, settings: Settings, store: WalletStore, signer: LinkSigner) -> None:
        self._store = store
        self._signer = signer
        self._scales = {a.code: a.scale for a in settings.assets}
        self._names = {a.code: a.name or a.code for a in settings.assets}
        # The self-service page (metergate/portal/selfserve.py) when payments are on: same link, fuller page.
        self.page_override: Callable[[web.Request, PortalGrant], Awaitable[web.StreamResponse]] | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/portal/", self.page), web.get("/portal/summary", self.summary)]

    def _grant(self, request: web.Request) -> PortalGrant:
        return self._signer.verify(dict(request.query))

    async def _fragments(self, grant: PortalGrant) -> dict[str, Any]:
        if await self._store.get_customer(grant.mode, grant.customer_id) is None:
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        balances = await self._store.balances(grant.mode, grant.customer_id)
        rows = await self._store.usage(grant.mode, grant.customer_id, limit=20)
        esc = html.escape
        cards = "".join(balance_card(b, self._names.get(b.asset, b.asset), self._scales.get(b.asset, 0))
                        for b in balances) or '<div class="card">No balance yet.</div>'
        lines = "".join(
            f"<tr><td>{_utc(u.created_at_ms)}</td><td>{esc(u.model)}</td>"
            f"<td>{u.tokens_input} / {u.tokens_output}</td>"
            f"<td>{esc(format_minor(u.charged_amount, self._scales.get(u.asset, 0)))} {esc(u.asset)}</td></tr>"
            for _, u in rows) or '<tr><td colspan="4">No usage yet.</td></tr>'
        return {"balances_html": cards, "usage_html": lines,
                "balances": [{"asset": b.asset, "available": b.available,
                              "balance": b.available - b.overdraft_limit, "credit_limit": b.overdraft_limit}
                             for b in balances],
                "usage_count": len(rows)}

    async def page(self, request: web.Request) -> web.StreamResponse:
        grant = self._grant(request)
        if self.page_override is not None:
            return await self.page_override(request, grant)
        fragments = await self._fragments(grant)
        badge = '<span class="mode">test mode</span>' if grant.mode == "test" else ""
        body = _PAGE.format(refresh_js=LIVE_REFRESH_JS, customer=html.escape(grant.customer_id), mode_badge=badge,
                            balances=fragments["balances_html"], usage=fragments["usage_html"],
                            expires=_utc(grant.expires_at * 1000))
        return web.Response(text=body, content_type="text/html", headers=_headers())

    async def summary(self, request: web.Request) -> web.Response:
        grant = self._grant(request)
        response = json_response(await self._fragments(grant))
        response.headers.update(_headers())
        return response


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": _CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"}


def _utc(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
