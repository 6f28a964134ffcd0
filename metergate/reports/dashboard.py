"""The operator dashboard at ``/admin/dashboard``: revenue, provider cost and margin, drawn server-side.

Browsers cannot send the admin API's bearer key, so the page is opened through a short-lived signed
link (``POST /admin/v1/dashboard-link``, scoped to the admin key's mode, ``dashboard_link_ttl_s``).
A link works once: its first use claims its id in the SQL database (:mod:`metergate.portal.used_links`,
so on every replica) and exchanges it for an ``HttpOnly``, ``SameSite=Strict`` session cookie (itself
signed, ``dashboard_session_ttl_s``, path ``/admin/dashboard``, ``Secure`` when ``public_url`` or the
request is https), then redirects to the bare page, so the link leaves the address bar and history; a
replay is refused (403 ``link_used``) and opens nothing. Links and sessions are signed with keys derived
from the portal secrets for their own scopes (:mod:`metergate.portal.links`): a customer's portal link
never opens it.

The page is plain HTML with inline SVG (:mod:`metergate.reports.charts`), no JavaScript and nothing
fetched from elsewhere; its Content-Security-Policy allows exactly its own stylesheet (by hash) and
form submissions to itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
from collections.abc import Mapping
from decimal import Decimal
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from metergate.budgets.model import FiredAlert
from metergate.config.settings import Settings
from metergate.errors import BadRequest, Forbidden
from metergate.portal.links import LinkSigner, PortalGrant, new_link_id
from metergate.portal.used_links import UsedLinks
from metergate.reports.charts import Group, Series, bar_chart, grouped_bars, line_chart, percent, usd
from metergate.reports.margin import (
    MAX_GROUPS,
    Grouping,
    MarginRow,
    margin_row,
    nanos_per_unit,
    period_of,
    roll_up,
    valuations_for,
)
from metergate.wallet.assets import AssetRegistry
from metergate.wallet.models import Mode, UsageGrouping, now_ms
from metergate.wallet.store import WalletStore

PATH = "/admin/dashboard"
COOKIE = "metergate_dashboard"
SUBJECT = "operator"  # what links and sessions sign in the customer slot: the whole mode, not one customer
RANGES_DAYS = (7, 30, 90, 365)
PERIODS: tuple[Grouping, ...] = ("day", "week", "month")
_DAY_MS = 86_400_000
_TOP = 8
ALERTS_SHOWN = 25  # the budget alerts listed: active ones first, then the latest recovered

_STYLE = """
:root { --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --bg: #f1f5f9; --card: #fff;
        --revenue: #2563eb; --cost: #f59e0b; --margin: #059669; --loss: #dc2626; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: var(--ink); color: #fff; padding: .9rem 2rem; display: flex; align-items: center;
         gap: 1.25rem; flex-wrap: wrap; }
