"""The customer's self-service billing page: balances, live usage, transaction history (filter, pages,
CSV), top-up through Stripe Checkout, auto top-up, spend caps and payment methods.

It answers the same signed link as the plain page (:mod:`metergate.portal.views`, which hands its page
over when payments are on), so a 402's ``portal_url`` opens it. What a page offers is what its link allows
(:mod:`metergate.portal.links`): a 402's link (``view_topup``) shows balances, usage and history and offers a
one-off top-up, because whoever caused the 402 holds it; auto top-up, spend caps and payment methods need a
``billing_admin`` link, issued only through the admin API. Every state-changing action checks the link's
access on the server (403 ``portal_scope`` otherwise, and nothing changes), and each change of a billing
setting is notified to the operator (``billing_settings.changed``: what changed, from what to what, through
which link). Every form is a ``POST`` that carries the link (which scopes it to one customer in one mode,
until the link expires) and a per-link CSRF token,
``HMAC(key, link signature)`` under a key derived from the portal secrets for this use alone; a post with a
wrong token, or that the browser marks cross-site, changes nothing. Branding (name, logo, colours) and the
``frame-ancestors`` of the Content-Security-Policy come from settings; every value shown is HTML-escaped.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import html
import io
import json
import secrets
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from sqlalchemy import Connection

from metergate.config.settings import Settings
from metergate.errors import BadRequest, Forbidden
from metergate.money import format_minor, parse_major
from metergate.payments.admin import validate_auto_topup
from metergate.payments.notify import settings_change, settings_changed
from metergate.payments.service import Payments
from metergate.payments.spendcaps import validate_caps
from metergate.portal.links import LINK_PARAMS, VIEW_TOPUP, LinkSigner, PortalGrant
from metergate.portal.views import LIVE_REFRESH_JS, balance_card
from metergate.wallet.models import LedgerEntry

# Every ledger entry kind (metergate.wallet.models.EntryKind), as the customer reads it in the history filter.
KINDS = {"credit": "Top-ups and credits", "capture": "Usage charges", "hold": "Holds", "void": "Released holds",
         "expire": "Expired holds", "extend": "Hold extensions", "shrink": "Holds reduced",
         "activate": "Credits activated", "lapse": "Expired credits", "revoke": "Revoked credits"}
_PAGE_SIZE = 20
_CSV_MAX_ROWS = 10_000
_NOTICES = {"auto_saved": "Automatic top-up saved.", "auto_off": "Automatic top-up turned off.",
            "caps_saved": "Spending limits saved.", "paid": "Thank you: your payment is being credited.",
            "cancelled": "Top-up cancelled; nothing was charged."}


class SelfServe:
    def __init__(self, settings: Settings, payments: Payments, signer: LinkSigner) -> None:
        self._settings = settings
        self._payments = payments
        self._store = payments.store
        self._signer = signer
        self._topups = payments.topups
        self._scale = payments.topups.scale
        self._asset = payments.topups.asset
        first = next(iter(settings.portal_secrets.values()), None)
        base = first.get_secret_value().encode() if first is not None else secrets.token_bytes(32)
        self._csrf_key = hmac.new(base, b"metergate portal csrf", hashlib.sha256).digest()
        self._csp = self._content_security_policy()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/portal/top-up", self.top_up), web.post("/portal/auto-top-up", self.auto_top_up),
                web.post("/portal/spend-caps", self.spend_caps), web.post("/portal/payment-methods", self.methods),
                web.get("/portal/history.csv", self.history_csv)]

    # ---------------------------------------------------------------- plumbing

    def _content_security_policy(self) -> str:
        forms = ["'self'", "https://checkout.stripe.com", "https://billing.stripe.com"]
        if self._settings.stripe_api_base:
            parts = urlsplit(self._settings.stripe_api_base)
            forms.append(f"{parts.scheme}://{parts.netloc}")  # a local fake serves its Checkout pages there
        images = ["'self'", "data:"]
        if self._settings.portal_logo_url.startswith("https://"):
            parts = urlsplit(self._settings.portal_logo_url)
            images.append(f"https://{parts.netloc}")
        return ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
                f"img-src {' '.join(images)}; frame-ancestors {self._settings.portal_frame_ancestors}; "
                f"base-uri 'none'; form-action {' '.join(forms)}")

    def _headers(self) -> dict[str, str]:
        return {"Content-Security-Policy": self._csp, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff"}

    def csrf_token(self, grant_signature: str) -> str:
        return hmac.new(self._csrf_key, grant_signature.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _link(request: web.Request) -> str:
        return urlencode({k: request.query[k] for k in LINK_PARAMS if k in request.query})

    def _return_url(self, request: web.Request, grant: PortalGrant, **extra: str) -> str:
        """Where Stripe sends the browser back: this page through a link that views and tops up only. A
        billing-administration link never leaves for Stripe: it is swapped for a fresh ``view_topup`` link
        for the same customer."""
        link = self._link(request) if not grant.billing_admin else self._signer.query(
            grant.mode, grant.customer_id, access=VIEW_TOPUP)
        query = link + ("&" + urlencode(extra) if extra else "")
        return f"{self._signer.base_url}/portal/?{query}"

    def _portal_url(self, request: web.Request, **extra: str) -> str:
        query = self._link(request) + ("&" + urlencode(extra) if extra else "")
        return f"{self._signer.base_url}/portal/?{query}"

    async def _form(self, request: web.Request, *, billing_admin: bool) -> tuple[PortalGrant, dict[str, str]]:
        """The verified link and the form, or a 403 when the link does not allow the action or the CSRF token
        is not right."""
        grant = self._signer.verify(dict(request.query))
        if billing_admin and not grant.billing_admin:
            raise Forbidden("This billing link can view balances and top up only. Automatic top-up, spending "
                            "limits and payment methods are changed from your account in the application.",
                            code="portal_scope")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise Forbidden("Forms are accepted from this page only.", code="invalid_csrf_token")
        form = {k: str(v) for k, v in (await request.post()).items()}
        expected = self.csrf_token(request.query.get("s", ""))
        if not hmac.compare_digest(expected.encode(), form.get("csrf", "").encode("utf-8", "surrogatepass")):
            raise Forbidden("This form has expired; reload the page.", code="invalid_csrf_token")
        if await self._store.wallet.get_customer(grant.mode, grant.customer_id) is None:
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        return grant, form

    def _major(self, text: str, param: str) -> int:
        try:
            value = parse_major(text.strip(), self._scale)
        except ValueError:
            raise BadRequest(f"Enter an amount such as 25.00 for {param}.", code="invalid_amount",
                             param=param) from None
        return value

    def _money(self, amount: int) -> str:
        text = format_minor(amount, self._scale)
        whole, _, frac = text.partition(".")
        return f"{whole}.{(frac.rstrip('0') or '00').ljust(2, '0')}" if frac else text

    # ---------------------------------------------------------------- actions

    async def top_up(self, request: web.Request) -> web.StreamResponse:
        grant, form = await self._form(request, billing_admin=False)
        cents = self._topups.parse_topup(form.get("amount", ""))
        url = await self._topups.start_checkout(
            grant.mode, grant.customer_id, cents, success_url=self._return_url(request, grant, notice="paid"),
            cancel_url=self._return_url(request, grant, notice="cancelled"),
            product=f"{self._settings.portal_brand_name or 'Prepaid'} credit")
        raise web.HTTPSeeOther(url)

    def _change(self, grant: PortalGrant, setting: str, before: object,
                after: object) -> Callable[[Connection], object]:
        """The notification of a change, recorded in the transaction that saves it."""
        return settings_change(self._payments.notifier, grant.mode, grant.customer_id, setting, before, after,
                               changed_by="portal", link_id=grant.link_id)

    async def auto_top_up(self, request: web.Request) -> web.StreamResponse:
        grant, form = await self._form(request, billing_admin=True)
        before = await self._store.auto_topup(grant.mode, grant.customer_id, self._asset)
        if form.get("enabled") != "on":
            await self._store.set_auto_topup(None, mode=grant.mode, customer_id=grant.customer_id, asset=self._asset,
                                             also=self._change(grant, "auto_top_up", before, None))
            raise web.HTTPSeeOther(self._portal_url(request, notice="auto_off"))
        threshold = self._major(form.get("threshold", ""), "threshold")
        amount = self._topups.cents_to_minor(self._topups.parse_topup(form.get("amount", "")))
        setting = validate_auto_topup(self._topups, grant.mode, grant.customer_id, self._asset, threshold, amount)
        await self._store.set_auto_topup(setting, mode=grant.mode, customer_id=grant.customer_id, asset=self._asset,
                                         also=self._change(grant, "auto_top_up", before, setting))
        raise web.HTTPSeeOther(self._portal_url(request, notice="auto_saved"))

    async def spend_caps(self, request: web.Request) -> web.StreamResponse:
        grant, form = await self._form(request, billing_admin=True)
        values = {name: self._major(form[name], name) if form.get(name, "").strip() else None
                  for name in ("daily", "monthly")}
        caps = validate_caps(grant.mode, grant.customer_id, self._asset, values["daily"], values["monthly"])
        before = await self._store.spend_caps(grant.mode, grant.customer_id, self._asset)
        after = caps if caps.daily is not None or caps.monthly is not None else None
        await self._store.set_spend_caps(caps, also=self._change(grant, "spend_caps", before, after))
        raise web.HTTPSeeOther(self._portal_url(request, notice="caps_saved"))

    async def methods(self, request: web.Request) -> web.StreamResponse:
        grant, _ = await self._form(request, billing_admin=True)
        stripe_customer = await self._payments.stripe.customer(grant.mode, grant.customer_id)
        url = await self._payments.stripe.billing_portal(grant.mode, stripe_customer, self._return_url(request, grant))
        # What changes there (cards added, removed, made the default) happens at Stripe; what metergate sees
        # and reports is that a session able to change them was opened.
        await settings_changed(self._payments.notifier, grant.mode, grant.customer_id, "payment_methods", None,
                               {"stripe_billing_portal": "opened"}, changed_by="portal", link_id=grant.link_id)
        raise web.HTTPSeeOther(url)

    # ---------------------------------------------------------------- history

    def _kinds(self, request: web.Request) -> tuple[str, ...]:
        kind = request.query.get("kind", "")
        if kind and kind not in KINDS:
            raise BadRequest("Unknown transaction kind.", code="invalid_request", param="kind")
        return (kind,) if kind else ()

    async def history_csv(self, request: web.Request) -> web.StreamResponse:
        grant = self._signer.verify(dict(request.query))
        kinds = self._kinds(request)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["seq", "time_utc", "kind", "amount", "asset", "memo"])
        before: int | None = None
        written = 0
        while written < _CSV_MAX_ROWS:
            page = await self._store.history(grant.mode, grant.customer_id, limit=200, before=before, kinds=kinds)
            for e in page:
                writer.writerow([e.seq, _utc(e.created_at_ms), e.kind, format_minor(e.amount, self._scale), e.asset,
                                 _cell(e.memo)])
            written += len(page)
            if len(page) < 200:
                break
            before = page[-1].seq
        return web.Response(text=out.getvalue(), content_type="text/csv", headers={
            **self._headers(), "Content-Disposition": f'attachment; filename="transactions-{grant.mode}.csv"'})

    # ---------------------------------------------------------------- the page

    async def page(self, request: web.Request, grant: PortalGrant) -> web.StreamResponse:
        if await self._store.wallet.get_customer(grant.mode, grant.customer_id) is None:
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        esc = html.escape
        link = self._link(request)
        kinds = self._kinds(request)
        try:
            before = int(request.query["before"]) if "before" in request.query else None
        except ValueError:
            raise BadRequest("'before' must be a transaction number.", code="invalid_request") from None
        entries = await self._store.history(grant.mode, grant.customer_id, limit=_PAGE_SIZE, before=before,
                                            kinds=kinds)
        balances = await self._store.money.balances(grant.mode, grant.customer_id)
        usage = await self._store.wallet.usage(grant.mode, grant.customer_id, limit=20)
        auto = await self._store.auto_topup(grant.mode, grant.customer_id, self._asset)
        caps = await self._store.spend_caps(grant.mode, grant.customer_id, self._asset)
        recent = await self._store.topups(grant.mode, grant.customer_id, limit=5)
        csrf = esc(self.csrf_token(request.query.get("s", "")))
        s = self._settings
        brand = esc(s.portal_brand_name or "Billing")
        logo = (f'<img src="{esc(s.portal_logo_url)}" alt="{brand} logo" height="32">'
                if s.portal_logo_url.startswith("https://") else "")
        notice = _NOTICES.get(request.query.get("notice", ""), "")
        # Named as the live refresh (metergate.portal.views) names them, so that nothing changes after 2 s.
        names = {a.code: a.name or a.code for a in s.assets}
        cards = "".join(balance_card(b, names.get(b.asset, b.asset),
                                     self._settings.asset(b.asset).scale if b.asset in _codes(s) else 0)
                        for b in balances) or '<div class="card">No balance yet.</div>'
        usage_rows = "".join(
            f"<tr><td>{_utc(u.created_at_ms)}</td><td>{esc(u.model)}</td><td>{u.tokens_input} / {u.tokens_output}"
            f"</td><td>{esc(format_minor(u.charged_amount, self._scale))} {esc(u.asset)}</td></tr>"
            for _, u in usage) or '<tr><td colspan="4">No usage yet.</td></tr>'
        history_rows = "".join(self._history_row(e) for e in entries) or (
            '<tr><td colspan="4">No transactions.</td></tr>')
        kind = kinds[0] if kinds else ""
        options = "".join(f'<option value="{k}"{" selected" if k == kind else ""}>{esc(v)}</option>'
                          for k, v in KINDS.items())
        older = ""
        if len(entries) == _PAGE_SIZE:
            older = (f'<a href="?{link}&amp;{esc(urlencode({"kind": kind, "before": entries[-1].seq}))}"'
                     f' rel="next">Older transactions</a>')
        low, high = f"{s.topup_min:.2f}", f"{s.topup_max:.2f}"
        last_auto = next((t for t in recent if t.kind == "auto"), None)
        auto_status = ""
        if last_auto is not None and last_auto.state == "failed":
            auto_status = (f'<p class="warn" role="alert">The last automatic top-up failed: '
                           f"{esc(last_auto.error_code or '')}. Update your card, then save these settings again."
                           "</p>")
        hidden = f'<input type="hidden" name="csrf" value="{csrf}">'
        if grant.billing_admin:
            admin_forms = f"""<form class="panel" method="post" action="auto-top-up?{link}" aria-labelledby="auto-h">
