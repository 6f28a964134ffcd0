"""Each admin API call once, as data: method, path, body, idempotency key and how to read the answer.

The sync :class:`~metergate_client.Client` and the :class:`~metergate_client.AsyncClient` send the same
:class:`Call` objects, so a path, a field name or a parser lives in one place. Every write carries an
idempotency key (given, or a fresh one per call, reused by every retry of that call); ``retry`` says whether
the call may be sent again after the server may have seen it (false where the admin API has no idempotency
for it: creating a customer, issuing an API key).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import EllipsisType
from typing import Any, Generic, TypeVar
from urllib.parse import quote as _q

from metergate_client.models import (
    ApiKey,
    Asset,
    Balance,
    BudgetAlertRule,
    BudgetLimit,
    BudgetNode,
    BudgetNodeView,
    BudgetTree,
    BudgetWindow,
    Credit,
    Customer,
    Deleted,
    EventResult,
    FiredBudgetAlert,
    Grant,
    Heartbeat,
    Hold,
    Json,
    KeyAttachment,
    LedgerEntry,
    Link,
    Page,
    Quote,
    UsageRecord,
)

T = TypeVar("T")
U = TypeVar("U")
Amount = Decimal | str | int  # in the asset's major unit; never a float


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Json], T]
    json: Json | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    retry: bool = True


def new_key(prefix: str = "mgc") -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def decimal_text(amount: Amount, name: str = "amount") -> str:
    """A plain decimal string of a non-negative amount; floats are refused (they are not exact)."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | str | int):
        raise TypeError(f"{name} must be a Decimal, a decimal string or an int, not {type(amount).__name__}")
    try:
        value = Decimal(amount) if not isinstance(amount, Decimal) else amount
    except ArithmeticError:
        raise ValueError(f"{name} is not a decimal number: {amount!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative decimal: {amount!r}")
    return format(value, "f")


def _p(segment: str) -> str:
    return _q(segment, safe="")


def _page(parse: Callable[[Json], U]) -> Callable[[Json], Page[U]]:
    def read(j: Json) -> Page[U]:
        cursor = j.get("next_cursor")
        return Page([parse(item) for item in j["data"]], None if cursor is None else str(cursor))

    return read


def _paging(limit: int, cursor: str | None, **extra: str | None) -> dict[str, str]:
    params = {"limit": str(limit), **{k: v for k, v in extra.items() if v is not None}}
    if cursor is not None:
        params["cursor"] = cursor
    return params


def _raw(j: Json) -> Json:
    return j


# ---------------------------------------------------------------------- customers, keys, money


def create_customer(customer_id: str, name: str = "") -> Call[Customer]:
    return Call("POST", "/customers", Customer.of, {"id": customer_id, "name": name}, retry=False)


def list_customers(limit: int = 50, cursor: str | None = None) -> Call[Page[Customer]]:
    return Call("GET", "/customers", _page(Customer.of), params=_paging(limit, cursor))


def get_customer(customer_id: str) -> Call[Customer]:
    return Call("GET", f"/customers/{_p(customer_id)}", Customer.of)


def balances(customer_id: str) -> Call[list[Balance]]:
    return Call("GET", f"/customers/{_p(customer_id)}/balance", lambda j: [Balance.of(b) for b in j["balances"]])


def credit(customer_id: str, amount: Amount, *, asset: str | None = None, idempotency_key: str | None = None,
           memo: str = "") -> Call[Credit]:
    key = idempotency_key or new_key("credit")
    body: Json = {"amount_decimal": decimal_text(amount), "idempotency_key": key, "memo": memo}
    if asset is not None:
        body["asset"] = asset
    return Call("POST", f"/customers/{_p(customer_id)}/credits", Credit.of, body, idempotency_key=key)


def issue_key(customer_id: str) -> Call[ApiKey]:
    return Call("POST", f"/customers/{_p(customer_id)}/api-keys", ApiKey.of, {}, idempotency_key=new_key(),
                retry=False)


def revoke_key(key_id: str) -> Call[ApiKey]:
    return Call("DELETE", f"/api-keys/{_p(key_id)}", ApiKey.of, idempotency_key=new_key())


def ledger(customer_id: str, limit: int = 50, cursor: str | None = None) -> Call[Page[LedgerEntry]]:
    return Call("GET", f"/customers/{_p(customer_id)}/ledger", _page(LedgerEntry.of), params=_paging(limit, cursor))


