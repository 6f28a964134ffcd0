"""The portal's budget page: the customer's tree with each node's limits, their use in the current window and
what remains, reached with the same signed link as the billing page (``/portal/budgets?<the link's query>``).

Server-rendered HTML, every value escaped, the billing page's security headers; read-only (limits are set by
the operator through the admin API). Use is the quota claimed in the window (what admission counts).
"""

from __future__ import annotations

import html

from aiohttp import web

from metergate.budgets.model import ROOT, Node, Tree
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
</style></head>
<body><header><h1>Budgets for {customer}</h1></header>
<main><section aria-labelledby="tree"><h2 id="tree">Budget tree</h2>
<table aria-describedby="tree"><thead><tr><th scope="col">Node</th><th scope="col">Kind</th>
<th scope="col">Limit</th><th scope="col">Used</th><th scope="col">Remaining</th></tr></thead>
<tbody>{rows}</tbody></table></section></main></body></html>
"""


class BudgetPortal:
    def __init__(self, store: WalletStore, signer: LinkSigner) -> None:
        self._store = store
        self._signer = signer

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
        body = _PAGE.format(customer=html.escape(grant.customer_id), rows=rows)
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