<h2 id="auto-h">Automatic top-up</h2>{hidden}{auto_status}
<label><input type="checkbox" name="enabled" id="auto-enabled"{" checked" if auto else ""}> Top up automatically</label>
<label for="auto-threshold">When the balance falls below</label>
<input type="text" id="auto-threshold" name="threshold" inputmode="decimal"
 value="{self._money(auto.threshold) if auto else "5.00"}">
<label for="auto-amount">Add</label>
<input type="text" id="auto-amount" name="amount" inputmode="decimal"
 value="{self._money(auto.amount) if auto else "20.00"}" aria-describedby="auto-hint">
<div id="auto-hint" class="hint">Charged to your saved card, at most {s.auto_topup_daily_cap} times a day.</div>
<button type="submit">Save automatic top-up</button></form>
<form class="panel" method="post" action="spend-caps?{link}" aria-labelledby="caps-h">
<h2 id="caps-h">Spending limits</h2>{hidden}
<label for="cap-daily">Daily limit ({esc(self._asset)})</label>
<input type="text" id="cap-daily" name="daily" inputmode="decimal" aria-describedby="caps-hint"
 value="{self._money(caps.daily) if caps and caps.daily else ""}">
<label for="cap-monthly">Monthly limit ({esc(self._asset)})</label>
<input type="text" id="cap-monthly" name="monthly" inputmode="decimal" aria-describedby="caps-hint"
 value="{self._money(caps.monthly) if caps and caps.monthly else ""}">