def usage(customer_id: str, limit: int = 50, cursor: str | None = None) -> Call[Page[UsageRecord]]:
    return Call("GET", f"/customers/{_p(customer_id)}/usage", _page(UsageRecord.of), params=_paging(limit, cursor))


def portal_link(customer_id: str, access: str | None = None) -> Call[Link]:
    body = None if access is None else {"access": access}
    return Call("POST", f"/customers/{_p(customer_id)}/portal-link", Link.of, body, idempotency_key=new_key())


def dashboard_link() -> Call[Link]:
    return Call("POST", "/dashboard-link", Link.of, idempotency_key=new_key())


def assets() -> Call[list[Asset]]:
    return Call("GET", "/assets", lambda j: [Asset.of(a) for a in j["data"]])


# ---------------------------------------------------------------------- grants


def list_grants(customer_id: str, *, asset: str | None = None, limit: int = 50,
                cursor: str | None = None) -> Call[Page[Grant]]:
    return Call("GET", f"/customers/{_p(customer_id)}/grants", _page(Grant.of),
                params=_paging(limit, cursor, asset=asset))


def create_grant(customer_id: str, amount: Amount, *, asset: str | None = None, purpose: str = "paid",
                 priority: int = 0, effective_at_ms: int | None = None, expires_at_ms: int | None = None,
                 memo: str = "", idempotency_key: str | None = None) -> Call[Grant]:
    key = idempotency_key or new_key("grant")
    body: Json = {"amount_decimal": decimal_text(amount), "purpose": purpose, "priority": priority, "memo": memo,
                  "idempotency_key": key}
    optional = {"asset": asset, "effective_at_ms": effective_at_ms, "expires_at_ms": expires_at_ms}
    body.update({k: v for k, v in optional.items() if v is not None})
    return Call("POST", f"/customers/{_p(customer_id)}/grants", Grant.of, body, idempotency_key=key)


def void_grant(grant_id: str) -> Call[Grant]:
    return Call("POST", f"/grants/{_p(grant_id)}/void", Grant.of, idempotency_key=new_key())


# ---------------------------------------------------------------------- holds


def create_hold(customer_id: str, amount: Amount, *, asset: str | None = None, ttl_s: int = 300,
                idempotency_key: str | None = None, hold_id: str | None = None) -> Call[Hold]:
    key = idempotency_key or new_key("hold")
    body: Json = {"customer_id": customer_id, "amount_decimal": decimal_text(amount), "ttl_s": ttl_s}
    if asset is not None:
        body["asset"] = asset
    if hold_id is not None:
        body["hold_id"] = hold_id
    return Call("POST", "/holds", Hold.of, body, idempotency_key=key)


def get_hold(hold_id: str) -> Call[Hold]:
    return Call("GET", f"/holds/{_p(hold_id)}", Hold.of)


def heartbeat(hold_id: str, *, used: Amount, next_amount: Amount, ttl_s: int = 300,
              idempotency_key: str | None = None) -> Call[Heartbeat]:
    """``used`` is cumulative (all the job used so far): a lost or repeated heartbeat can never bill twice."""
    body: Json = {"used_decimal": decimal_text(used, "used"), "next_decimal": decimal_text(next_amount, "next"),
                  "ttl_s": ttl_s}
    return Call("POST", f"/holds/{_p(hold_id)}/heartbeat", Heartbeat.of, body,
                idempotency_key=idempotency_key or new_key("beat"))


def capture(hold_id: str, amount: Amount, *, final: bool = False, idempotency_key: str | None = None) -> Call[Hold]:
    body: Json = {"amount_decimal": decimal_text(amount), "final": final}
    return Call("POST", f"/holds/{_p(hold_id)}/capture", Hold.of, body,
                idempotency_key=idempotency_key or new_key("capture"))


def extend_hold(hold_id: str, amount: Amount, *, ttl_s: int = 300, idempotency_key: str | None = None) -> Call[Hold]:
    body: Json = {"amount_decimal": decimal_text(amount), "ttl_s": ttl_s}
    return Call("POST", f"/holds/{_p(hold_id)}/extend", Hold.of, body,
                idempotency_key=idempotency_key or new_key("extend"))


def void_hold(hold_id: str, *, idempotency_key: str | None = None) -> Call[Hold]:
    return Call("POST", f"/holds/{_p(hold_id)}/void", Hold.of, {}, idempotency_key=idempotency_key or new_key("void"))


# ---------------------------------------------------------------------- prices and events