header .brand { font-weight: 700; letter-spacing: .02em; font-size: 1.05rem; }
header .brand span { color: #94a3b8; font-weight: 500; }
header .mode { background: #fbbf24; color: #111; border-radius: 999px; padding: .1rem .6rem; font-size: .75rem;
               font-weight: 600; text-transform: uppercase; letter-spacing: .05em; }
header .mode.live { background: #34d399; }
header form { margin-left: auto; display: flex; gap: .5rem; align-items: center; color: #cbd5e1; }
header select, header button { font: inherit; border-radius: 6px; border: 1px solid #334155; background: #1e293b;
                               color: #fff; padding: .3rem .55rem; }
header button { background: var(--revenue); border-color: var(--revenue); cursor: pointer; }
main { max-width: 1240px; margin: 1.5rem auto 3rem; padding: 0 1.5rem; display: grid; gap: 1.25rem;
       grid-template-columns: repeat(2, minmax(0, 1fr)); }
.range { grid-column: 1 / -1; color: var(--muted); margin: 0; }
.kpis { grid-column: 1 / -1; display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 1rem; }
.card { background: var(--card); border-radius: 10px; box-shadow: 0 1px 2px #0f172a14, 0 1px 3px #0f172a0d;
        padding: 1.1rem 1.3rem; min-width: 0; }
.card.wide { grid-column: 1 / -1; }
.card h2 { font-size: .95rem; margin: 0 0 .75rem; display: flex; gap: .75rem; align-items: baseline; }
.card h2 small { color: var(--muted); font-weight: 400; }
.kpi .name { color: var(--muted); font-size: .8rem; text-transform: uppercase; letter-spacing: .05em; }
.kpi .value { font-size: 1.7rem; font-weight: 650; font-variant-numeric: tabular-nums; margin-top: .2rem; }
.kpi .sub { color: var(--muted); font-size: .8rem; }
.kpi.good .value { color: var(--margin); } .kpi.bad .value { color: var(--loss); }
.legend { display: flex; gap: 1rem; font-size: .8rem; color: var(--muted); margin-left: auto; }
.legend i { display: inline-block; width: .8rem; height: .8rem; border-radius: 2px; margin-right: .35rem;
            vertical-align: -1px; }
.legend .revenue { background: var(--revenue); } .legend .cost { background: var(--cost); }
.legend .margin { background: var(--margin); } .legend .loss { background: var(--loss); }
.flags { grid-column: 1 / -1; border-left: 4px solid var(--loss); }
.flags.clear { border-left-color: var(--margin); }
.flags ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: .5rem; }
.flag { background: #fef2f2; color: #991b1b; border: 1px solid #fecaca; border-radius: 999px;
        padding: .15rem .7rem; font-size: .85rem; font-variant-numeric: tabular-nums; }
.flag b { font-weight: 600; margin-right: .35rem; }
.flags p { margin: .25rem 0 .6rem; color: var(--muted); }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; font-size: 12px;
                 fill: var(--muted); }
svg.chart .label { fill: var(--ink); font-size: 13px; } svg.chart .label.loss { fill: var(--loss); font-weight: 600; }
svg.chart .value { fill: var(--ink); font-size: 12px; font-variant-numeric: tabular-nums; }
svg.chart .note { font-size: 11px; } svg.chart .empty { font-size: 13px; }
svg.chart .flag-mark { fill: var(--loss); font-weight: 700; font-size: 11px; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; } svg.chart .zero { stroke: #94a3b8; stroke-width: 1.2; }
svg.chart .line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
svg.chart .line.revenue { stroke: var(--revenue); } svg.chart .line.cost { stroke: var(--cost);
                                                                           stroke-dasharray: 5 4; }
svg.chart .line.margin { stroke: var(--margin); stroke-width: 3; }
svg.chart .dot.revenue { fill: var(--revenue); } svg.chart .dot.cost { fill: var(--cost); }
svg.chart .dot.margin { fill: var(--margin); stroke: #fff; stroke-width: 1.5; }
svg.chart .dot.loss { fill: var(--loss); }
svg.chart .bar.revenue { fill: var(--revenue); } svg.chart .bar.cost { fill: var(--cost); }
svg.chart .bar.margin { fill: var(--margin); } svg.chart .bar.loss { fill: var(--loss); }
svg.chart .bar.unknown { fill: #cbd5e1; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: .45rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { color: var(--muted); font-weight: 500; font-size: .8rem; }
td.neg { color: var(--loss); font-weight: 600; }
td.active { color: var(--loss); font-weight: 600; } td.recovered { color: var(--margin); }
.alerts td, .alerts th { text-align: left; }
.badge { background: var(--loss); color: #fff; border-radius: 4px; font-size: .7rem; padding: .05rem .35rem;
         margin-left: .4rem; font-weight: 600; vertical-align: 1px; }
footer { grid-column: 1 / -1; color: var(--muted); font-size: .8rem; }
@media (max-width: 900px) { main { grid-template-columns: 1fr; } .kpis { grid-template-columns: 1fr 1fr; } }
"""
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Margin · metergate operator dashboard</title><style>{style}</style></head>
<body><header><div class="brand">metergate <span>operator dashboard</span></div>{mode_badge}
<form method="get" action="{path}" aria-label="Report range">
<label for="days">Range</label><select id="days" name="days">{options}</select>
<select name="period" aria-label="Period">{period_options}</select><button type="submit">Update</button></form>
</header>
<main>
<p class="range">{range_text}</p>
<section class="kpis" aria-label="Totals">{kpis}</section>
{flags}
<section class="card wide" aria-labelledby="h-time"><h2 id="h-time">Margin over time <small>per {period}</small>
<span class="legend"><span><i class="revenue"></i>Revenue</span><span><i class="cost"></i>Provider cost</span>
<span><i class="margin"></i>Margin</span><span><i class="loss"></i>Loss</span></span></h2>{over_time}</section>
<section class="card" aria-labelledby="h-top"><h2 id="h-top">Top customers by margin</h2>{top_margin}</section>
<section class="card" aria-labelledby="h-loss"><h2 id="h-loss">Top customers by loss</h2>{top_loss}</section>
<section class="card wide" aria-labelledby="h-models"><h2 id="h-models">Cost against price per model
<span class="legend"><span><i class="revenue"></i>Price charged</span><span><i class="cost"></i>Provider cost</span>
</span></h2>{model_chart}{model_table}</section>
<section class="card wide" aria-labelledby="h-alerts"><h2 id="h-alerts">Budget alerts <small>{alerts_count}</small>
</h2>{alerts}</section>
<footer>Revenue is what wallets were charged; provider cost comes from genai-prices or the configured overrides.
Generated {generated} UTC. Figures are exact sums of integer amounts; the same report is available as JSON or CSV
from <code>GET /admin/v1/reports/margin</code>.</footer>
</main></body></html>"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
_CSP = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


class DashboardViews:
    def __init__(self, settings: Settings, store: WalletStore, links: LinkSigner, sessions: LinkSigner) -> None:
        self._store = store
        self._links = links
        self._sessions = sessions
        self._configured = settings.assets
        sql = store.system_of_record
        self._assets = AssetRegistry(sql, settings.assets)
        self._pricing_asset = settings.pricing.asset
        self._used = UsedLinks(sql)
        self._https = settings.public_url.lower().startswith("https://")

    def routes(self) -> list[web.RouteDef]:
        return [web.get(PATH, self.page)]

    # ------------------------------------------------------------------ authentication

    def link_query(self, mode: Mode) -> str:
        """The query string of a new signed, single-use dashboard link for ``mode``."""
        return self._links.query(mode, SUBJECT, link_id=new_link_id())

    def _verify(self, signer: LinkSigner, params: dict[str, str]) -> PortalGrant:
        try:
            grant = signer.verify(params)
        except Forbidden as refused:
            expired = refused.code == "expired_portal_link"
            raise Forbidden("This dashboard link has expired; ask the admin API for a new one "
                            "(POST /admin/v1/dashboard-link)." if expired else
                            "This dashboard link is not valid; ask the admin API for a new one "
                            "(POST /admin/v1/dashboard-link).",
                            code="expired_dashboard_link" if expired else "invalid_dashboard_link") from None
        if grant.customer_id != SUBJECT:
            raise Forbidden("This dashboard link is not valid.", code="invalid_dashboard_link")
        return grant

    def _session_mode(self, request: web.Request) -> Mode:
        parts = request.cookies.get(COOKIE, "").split(".")
        if len(parts) != 4:
            raise Forbidden("Open the dashboard through a signed link from POST /admin/v1/dashboard-link.",
                            code="invalid_dashboard_link")
        mode, expires, kid, sig = parts
        return self._verify(self._sessions, {"c": SUBJECT, "m": mode, "e": expires, "k": kid, "s": sig}).mode

    async def _open_session(self, request: web.Request) -> web.Response:
        """Trade a signed link, once, for a session cookie, and send the browser to the page without the link."""
        grant = self._verify(self._links, dict(request.query))
        if grant.link_id is None or self._used is None:  # a link without an id cannot be used only once
            raise Forbidden("This dashboard link is not valid; ask the admin API for a new one "
                            "(POST /admin/v1/dashboard-link).", code="invalid_dashboard_link")
        if not await self._used.claim(grant.link_id, scope=self._links.scope, expires_at_s=grant.expires_at):
            raise Forbidden("This dashboard link has been used already; a link opens one session. Ask the admin "
                            "API for a new one (POST /admin/v1/dashboard-link).", code="link_used")
        fields = dict(parse_qsl(self._sessions.query(grant.mode, SUBJECT)))
        rest = {k: v for k, v in request.query.items() if k in ("days", "period")}
        response = web.Response(status=303, headers={"Location": PATH + (f"?{urlencode(rest)}" if rest else ""),
                                                     **_HEADERS})
        secure = (self._https or request.secure
                  or request.headers.get("X-Forwarded-Proto", "").lower() == "https")
        response.set_cookie(COOKIE, ".".join((fields["m"], fields["e"], fields["k"], fields["s"])),
                            max_age=self._sessions.ttl_s, path=PATH, httponly=True, samesite="Strict",
                            secure=secure)
        return response

    # ------------------------------------------------------------------ the page

    async def page(self, request: web.Request) -> web.Response:
        if "s" in request.query:
            return await self._open_session(request)
        mode = self._session_mode(request)
        days, period = _choice(request.query, "days", RANGES_DAYS, 30), _period(request.query)
        to_ms = (now_ms() // _DAY_MS + 1) * _DAY_MS  # the end of today, UTC
        from_ms = to_ms - days * _DAY_MS
        body = await self._render(mode, days, period, from_ms, to_ms)
        return web.Response(text=body, content_type="text/html", headers=_HEADERS)

    async def _render(self, mode: Mode, days: int, period: Grouping, from_ms: int, to_ms: int) -> str:
        asset = self._pricing_asset
        values = await valuations_for(mode, self._configured, self._assets)

        async def rows(grouping: UsageGrouping) -> list[MarginRow]:
            aggs = await self._store.usage_summary(mode, group_by=grouping, from_ms=from_ms, to_ms=to_ms,
                                                   limit=MAX_GROUPS)
            return [margin_row(a, values) for a in aggs if a.asset == asset]

        customers_all, models_all, totals = await rows("customer"), await rows("model"), await rows("total")
        by_day = await self._store.usage_summary(mode, group_by="day", from_ms=from_ms, to_ms=to_ms,
                                                 limit=MAX_GROUPS)
        periods = {r.key: r for r in roll_up(by_day, period, values) if r.asset == asset}
        total = totals[0] if totals else None
        priced = nanos_per_unit(asset, values) is not None
        esc = html.escape

        labels: list[str] = []
        revenue: list[int] = []
        cost: list[int] = []
        margin: list[int] = []
        for key in _period_keys(from_ms, to_ms, period) if periods else ():  # no usage at all: say so
            row = periods.get(key)
            labels.append(key[5:] if period == "day" else key)
            revenue.append((row.revenue_nanos or 0) if row else 0)
            cost.append(row.cost_nanos if row else 0)
            margin.append((row.margin_nanos or 0) if row else 0)
        over_time = line_chart("margin-over-time", f"Revenue, cost and margin per {period}", labels,
                               [Series("revenue", "revenue", revenue), Series("cost", "cost", cost),
                                Series("margin", "margin", margin)])

        customers = [r for r in customers_all if r.margin_nanos is not None]
        gains = sorted((r for r in customers if (r.margin_nanos or 0) > 0), key=lambda r: -(r.margin_nanos or 0))
        losses = sorted((r for r in customers if r.negative), key=lambda r: r.margin_nanos or 0)
        top_margin = bar_chart("top-customers-margin", "Top customers by margin",
                               [(r.key, r.margin_nanos or 0) for r in gains[:_TOP]], css="margin",
                               empty="No customer with a positive margin in this range.")
        top_loss = bar_chart("top-customers-loss", "Top customers by loss",
                             [(r.key, r.margin_nanos or 0) for r in losses[:_TOP]], css="loss",
                             empty="No customer at a loss in this range.")

        factor = nanos_per_unit(asset, values) or Decimal(0)
        models = sorted(models_all, key=lambda r: -max(int(r.charged * factor), r.cost_nanos))
        model_chart = grouped_bars("cost-vs-price-per-model", "Price against provider cost per model",
                                   [_model_group(r, factor) for r in models[:12]])

        flags = _flags([r for r in customers_all if r.negative], [r for r in models_all if r.negative])
        fired = await self._store.fired_budget_alerts(mode, None, limit=ALERTS_SHOWN)
        scales = {a.code: a.scale for a in self._configured}
        range_text = (f"{_date(from_ms)} to {_date(to_ms - 1)} (UTC), {esc(asset)} priced; "
                      f"margin counts only requests whose provider cost is known.")
        if not priced:
            range_text += " The pricing asset is not USD, so no margin can be computed (no exchange rate)."
        options = "".join(f'<option value="{d}"{" selected" if d == days else ""}>Last {d} days</option>'
                          for d in RANGES_DAYS)
        period_options = "".join(f'<option value="{p}"{" selected" if p == period else ""}>per {p}</option>'
                                 for p in PERIODS)
        return _PAGE.format(
            style=_STYLE, mode_badge=f'<span class="mode {mode}">{mode} mode</span>', path=PATH, options=options,
            period_options=period_options, range_text=range_text, kpis=_kpis(total, factor), flags=flags,
            period=period, over_time=over_time, top_margin=top_margin, top_loss=top_loss, model_chart=model_chart,
            model_table=_model_table(models, factor), generated=_date(now_ms(), with_time=True),
            alerts_count=f"{sum(a.active for a in fired)} active", alerts=_alerts_table(fired, scales))


def _model_group(r: MarginRow, factor: Decimal) -> Group:
    """A model's bars: price against cost over its requests of known cost; price alone (grey) when no
    request of the model has a known cost."""
    known = r.requests - r.unknown_cost_requests - r.no_usage_requests
    if known == 0 and r.unknown_cost_requests:
        return Group(r.key, int(r.unknown_cost_charged * factor), None, False, "cost unknown")
    return Group(r.key, r.revenue_nanos or 0, r.cost_nanos, r.negative,
                 f"+{r.unknown_cost_requests} of unknown cost" if r.unknown_cost_requests else "")


def _kpis(total: MarginRow | None, factor: Decimal) -> str:
    revenue = (total.revenue_nanos or 0) if total else 0
    cost = total.cost_nanos if total else 0
    margin = total.margin_nanos if total else 0
    requests = total.requests if total else 0
    unknown = total.unknown_cost_requests if total else 0
    unknown_charged = int(total.unknown_cost_charged * factor) if total else 0
    tone = "bad" if margin is not None and margin < 0 else "good"

    def card(name: str, value: str, sub: str, css: str = "") -> str:
        return (f'<div class="card kpi {css}"><div class="name">{name}</div><div class="value">{value}</div>'
                f'<div class="sub">{sub}</div></div>')

    return "".join((
        card("Revenue", usd(revenue), "charged, requests of known cost"),
        card("Provider cost", usd(cost), "at list price"),
        card("Margin", usd(margin) if margin is not None else "—",
             f"{percent(margin, revenue)} of revenue" if margin is not None else "pricing asset is not USD", tone),
        card("Requests", f"{requests:,}", f"{unknown:,} of unknown cost ({usd(unknown_charged)} charged), "
                                          "left out of margin"),
    ))


def _flags(customers: list[MarginRow], models: list[MarginRow]) -> str:
    if not customers and not models:
        return ('<section class="card flags clear" aria-labelledby="h-flags"><h2 id="h-flags">Negative margin</h2>'
                "<p>No customer and no model is at a negative margin in this range.</p></section>")
    esc = html.escape

    def pills(kind: str, rows: list[MarginRow]) -> str:
        if not rows:
            return ""
        items = "".join(f'<li class="flag" data-flag="{kind}"><b>{esc(r.key)}</b>{usd(r.margin_nanos or 0)}</li>'
                        for r in sorted(rows, key=lambda r: r.margin_nanos or 0))
        return f"<p>{kind.title()}s at a loss</p><ul>{items}</ul>"

    return ('<section class="card flags" aria-labelledby="h-flags"><h2 id="h-flags">Negative margin '
            f"<small>{_count(len(customers), 'customer')}, {_count(len(models), 'model')}</small></h2>"
            f'{pills("customer", customers)}{pills("model", models)}</section>')


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _model_table(models: list[MarginRow], factor: Decimal) -> str:
    if not models:
        return ""
    esc = html.escape
    rows = []
    for r in models:
        margin = r.margin_nanos
        known = r.requests - r.unknown_cost_requests - r.no_usage_requests  # requests whose cost is known
        unknown = (f"{r.unknown_cost_requests:,} · {usd(int(r.unknown_cost_charged * factor))}"
                   if r.unknown_cost_requests else "—")
        badge = '<span class="badge">LOSS</span>' if r.negative else ""
        rows.append(
            f"<tr><td>{esc(r.key)}{badge}</td><td>{r.requests:,}</td><td>{usd(int(r.charged * factor))}</td>"
            f"<td>{usd(r.cost_nanos) if known else '—'}</td>"
            f'<td class="{"neg" if r.negative else ""}">{usd(margin) if margin is not None and known else "—"}</td>'
            f"<td>{percent(margin, r.revenue_nanos or 0) if margin is not None and known else '—'}</td>"
            f"<td>{unknown}</td></tr>")
    return ('<table aria-label="Margin per model"><thead><tr><th scope="col">Model</th><th scope="col">Requests</th>'
            '<th scope="col">Charged</th><th scope="col">Provider cost</th><th scope="col">Margin</th>'
            '<th scope="col">Margin %</th><th scope="col">Of unknown cost</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _alerts_table(fired: list[FiredAlert], scales: Mapping[str, int]) -> str:
    """Every customer's alert thresholds that fired (:mod:`metergate.budgets.alerts`), active first."""
    if not fired:
        return '<p class="range">No budget alert has fired in this mode.</p>'
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(a.customer_id)}</td><td>{esc(a.rule_id)}</td><td>{esc(a.target)}</td>"
        f"<td>{esc(_threshold(a, scales))}</td><td>{_date(a.fired_at_ms, with_time=True)}</td>"
        + ('<td class="active">Active</td>' if a.active else
           f'<td class="recovered">Recovered {_date(a.recovered_at_ms or 0, with_time=True)}</td>') + "</tr>"
        for a in fired)
    return ('<table class="alerts"><thead><tr><th scope="col">Customer</th><th scope="col">Alert</th>'
            '<th scope="col">On</th><th scope="col">Threshold</th><th scope="col">Fired (UTC)</th>'
            f'<th scope="col">State</th></tr></thead><tbody>{rows}</tbody></table>')


def _threshold(alert: FiredAlert, scales: Mapping[str, int]) -> str:
    """A balance's level in its asset's major unit; a limit's amount as stored (the limit's unit is the
    customer's tree's, which the portal and the admin API show)."""
    asset = alert.target.partition(":")[2] if alert.target.startswith("balance:") else None
    return alert.describe_threshold(asset=asset, scale=scales.get(asset or ""))


def _period_keys(from_ms: int, to_ms: int, period: Grouping) -> list[str]:
    """Every period key in the range, in order, so that a period without usage is drawn as zero."""
    keys: list[str] = []
    for day in range(from_ms // _DAY_MS, -(-to_ms // _DAY_MS)):
        key = period_of(day, period)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def _choice(query: Mapping[str, str], name: str, allowed: tuple[int, ...], default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) not in allowed:
        raise BadRequest(f"'{name}' must be one of {', '.join(map(str, allowed))}.", param=name)
    return int(text)


def _period(query: Mapping[str, str]) -> Grouping:
    text = query.get("period", "day")
    for period in PERIODS:
        if text == period:
            return period
    raise BadRequest("'period' must be day, week or month.", param="period")


def _date(ms: int, *, with_time: bool = False) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")
