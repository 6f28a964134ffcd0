"""A test-mode admin key can neither read nor change anything in live mode, through every admin endpoint
the application serves — the payment endpoints included.

Method: a live customer with money, usage, a proxy key, a rate-limit override, auto top-up and spend caps,
each carrying a recognisable marker. Every route under ``/admin/v1`` is taken from the application's own
router (so a new endpoint is covered without editing this test) and called with the test key, the live
customer's id and key id in its path, and a body that would change something if it were accepted. No
answer may carry a live marker, and the live state read back from the database must be unchanged.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import httpx2 as httpx

from metergate.payments.store import AutoTopUpSetting, SpendCaps
from metergate.wallet.models import UsageRecord
from tests.conftest import LIVE_ADMIN_KEY
from tests.payments.conftest import PayGate

LIVE_ID, LIVE_NAME, LIVE_MODEL = "livecorp", "Live Secret Corp", "live-secret-model"
LIVE_FUNDS = 7_777_777
BODY: dict[str, Any] = {"id": "test-only-customer", "name": "Test Only", "amount": 1_000, "asset": "USD",
                        "idempotency_key": "isolation-probe", "memo": "probe", "threshold": 5_000_000,
                        "requests_per_minute": 1, "tokens_per_minute": 1, "daily": 1, "monthly": 1}
PATCH_BODY: dict[str, Any] = {"attributes": {"plan": "probe"}}  # well formed: only mode scoping may refuse it
# Routes whose body is validated before the object is looked up: each gets one that is well formed.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PUT", "/budget-node"): {"node_id": "live-node"},
    ("POST", "/budget-nodes"): {"id": "probe-node", "kind": "project"},
    ("PATCH", "/budget-nodes/{node_id}"): {"name": "probe"},
    ("POST", "/limits"): {"id": "probe-limit", "dimension": "requests", "amount": 1, "window": {"kind": "day"}},
    ("PATCH", "/budget-limits/{limit_id}"): {"amount": 1},
    ("PUT", "/budget-alerts/{rule_id}"): {"target": "limit:live-limit", "thresholds": [{"percent": 50}]},
}


async def _live_state(pg: PayGate, key_hash: str) -> dict[str, Any]:
    store, payments = pg.gw.store, pg.payments.store
    key = await store.find_api_key(key_hash)
    return {
        "customer": await store.get_customer("live", LIVE_ID),
        "balances": await store.balances("live", LIVE_ID),
        "ledger": await store.ledger("live", LIVE_ID, limit=100),
        "usage": await store.usage("live", LIVE_ID, limit=100),
        "key_revoked": key.revoked_at_ms if key else "missing",
        "overrides": [o for o in await store.rate_limit_overrides() if o.mode == "live"],
        "auto": await payments.auto_topup("live", LIVE_ID, "USD"),
        "caps": await payments.spend_caps("live", LIVE_ID, "USD"),
        "topups": await payments.topups("live", LIVE_ID),
        "live_customers": await store.list_customers("live", limit=100),
    }


async def _seed_live(pg: PayGate) -> tuple[str, str]:
    store = pg.gw.store
    await store.create_customer("live", LIVE_ID, LIVE_NAME)
    await store.credit("live", LIVE_ID, "USD", LIVE_FUNDS, idempotency_key="live-seed", memo="live memo")
    hold, _ = await store.reserve("live", LIVE_ID, "USD", 1_000, hold_id="hold_live1", ttl_ms=60_000)
    await store.settle(hold.id, 900, UsageRecord(
        id="req_live1", mode="live", customer_id=LIVE_ID, hold_id=hold.id, route="/openai",
        endpoint="chat.completions", model=LIVE_MODEL, feature="live-feature", stream=False, status_code=200,
        usage_source="provider", tokens_input=10, tokens_output=10, tokens_cached_input=0, tokens_reasoning=0,
        asset="USD", price_amount=900, cost_nanos=1_000))
    secret = "mgk_live_" + "z" * 32
    key_hash = hashlib.sha256(secret.encode()).hexdigest()
    await store.create_api_key("live", LIVE_ID, key_id="key_livesecret01", key_hash=key_hash, prefix=secret[:13])
    await store.set_rate_limit_override("live", LIVE_ID, requests_per_minute=99, tokens_per_minute=None)
    payments = pg.payments.store
    await payments.set_auto_topup(AutoTopUpSetting("live", LIVE_ID, "USD", 1_000_000, 10_000_000), mode="live",
                                  customer_id=LIVE_ID, asset="USD")
    await payments.set_spend_caps(SpendCaps("live", LIVE_ID, "USD", 5_000_000, None))
    return "key_livesecret01", key_hash


async def _seed_live_wallet(pg: PayGate) -> dict[str, str]:
    """A live grant, plan, subscription and open hold, for the routes that name them (issue #3)."""
    from metergate.wallet.models import Entitlement
    from metergate.wallet.subscriptions import Subscriptions

    store = pg.gw.store
    entry = await store.credit("live", LIVE_ID, "USD", 1_000, idempotency_key="live-grant", memo="live memo",
                               purpose="promotional")
    subs = Subscriptions(store)  # type: ignore[arg-type]
    await subs.create_plan("live", "live-plan", name=LIVE_NAME, period="month", period_days=None,
                           entitlements=(Entitlement("USD", 1_000),))
    await subs.subscribe("live", "live-sub", customer_id=LIVE_ID, plan_id="live-plan")
    await store.reserve("live", LIVE_ID, "USD", 500, hold_id="hold_live2", ttl_ms=600_000)
    assert entry.grant_id is not None
    # A live notification in the webhook outbox (metergate/webhooks), naming the live customer.
    webhook_id = await pg.payments.outbox.add("balance.low", "live", LIVE_ID, {"memo": "live memo"}, deliver=False)
    # A live draft price version (metergate/pricing), made with the live admin key.
    async with httpx.AsyncClient(base_url=pg.gw.admin.base_url,
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live_admin:
        r = await live_admin.post("/price-versions", json={"note": "live memo", "rules": [
            {"id": "live-rule", "match": {"type": "request", "model": LIVE_MODEL}, "asset": "USD",
             "per_units": "1000000", "rates": {"input_tokens": "7", "output_tokens": "11"}}]})
        assert r.status_code == 201, r.text
        version_id = r.json()["id"]
        # A live budget node with a limit and an alert rule (metergate/budgets), named like the live customer.
        r = await live_admin.post(f"/customers/{LIVE_ID}/budget-nodes",
                                  json={"id": "live-node", "kind": "project", "name": LIVE_NAME})
        assert r.status_code == 201, r.text
        r = await live_admin.post(f"/customers/{LIVE_ID}/budget-nodes/live-node/limits", json={
            "id": "live-limit", "dimension": "requests", "amount": 7, "window": {"kind": "day"}})
        assert r.status_code == 201, r.text
        r = await live_admin.put(f"/customers/{LIVE_ID}/budget-alerts/live-rule",
                                 json={"target": "limit:live-limit", "thresholds": [{"percent": 80}]})
        assert r.status_code in (200, 201), r.text
    return {"grant_id": entry.grant_id, "plan_id": "live-plan", "subscription_id": "live-sub",
            "hold_id": "hold_live2", "version_id": version_id, "webhook_id": webhook_id,
            "node_id": "live-node", "limit_id": "live-limit", "rule_id": "live-rule"}


async def _live_wallet_state(pg: PayGate, ids: dict[str, str]) -> dict[str, Any]:
    store = pg.gw.store
    async with httpx.AsyncClient(base_url=pg.gw.admin.base_url,
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live_admin:
        version = (await live_admin.get(f"/price-versions/{ids['version_id']}")).json()
        budgets = (await live_admin.get(f"/customers/{LIVE_ID}/budget-nodes")).json()
        rules = (await live_admin.get(f"/customers/{LIVE_ID}/budget-alerts")).json()
    return {"budgets": budgets, "budget_alerts": rules,
            "grants": await store.grants("live", LIVE_ID),  # type: ignore[attr-defined]
            "hold": await store.get_hold(ids["hold_id"]), "price_version": version,
            "webhook": await pg.payments.outbox.get("live", ids["webhook_id"])}


async def test_test_key_reads_and_changes_nothing_live_through_any_admin_route(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=1_000)  # a test-mode customer, so test answers are not empty
    key_id, key_hash = await _seed_live(paygate)
    live_ids = await _seed_live_wallet(paygate)
    before = {**await _live_state(paygate, key_hash), **await _live_wallet_state(paygate, live_ids)}
    routes = sorted({(r.method, r.resource.canonical) for r in paygate.gw.app.router.routes()
                     if r.resource is not None and r.resource.canonical.startswith("/admin/v1")
                     and r.method != "HEAD"})
    assert len(routes) >= 20  # the core admin API, reports, rate limits and payments are all here
    secrets = (LIVE_NAME, LIVE_MODEL, str(LIVE_FUNDS), "7.777777", "live-feature", "live memo")
    called = set()
    for method, template in routes:
        path = template.replace("{customer_id}", LIVE_ID).replace("{key_id}", key_id)
        for name, value in live_ids.items():  # grants, plans, subscriptions, holds (metergate/admin/wallets.py)
            path = path.replace(f"{{{name}}}", value)
        assert not re.search(r"\{\w+\}", path), f"unhandled path parameter in {template}"
        for query in ("", "?format=csv&group_by=customer", "?group_by=model", "?group_by=feature"):
            if query and "reports" not in path:
                continue
            body = next((b for (m, tail), b in BODIES.items() if m == method and template.endswith(tail)),
                        PATCH_BODY if method == "PATCH" else BODY if method in ("POST", "PUT") else None)
            r = await paygate.gw.admin.request(method, path.removeprefix("/admin/v1") + query, json=body)
            # An error may echo the ids the path itself named; nothing else live may appear.
            markers = secrets + tuple(i for i in (LIVE_ID, key_id) if i not in path)
            for marker in markers:
                assert marker not in r.text, f"{method} {path}{query} revealed {marker!r}: {r.text[:300]}"
            if "{customer_id}" in template or "{key_id}" in template or any(f"{{{n}}}" in template for n in live_ids):
                assert r.status_code == 404, f"{method} {path} answered {r.status_code} for a live object"
        called.add((method, template))
    assert called == set(routes)
    assert {**await _live_state(paygate, key_hash), **await _live_wallet_state(paygate, live_ids)} == before
    assert await paygate.gw.store.audit() == []