def quote(customer_id: str, *, model: str | None = None, usage: Mapping[str, int] | None = None,
          payload: Json | None = None, type: str | None = None, quantities: Mapping[str, Amount] | None = None,
          attributes: Mapping[str, str] | None = None, feature: str | None = None, route: str | None = None,
          cost_usd: Amount | None = None, version: str | None = None) -> Call[Quote]:
    body: Json = {"customer_id": customer_id}
    if quantities is not None:
        body["quantities"] = {name: decimal_text(q, name) for name, q in quantities.items()}
    if usage is not None:
        body["usage"] = dict(usage)
    if attributes is not None:
        body["attributes"] = dict(attributes)
    if cost_usd is not None:
        body["cost_usd"] = decimal_text(cost_usd, "cost_usd")
    optional = {"model": model, "payload": payload, "type": type, "feature": feature, "route": route,
                "version": version}
    body.update({k: v for k, v in optional.items() if v is not None})
    return Call("POST", "/quote", Quote.of, body)  # reads only: safe to retry without a key


def send_events(events: list[Json]) -> Call[list[EventResult]]:
    """One batch (up to 500); exactly once by event id, so a retry of the whole batch is safe."""
    return Call("POST", "/events", lambda j: [EventResult.of(r) for r in j["data"]], {"events": events})


def validate_prices(rules: Any) -> Call[Json]:
    return Call("POST", "/price-versions/validate", _raw, {"rules": rules})


def create_price_version(rules: Any, note: str = "", idempotency_key: str | None = None) -> Call[Json]:
    """A draft; with ``idempotency_key`` once per key (so the call may be retried), else never retried."""
    return Call("POST", "/price-versions", _raw, {"rules": rules, "note": note}, idempotency_key=idempotency_key,
                retry=idempotency_key is not None)


def list_price_versions(limit: int = 50, cursor: str | None = None) -> Call[Json]:
    """``{"data": [summaries, newest first], "in_force": summary, "next_cursor"}``."""
    return Call("GET", "/price-versions", _raw, params=_paging(limit, cursor))


def get_price_version(version_id: str) -> Call[Json]:
    """One version with its rules (``config``: the settings file's version 0)."""
    return Call("GET", f"/price-versions/{_p(version_id)}", _raw)


def simulate_price_version(version_id: str, from_: int | str, to: int | str) -> Call[Json]:
    return Call("POST", f"/price-versions/{_p(version_id)}/simulate", _raw, {"from": from_, "to": to})


def simulate_prices(rules: Any, from_: int | str, to: int | str) -> Call[Json]:
    """Re-price recorded usage under a rule set that is not stored; nothing is written."""
    return Call("POST", "/price-versions/simulate", _raw, {"rules": rules, "from": from_, "to": to})


def publish_price_version(version_id: str, effective_at: int | str | None = None) -> Call[Json]:
    """Publishing is idempotent: the same version published again answers as the first time."""
    body: Json = {} if effective_at is None else {"effective_at": effective_at}
    return Call("POST", f"/price-versions/{_p(version_id)}/publish", _raw, body, idempotency_key=new_key())


def list_keys(customer_id: str, limit: int = 200) -> Call[list[ApiKey]]:
    return Call("GET", f"/customers/{_p(customer_id)}/api-keys", lambda j: [ApiKey.of(k) for k in j["data"]],
                params={"limit": str(limit)})


def list_holds(customer_id: str | None = None, limit: int = 200) -> Call[list[Hold]]:
    """Open (pending) holds, soonest expiry first."""
    params = {"limit": str(limit), **({"customer_id": customer_id} if customer_id is not None else {})}
    return Call("GET", "/holds", lambda j: [Hold.of(h) for h in j["data"]], params=params)


# ---------------------------------------------------------------------- budgets
#
# The budget API is idempotent by the ids a call names (a create again answers 200 with what exists, 409
# already_exists when it differs; PATCH, PUT and DELETE set a state), so these calls carry no idempotency key
# and every retry is safe.


def budget_tree(customer_id: str) -> Call[BudgetTree]:
    return Call("GET", f"/customers/{_p(customer_id)}/budget-nodes", BudgetTree.of)


def get_budget_node(customer_id: str, node_id: str) -> Call[BudgetNodeView]:
    return Call("GET", f"/customers/{_p(customer_id)}/budget-nodes/{_p(node_id)}", BudgetNodeView.of)


