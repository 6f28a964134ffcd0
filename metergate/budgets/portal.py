"""The portal's budget page: the customer's tree with each node's limits, their use in the current window and
what remains, and the alert thresholds that fired (active ones first, with when they recovered), reached with
the same signed link as the billing page (``/portal/budgets?<the link's query>``).

Server-rendered HTML, every value escaped, the billing page's security headers; read-only (limits are set by
the operator through the admin API). Use is the quota claimed in the window (what admission counts).
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping

from aiohttp import web

from metergate.budgets.model import ROOT, FiredAlert, Node, Tree
from metergate.errors import Forbidden
from metergate.portal.links import LinkSigner
from metergate.wallet.models import now_ms
from metergate.wallet.store import WalletStore

_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Budgets · {customer}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2433; }}
 header {{ background: #1d2433; color: #fff; padding: 1rem 2rem; }}
 main {{ max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
 table {{ width: 100%; border-collapse: collapse; background: #fff; }}
 th, td {{ text-align: left; padding: .5rem .75rem; border-bottom: 1px solid #e3e6ea;
          font-variant-numeric: tabular-nums; vertical-align: top; }}
 .bar {{ background: #e3e6ea; border-radius: .25rem; height: .5rem; width: 8rem; }}
 .bar span {{ display: block; background: #3b6ef5; height: .5rem; border-radius: .25rem; }}
 section + section {{ margin-top: 2rem; }}
 .active {{ color: #b42318; font-weight: 600; }} .recovered {{ color: #067647; }}
</style></head>
<body><header><h1>Budgets for {customer}</h1></header>
<main><section aria-labelledby="tree"><h2 id="tree">Budget tree</h2>
<table aria-describedby="tree"><thead><tr><th scope="col">Node</th><th scope="col">Kind</th>
<th scope="col">Limit</th><th scope="col">Used</th><th scope="col">Remaining</th></tr></thead>
<tbody>{rows}</tbody></table></section>
<section aria-labelledby="alerts"><h2 id="alerts">Alerts</h2>
<table aria-describedby="alerts"><thead><tr><th scope="col">State</th><th scope="col">Alert</th>
<th scope="col">On</th><th scope="col">Threshold</th><th scope="col">Fired</th><th scope="col">Recovered</th>
</tr></thead><tbody>{alerts}</tbody></table></section></main></body></html>
"""


ALERTS_SHOWN = 20


class BudgetPortal:
    def __init__(self, store: WalletStore, signer: LinkSigner, scales: Mapping[str, int]) -> None:
        self._store = store
        self._signer = signer
        self._scales = scales  # the configured assets' scales, to show amounts in their major unit

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/portal/budgets", self.page)]

    async def page(self, request: web.Request) -> web.Response:
        grant = self._signer.verify(dict(request.query))
        if await self._store.get_customer(grant.mode, grant.customer_id) is None:
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        tree = await self._store.budget_tree(grant.mode, grant.customer_id)
        use = await self._store.budget_use(grant.mode, grant.customer_id, at_ms=now_ms()) if tree.limits else {}
        rows = "".join(_rows(tree, node, use) for node in tree.subtree(ROOT)) or (
            '<tr><td colspan="5">No budget nodes.</td></tr>')
        fired = await self._store.fired_budget_alerts(grant.mode, grant.customer_id, limit=ALERTS_SHOWN)
        alerts = "".join(_alert_row(tree, alert, self._scales) for alert in fired) or (
            '<tr><td colspan="6">No alert has fired.</td></tr>')
        body = _PAGE.format(customer=html.escape(grant.customer_id), rows=rows, alerts=alerts)
        return web.Response(text=body, content_type="text/html", headers={
            "Content-Security-Policy": _CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"})


def _rows(tree: Tree, node: Node, use: dict[str, int]) -> str:
    esc = html.escape
    depth = len(tree.path(node.id)) - 1
    label = (f'<span style="padding-left:{depth * 1.5}rem">{esc(node.name or node.id)}</span> '
             f"<small>{esc(node.id)}</small>")
    limits = tree.limits.get(node.id, ())
    if not limits:
        return f"<tr><td>{label}</td><td>{esc(node.kind)}</td><td>none</td><td></td><td></td></tr>"
    out = []
    for i, limit in enumerate(limits):
        used = use.get(limit.id, 0)
        share = min(100, used * 100 // limit.amount)
        first = f"<td>{label}</td><td>{esc(node.kind)}</td>" if i == 0 else "<td></td><td></td>"
        out.append(f"<tr>{first}<td>{esc(limit.describe())}</td><td>{used} "
                   f'<div class="bar" role="img" aria-label="{share}% used"><span style="width:{share}%"></span>'
                   f"</div></td><td>{max(0, limit.amount - used)}</td></tr>")
    return "".join(out)


def target_text(tree: Tree, target: str) -> str:
    """What an alert rule watches, in words: a limit by its node and window, or a balance by its asset."""
    kind, _, name = target.partition(":")
    if kind == "balance":
        return f"{name} balance"
    limit = tree.limit(name)
    if limit is None:
        return f"limit {name} (deleted)"
    node = tree.nodes.get(limit.node_id)
    return f"{node.name or node.id if node else limit.node_id}: {limit.describe()}"


def when(ms: int | None) -> str:
    return "" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _alert_row(tree: Tree, alert: FiredAlert, scales: Mapping[str, int]) -> str:
    esc = html.escape
    limit = tree.limit(alert.target.partition(":")[2]) if alert.target.startswith("limit:") else None
    asset = limit.asset if limit is not None and limit.dimension == "spend" else None
    if alert.target.startswith("balance:"):
        asset = alert.target.partition(":")[2]
    threshold = alert.describe_threshold(asset=asset, scale=scales.get(asset or ""))
    state = '<span class="active">Active</span>' if alert.active else '<span class="recovered">Recovered</span>'
    return (f"<tr><td>{state}</td><td>{esc(alert.rule_id)}</td><td>{esc(target_text(tree, alert.target))}</td>"
            f"<td>{esc(threshold)}</td><td>{when(alert.fired_at_ms)}</td>"
            f"<td>{when(alert.recovered_at_ms)}</td></tr>")