<div id="caps-hint" class="hint">Leave empty for no limit. Requests beyond a limit are refused.</div>
<button type="submit">Save limits</button></form>
<form class="panel" method="post" action="payment-methods?{link}" aria-labelledby="pm-h">
<h2 id="pm-h">Payment methods</h2>{hidden}
<p>Add, remove or change the card used for top-ups.</p><button type="submit">Manage payment methods</button></form>
"""
        else:  # a 402's link: whoever caused the 402 holds it, so it changes nothing but the balance
            admin_forms = """<section class="panel card" aria-labelledby="manage-h">
<h2 id="manage-h">Billing settings</h2>
<p>Automatic top-up, spending limits and payment methods are managed from your account in the application:
open billing from there to change them.</p></section>
"""
        body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{brand} · {esc(grant.customer_id)}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2433; }}
 header {{ background: {s.portal_primary_color}; color: #fff; padding: 1rem 2rem; display: flex; gap: 1rem;
          align-items: center; }}
 header h1 {{ font-size: 1.4rem; margin: 0; }}
 main {{ max-width: 62rem; margin: 1.5rem auto; padding: 0 1rem; }}
 section {{ margin-bottom: 2rem; }}
 .cards {{ display: flex; gap: 1rem; flex-wrap: wrap; }}
 .card, form.panel {{ background: #fff; border-radius: .5rem; padding: 1rem 1.5rem; box-shadow: 0 1px 3px #0002; }}
 .amount {{ font-size: 2rem; font-weight: 600; }}
 .grid {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 1rem; }}
 label {{ display: block; margin: .5rem 0 .2rem; font-weight: 600; }}
 input[type=text] {{ font: inherit; padding: .4rem; width: 10rem; border: 1px solid #8a93a3; border-radius: .3rem; }}
 button {{ font: inherit; margin-top: .8rem; padding: .5rem 1rem; border: 0; border-radius: .3rem;
           background: {s.portal_accent_color}; color: #fff; cursor: pointer; }}
 button:focus-visible, a:focus-visible, input:focus-visible, select:focus-visible {{ outline: 3px solid #f5a623; }}
 table {{ width: 100%; border-collapse: collapse; background: #fff; margin-top: .5rem; }}
 th, td {{ text-align: left; padding: .5rem .75rem; border-bottom: 1px solid #e3e6ea;
          font-variant-numeric: tabular-nums; }}
 .mode {{ padding: .1rem .5rem; border-radius: 1rem; background: #ffd54a; color: #000; font-size: .8rem; }}
 .notice {{ background: #e6f4ea; border-left: 4px solid #2e7d32; padding: .6rem 1rem; }}
 .warn {{ background: #fdecea; border-left: 4px solid #c62828; padding: .6rem 1rem; }}
 .hint {{ color: #4a5263; font-size: .9rem; }}
</style></head>
<body><header role="banner">{logo}
<h1>{f"{brand} · " if s.portal_brand_name else ""}Billing for {esc(grant.customer_id)}</h1>
{'<span class="mode">test mode</span>' if grant.mode == "test" else ""}</header>
<main id="main">
{f'<p class="notice" role="status">{esc(notice)}</p>' if notice else ""}
<section aria-labelledby="bal"><h2 id="bal">Balance</h2>
<div class="cards" id="balances" aria-live="polite">{cards}</div></section>
<div class="grid">
<form class="panel" method="post" action="top-up?{link}" aria-labelledby="topup-h">
<h2 id="topup-h">Top up</h2>{hidden}
<label for="topup-amount">Amount ({esc(self._asset)})</label>
<input type="text" id="topup-amount" name="amount" inputmode="decimal" required value="25.00"
 aria-describedby="topup-hint"><div id="topup-hint" class="hint">Between {low} and {high}.</div>
<button type="submit">Top up</button></form>
{admin_forms}</div>
<section aria-labelledby="use"><h2 id="use">Recent usage</h2>
<table aria-labelledby="use"><thead><tr><th scope="col">Time (UTC)</th><th scope="col">Model</th>
<th scope="col">Tokens in / out</th><th scope="col">Charged</th></tr></thead>
<tbody id="usage" aria-live="polite">{usage_rows}</tbody></table>
<p class="hint">Updates live. Link valid until <time>{_utc(grant.expires_at * 1000)}</time>.</p></section>
<section aria-labelledby="hist"><h2 id="hist">Transactions</h2>
<form method="get" action="" role="search" aria-label="Filter transactions">
{"".join(f'<input type="hidden" name="{k}" value="{esc(request.query[k])}">' for k in LINK_PARAMS
         if k in request.query)}
<label for="kind">Show</label><select id="kind" name="kind"><option value="">All transactions</option>{options}
</select> <button type="submit">Filter</button>
<a href="history.csv?{link}&amp;{esc(urlencode({"kind": kind}))}" download>Download CSV</a></form>
<table aria-labelledby="hist"><thead><tr><th scope="col">Time (UTC)</th><th scope="col">Kind</th>
<th scope="col">Amount</th><th scope="col">Details</th></tr></thead><tbody id="history">{history_rows}</tbody></table>
{older}</section>
</main>
<script>
const q = "?" + new URLSearchParams([...new URLSearchParams(window.location.search)].filter(
  ([k]) => {json.dumps(list(LINK_PARAMS))}.includes(k))).toString();
{LIVE_REFRESH_JS}
</script></body></html>
"""
        return web.Response(text=body, content_type="text/html", headers=self._headers())

    def _history_row(self, e: LedgerEntry) -> str:
        esc = html.escape
        sign = "+" if e.credits_delta > 0 else ("−" if e.posted_delta > 0 else "")
        return (f'<tr data-kind="{esc(e.kind)}"><td>{_utc(e.created_at_ms)}</td><td>{esc(KINDS.get(e.kind, e.kind))}'
                f"</td><td>{sign}{esc(format_minor(e.amount, self._scale))} {esc(e.asset)}</td>"
                f"<td>{esc(e.memo)}</td></tr>")


def _codes(settings: Settings) -> set[str]:
    return {a.code for a in settings.assets}


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def _utc(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


