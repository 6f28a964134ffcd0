"""Every admin answer with real data in it fits its schema in the OpenAPI document, closed to fields the
document does not name: usage records of real proxy requests, ledger entries, grants, holds with their
allocations, plans and subscriptions, price versions, quotes and events, links and reports.

Method: the in-process gateway (tests/conftest.py: SQLite, the mock OpenAI upstream) driven through the
admin API and the official ``openai`` SDK; each 2xx JSON answer is validated with ``jsonschema`` (draft
2020-12, the dialect of OpenAPI 3.1) against the operation's success schema from the document the server
publishes, with every object closed as in tests/admin/test_schemathesis.py. schemathesis cannot reach most
of these shapes with data in them (a usage record needs a metered request); this walk does.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest

from tests.admin.test_schemathesis import closed_answers
from tests.conftest import Gateway

RULES = [{"id": "mini", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD",
          "per_units": "1000000", "rates": {"input_tokens": "0.30", "output_tokens": "1.20"}},
         {"id": "calls", "match": {"type": "api.call"}, "asset": "USD", "rates": {"quantity": "0.01"}}]


class Checked:
    """Sends admin calls and validates each answer against the document; remembers what it covered."""

    def __init__(self, gateway: Gateway, document: dict[str, Any]) -> None:
        self.gateway, self.document, self.covered = gateway, closed_answers(document), set()

    def _operation(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        full = "/admin/v1" + path.split("?")[0]
        for template, item in sorted(self.document["paths"].items(), key=lambda p: p[0].count("{")):
            pattern = "^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, full) and method.lower() in item:
                return f"{method} {template}", item[method.lower()]
        raise AssertionError(f"{method} {full} is not in the document")

    async def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.gateway.admin.request(method, path, **kwargs)
        assert response.status_code < 300, (method, path, response.text)
        name, op = self._operation(method, path)
        ok = op["responses"][str(response.status_code)]  # the answer's own status (a replayed create: 200)
        schema = {**ok["content"]["application/json"]["schema"], "components": self.document["components"]}
        answer = response.json()
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(answer), key=str)
        assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
        self.covered.add(name)
        return answer


@pytest.fixture
async def call(gateway: Gateway) -> Checked:
    document = (await gateway.admin.get("/openapi.json")).json()
    return Checked(gateway, document)


async def test_the_wallet_answers_fit_the_document(gateway: Gateway, call: Checked) -> None:
    await call("POST", "/customers", json={"id": "acme", "name": "Acme"})
    await call("POST", "/customers/acme/credits", json={"amount_decimal": "2.50", "idempotency_key": "c1",
                                                        "memo": "seed"})
    chat = gateway.openai("acme")
    await chat.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    stream = await chat.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": "stream"}])
    async for _ in stream:
        pass
    customers = await call("GET", "/customers", params={"limit": 1})
    assert customers["next_cursor"] == "acme"
    await call("GET", "/customers/acme")
    await call("GET", "/customers/acme/balance")
    ledger = await call("GET", "/customers/acme/ledger", params={"limit": 2})
    usage = await call("GET", "/customers/acme/usage")
    assert len(usage["data"]) == 2 and ledger["next_cursor"] is not None
    key = await call("POST", "/customers/acme/api-keys", json={"attributes": {"feature": "search"}})
    await call("PATCH", f"/api-keys/{key['id']}", json={"attributes": {"feature": "chat"}})
    await call("GET", "/customers/acme/api-keys")
    await call("DELETE", f"/api-keys/{key['id']}")
    await call("POST", "/customers/acme/portal-link", json={"access": "view_topup"})
    await call("POST", "/customers/acme/portal-link")
    await call("POST", "/dashboard-link")
    await call("PUT", "/customers/acme/rate-limits", json={"requests_per_minute": 10, "tokens_per_minute": None})
    await call("GET", "/customers/acme/rate-limits")
    await call("DELETE", "/customers/acme/rate-limits")
    await call("GET", "/reports/margin", params={"group_by": "model"})

    # grants and their order
    grant = await call("POST", "/customers/acme/grants", json={"amount": 1000, "purpose": "trial",
                                                               "expires_at_ms": 4_102_444_800_000,
                                                               "idempotency_key": "g1"})
    await call("GET", "/customers/acme/grants", params={"limit": 1})
    await call("GET", f"/grants/{grant['id']}")
    await call("PUT", "/customers/acme/consumption-order", json={"order": "expiry"})
    await call("GET", "/customers/acme/consumption-order")
    await call("POST", f"/grants/{grant['id']}/void")
    await call("GET", "/assets")
    await call("POST", "/assets", json={"code": "TOKENS", "name": "Tokens", "scale": 0})
    await call("POST", "/conversions", json={"from_asset": "USD", "to_asset": "TOKENS", "rate": "1000"})
    await call("GET", "/conversions")
    await call("POST", "/customers/acme/convert", json={"from_asset": "USD", "to_asset": "TOKENS",
                                                        "amount_decimal": "0.01", "idempotency_key": "cv1"})

    # holds
    held = await call("POST", "/holds", json={"customer_id": "acme", "amount": 5000, "ttl_s": 60},
                      headers={"Idempotency-Key": "h1"})
    hold_id = held["hold"]["id"]
    await call("GET", "/holds", params={"customer_id": "acme"})
    await call("GET", f"/holds/{hold_id}")
    await call("POST", f"/holds/{hold_id}/extend", json={"amount": 1000, "idempotency_key": "e1"})
    await call("POST", f"/holds/{hold_id}/heartbeat", json={"used": 100, "next": 2000, "idempotency_key": "b1"})
    await call("POST", f"/holds/{hold_id}/capture", json={"amount": 100, "idempotency_key": "p1"})
    await call("POST", f"/holds/{hold_id}/void", json={"idempotency_key": "v1"})
    await call("POST", f"/holds/{hold_id}/heartbeat", json={"used": 200, "next": 10, "idempotency_key": "b2"})

    # plans and subscriptions
    await call("POST", "/plans", json={"id": "pro", "name": "Pro", "period": "month",
                                       "entitlements": [{"asset": "USD", "amount": 100, "rollover_cap": 50}]})
    await call("GET", "/plans")
    await call("GET", "/plans/pro")
    await call("POST", "/customers/acme/subscriptions", json={"id": "sub1", "plan_id": "pro"})
    await call("GET", "/customers/acme/subscriptions")
    await call("GET", "/subscriptions/sub1")
    await call("POST", "/subscriptions/sub1/tick")
    await call("POST", "/subscriptions/sub1/cancel")

    # prices, quotes, events
    await call("POST", "/price-versions/validate", json={"rules": RULES})
    draft = await call("POST", "/price-versions", json={"rules": RULES, "note": "t", "idempotency_key": "d1"})
    replay = await call("POST", "/price-versions", json={"rules": RULES, "note": "t", "idempotency_key": "d1"})
    assert replay["id"] == draft["id"]
    await call("POST", f"/price-versions/{draft['id']}/publish", json={})
    await call("GET", "/price-versions", params={"limit": 1})
    await call("GET", f"/price-versions/{draft['id']}")
    await call("GET", "/price-versions/config")
    await call("POST", f"/price-versions/{draft['id']}/simulate", json={"from": 0, "to": 4_102_444_800_000})
    await call("POST", "/price-versions/simulate", json={"rules": RULES, "from": 0, "to": 4_102_444_800_000})
    await call("POST", "/quote", json={"customer_id": "acme", "model": "gpt-4o-mini",
                                       "usage": {"input_tokens": 1000, "output_tokens": 10}})
    await call("POST", "/quote", json={"customer_id": "acme", "type": "api.call", "quantities": {"quantity": "2"}})
    events = await call("POST", "/events", json={"events": [
        {"id": "ev1", "customer_id": "acme", "type": "api.call", "quantity": "1"},
        {"id": "ev2", "customer_id": "nobody", "type": "api.call", "quantity": "1"}]})
    assert [e["status"] for e in events["data"]] == ["accepted", "rejected"]

    # billing, payments, notifications
    await call("GET", "/customers/acme/billing")
    await call("PUT", "/customers/acme/billing", json={"billing_mode": "prepaid", "credit_limits": {"USD": 0},
                                                       "memo": "t"})
    await call("GET", "/customers/acme/meter-events")
    await call("GET", "/billing/reconciliation")
    await call("PUT", "/customers/acme/auto-top-up", json={"threshold": 1_000_000, "amount": 5_000_000})
    await call("GET", "/customers/acme/auto-top-up")
    await call("DELETE", "/customers/acme/auto-top-up")
    await call("PUT", "/customers/acme/spend-caps", json={"daily": 1000, "monthly": None})
    await call("GET", "/customers/acme/spend-caps")
    await call("GET", "/customers/acme/top-ups")
    await call("GET", "/webhooks")

    # budgets: a node under the root, a limit with its use, a key attached, an alert rule; creates replayed
    node = {"id": "team", "kind": "team", "name": "Team", "allowed_models": ["gpt-4o*"]}
    await call("POST", "/customers/acme/budget-nodes", json=node)
    await call("POST", "/customers/acme/budget-nodes", json=node)
    limit = {"id": "team-rpm", "dimension": "requests", "amount": 100, "window": {"kind": "rolling", "length_s": 60}}
    await call("POST", "/customers/acme/budget-nodes/team/limits", json=limit)
    await call("POST", "/customers/acme/budget-nodes/team/limits", json=limit)
    await call("PATCH", "/customers/acme/budget-limits/team-rpm", json={"amount": 200})
    await call("PATCH", "/customers/acme/budget-nodes/team", json={"name": "The team"})
    budget_key = await call("POST", "/customers/acme/api-keys", json={})
    await call("PUT", f"/api-keys/{budget_key['id']}/budget-node", json={"node_id": "team"})
    tree = await call("GET", "/customers/acme/budget-nodes")
    assert any(n["id"] == "team" and n["api_keys"] == [budget_key["id"]] for n in tree["data"]), tree
    await call("GET", "/customers/acme/budget-nodes/team")
    await call("PUT", "/customers/acme/budget-alerts/near", json={"target": "limit:team-rpm",
                                                                 "thresholds": [{"percent": 80}, {"amount": 150}]})
    await call("GET", "/customers/acme/budget-alerts")
    await call("GET", "/customers/acme/budget-alert-events")  # crossings: tests/budgets/test_alerts_shown.py
    await call("DELETE", "/customers/acme/budget-alerts/near")
    await call("PUT", f"/api-keys/{budget_key['id']}/budget-node", json={"node_id": None})
    await call("DELETE", "/customers/acme/budget-limits/team-rpm")
    await call("DELETE", "/customers/acme/budget-nodes/team")

    json_operations = {f"{m.upper()} {p}" for p, item in call.document["paths"].items() for m, op in item.items()
                       if any("application/json" in r["content"] for s, r in op["responses"].items()
                              if s.startswith("2"))}
    missing = json_operations - call.covered
    # Not walked here: the long poll and redelivery of notifications (tests/webhooks), one notification.
    assert missing <= {"GET /admin/v1/webhooks/follow", "GET /admin/v1/webhooks/{webhook_id}",
                       "POST /admin/v1/webhooks/{webhook_id}/redeliver"}, missing