def create_budget_node(customer_id: str, node_id: str, kind: str, *, parent_id: str | None = None, name: str = "",
                       allowed_models: Sequence[str] | None = None) -> Call[BudgetNode]:
    """``parent_id`` None: under the customer's root; ``allowed_models`` None: any model."""
    body: Json = {"id": node_id, "kind": kind, "name": name}
    if parent_id is not None:
        body["parent_id"] = parent_id
    if allowed_models is not None:
        body["allowed_models"] = list(allowed_models)
    return Call("POST", f"/customers/{_p(customer_id)}/budget-nodes", BudgetNode.of, body)


def update_budget_node(customer_id: str, node_id: str, *, name: str | None = None,
                       allowed_models: Sequence[str] | EllipsisType | None = ...) -> Call[BudgetNode]:
    """Only what is given changes; ``allowed_models=None`` lifts the restriction (``...``: unchanged)."""
    body: Json = {} if name is None else {"name": name}
    if not isinstance(allowed_models, EllipsisType):
        body["allowed_models"] = None if allowed_models is None else list(allowed_models)
    return Call("PATCH", f"/customers/{_p(customer_id)}/budget-nodes/{_p(node_id)}", BudgetNode.of, body)


def delete_budget_node(customer_id: str, node_id: str) -> Call[Deleted]:
    """A leaf only; its limits and its keys' attachments go with it."""
    return Call("DELETE", f"/customers/{_p(customer_id)}/budget-nodes/{_p(node_id)}", Deleted.of)


def create_budget_limit(customer_id: str, node_id: str, limit_id: str, *, dimension: str, amount: int,
                        window: BudgetWindow | str, asset: str | None = None) -> Call[BudgetLimit]:
    """``amount``: requests, tokens, or (spend) the smallest unit of ``asset`` (default: the pricing asset);
    ``window``: a :class:`BudgetWindow` or its text (``day``, ``rolling:1h``, ``fixed:5m``)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int (the smallest unit), not {type(amount).__name__}")
    shape = BudgetWindow.parse(window) if isinstance(window, str) else window
    body: Json = {"id": limit_id, "dimension": dimension, "amount": amount, "window": shape.as_json()}
    if asset is not None:
        body["asset"] = asset
    return Call("POST", f"/customers/{_p(customer_id)}/budget-nodes/{_p(node_id)}/limits", BudgetLimit.of, body)


def update_budget_limit(customer_id: str, limit_id: str, amount: int) -> Call[BudgetLimit]:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int (the smallest unit), not {type(amount).__name__}")
    return Call("PATCH", f"/customers/{_p(customer_id)}/budget-limits/{_p(limit_id)}", BudgetLimit.of,
                {"amount": amount})


def delete_budget_limit(customer_id: str, limit_id: str) -> Call[Deleted]:
    return Call("DELETE", f"/customers/{_p(customer_id)}/budget-limits/{_p(limit_id)}", Deleted.of)


def attach_key(key_id: str, node_id: str | None) -> Call[KeyAttachment]:
    """Charge the proxy key's requests along ``node_id``'s path (None: detach, back to the root)."""
    return Call("PUT", f"/api-keys/{_p(key_id)}/budget-node", KeyAttachment.of, {"node_id": node_id})


def list_budget_alerts(customer_id: str) -> Call[list[BudgetAlertRule]]:
    return Call("GET", f"/customers/{_p(customer_id)}/budget-alerts",
                lambda j: [BudgetAlertRule.of(r) for r in j["data"]])


def set_budget_alert(customer_id: str, rule_id: str, target: str, *, percents: Sequence[int] = (),
                     amounts: Sequence[int] = ()) -> Call[BudgetAlertRule]:
    """``target``: ``limit:<limit id>`` or ``balance:<asset>``; thresholds in percent of it or absolute (the
    smallest unit for spend and balances)."""
    thresholds = [{"percent": p} for p in percents] + [{"amount": a} for a in amounts]
    return Call("PUT", f"/customers/{_p(customer_id)}/budget-alerts/{_p(rule_id)}", BudgetAlertRule.of,
                {"target": target, "thresholds": thresholds})


def list_fired_budget_alerts(customer_id: str) -> Call[list[FiredBudgetAlert]]:
    """The customer's thresholds that fired, active first, newest first."""
    return Call("GET", f"/customers/{_p(customer_id)}/budget-alert-events",
                lambda j: [FiredBudgetAlert.of(r) for r in j["data"]])


def delete_budget_alert(customer_id: str, rule_id: str) -> Call[Deleted]:
    return Call("DELETE", f"/customers/{_p(customer_id)}/budget-alerts/{_p(rule_id)}", Deleted.of)
